"""`microtransformer eval`: loss, perplexity and bits per byte of a run on any text."""

from __future__ import annotations

import argparse
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from microtransformer.checkpoint import load_run
from microtransformer.data import load_tokens, verify_dataset
from microtransformer.data.documents import file_documents, read_text
from microtransformer.data.preparation import check_unknown_limit, unknown_message
from microtransformer.device import PRECISIONS, check_precision, prepare_model, resolve_device
from microtransformer.errors import UserError
from microtransformer.jsonout import json_dumps
from microtransformer.memory import check_eval_fits
from microtransformer.rundata import check_tokenizer_match


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add the `eval` subcommand."""
    p = subparsers.add_parser(
        name, help=help_text,
        description=help_text + ". Windows of W tokens (the run's training window by default) "
        "overlapping by one token cover the whole text, so every token after the first is "
        "predicted exactly once (--stride N: sliding windows, each prediction with at least "
        "W - N tokens of context); bits per byte = total nats / ln 2 / UTF-8 bytes of the text. "
        "Files are read as `prepare` reads them: a line holding only <|endoftext|> ends a "
        "document (one end-of-text token between documents; the separator lines' bytes are "
        "not counted).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="text file(s), or a prepared data directory (its val.bin is used)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--window", type=int, default=None, metavar="W",
                   help="tokens per window: default the length the run was trained on "
                        "(train.seq_len), at most the model's max_seq_len")
    p.add_argument("--stride", type=int, default=None, metavar="N",
                   help="sliding-window evaluation: windows advance N tokens and only their "
                        "last N predictions are scored, so each has at least max_seq_len - N "
                        "tokens of context (standard perplexity); default: non-overlapping "
                        "windows (stride max_seq_len)")
    p.add_argument("--dtype", choices=PRECISIONS, default="fp32",
                   help="inference precision: fp32, bf16 (CPUs with avx512_bf16/amx, or "
                        "CUDA), int8 (dynamically quantized linear layers, CPU) or int8wo "
                        "(int8 weight-only linear layers, fp32 activations)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="evaluate at most this many tokens (from the start)")
    p.add_argument("--best", action="store_true", help="use best.safetensors")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto (default cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--max-unknown", type=float, default=0.01, metavar="SHARE",
                   help="refuse text when more than this share of its characters would become "
                   "the unknown token (default 0.01 = 1%%, the same rule as prepare)")
    p.set_defaults(func=run)


def window_plan(n_tokens: int, window: int, stride: int | None = None
                ) -> list[tuple[int, int, int]]:
    """Windows covering `n_tokens`, as (start, end, skip): the window holds tokens
    start..end-1 and its first `skip` predictions are not scored (earlier windows scored
    them). Every token after the first is scored exactly once.

    Window k starts at k * step with step = min(stride, window - 1); after the first window,
    only the last `step` predictions of each window are scored, so each is made from at
    least `window - stride` tokens of context. The default (None, or any stride >= window - 1)
    is non-overlapping scoring: windows that share one token, every prediction scored.
    """
    if n_tokens < 2:
        return []
    step = window - 1 if stride is None else min(stride, window - 1)
    plan: list[tuple[int, int, int]] = []
    start = 0
    while True:
        end = min(start + window, n_tokens)
        skip = 0 if start == 0 else window - step - 1
        if end - start - 1 > skip:
            plan.append((start, end, skip))
        if end == n_tokens:
            return plan
        start += step


@torch.no_grad()
def score_tokens(model: nn.Module, tokens: np.ndarray, batch_size: int,
                 device: torch.device, stride: int | None = None,
                 window: int | None = None) -> tuple[float, int]:
    """Sum of next-token losses (nats) over `tokens` and the number of predictions
    (windows of `window` tokens, default the model's max_seq_len, from `window_plan`)."""
    window = model.max_seq_len if window is None else window
    plan = window_plan(len(tokens), window, stride)
    total, count = 0.0, 0
    # full-length windows are batched; a shorter (final) window runs alone
    full = [w for w in plan if w[1] - w[0] == window]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[w] for w in plan if w[1] - w[0] != window]
    for group in groups:
        ids = torch.from_numpy(np.stack([tokens[s:e] for s, e, _ in group]).astype(np.int64))
        ids = ids.to(device)  # (B, T)
        logits = model(ids)[:, :-1].float()  # (B, T-1, V): position j predicts ids[:, j + 1]
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        scored = torch.arange(ids.size(1) - 1, device=device)[None, :] >= torch.tensor(
            [skip for _, _, skip in group], device=device)[:, None]  # (B, T-1)
        total += float(losses[scored].double().sum())
        count += int(scored.sum())
    return total, count


def load_eval_tokens(paths: list[str], tokenizer: Any, max_tokens: int | None,
                     run_dir: str | os.PathLike | None = None,
                     max_unknown: float = 0.01) -> tuple[np.ndarray, float, str, dict[str, Any]]:
    """Tokens of the text(s) -> (tokens, UTF-8 bytes they cover, description, unknowns).

    A prepared data dir gives its val.bin, checked first (`verify_dataset`: sizes, checksum,
    id range) and refused when it was made by another tokenizer than the run's (compared by
    content); its bytes come from meta.json's bytes_per_token. Text files are validated whole
    with `prepare`'s rule (`data.documents.text_problem`) and read into documents as `prepare`
    reads them (a line holding only `<|endoftext|>` ends a document; a .jsonl file's records'
    "text"), joined with the end-of-text token between documents; bytes are the documents'
    UTF-8 bytes, as in `prepare`'s bytes_per_token. `unknowns` = {"tokens", "characters",
    "fraction"}: the share of characters the tokenizer cannot represent, refused above
    `max_unknown`.
    """

    check_unknown_limit(max_unknown)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        d = Path(paths[0])
        meta = verify_dataset(d, splits=("val",))
        if int(meta["vocab_size"]) != tokenizer.vocab_size:
            raise UserError(f"vocab mismatch: {d} was tokenized with {meta['vocab_size']} "
                            f"tokens but the run's tokenizer has {tokenizer.vocab_size}; "
                            "evaluate on text files or on data prepared with the run's tokenizer")
        if run_dir is not None:
            check_tokenizer_match(Path(run_dir), d, meta, f"cannot evaluate on {d}")
        tokens = np.asarray(load_tokens_of(d))
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        recorded = meta.get("unknown") or {}
        unknowns = {"tokens": recorded.get("tokens"), "characters": meta.get("characters"),
                    "fraction": recorded.get("fraction")}
        return (tokens, len(tokens) * float(meta["bytes_per_token"]["val"]), f"{d} (val split)",
                unknowns)

    ids: list[int] = []
    n_bytes = 0
    n_chars = 0
    unk_id = tokenizer.unknown_token_id
    texts: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            raise UserError(f"{path} is a directory; pass one prepared data dir alone, or "
                            "text files")
        read_text(path)  # every byte checked: binary or invalid UTF-8 is refused
        for doc in file_documents(path):  # as `prepare` reads it: <|endoftext|> lines split
            texts.append(doc)
            if ids:
                ids.append(tokenizer.eos_token_id)
            ids.extend(tokenizer.encode(doc))
            n_bytes += len(doc.encode("utf-8"))
            n_chars += len(doc)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    unknown = 0 if unk_id is None else sum(1 for t in ids if t == unk_id)
    unknowns = {"tokens": unknown, "characters": n_chars,
                "fraction": unknown / n_chars if n_chars else 0.0}
    if n_chars and unknown > max_unknown * n_chars:
        raise UserError(unknown_message(", ".join(paths), unknown, n_chars, max_unknown,
                                        tokenizer, "".join(texts)[: 1 << 20], "--max-unknown")
                        .replace("prepare with a larger --vocab-size",
                                 "evaluate on text the run's data covers; a char tokenizer "
                                 "needs a run trained with a larger --vocab-size"))
    if max_tokens is not None and len(ids) > max_tokens:
        # Bytes scale with the kept fraction of tokens (exact for char tokenizers).
        n_bytes = n_bytes * max_tokens / len(ids)
        ids = ids[:max_tokens]
    return np.asarray(ids, dtype=np.int64), float(n_bytes), ", ".join(paths), unknowns


def load_tokens_of(data_dir: Path) -> np.ndarray:
    """The val split of a verified data directory."""

    return load_tokens(data_dir, "val")


def run(args: argparse.Namespace) -> int:
    """Score the text and print loss, perplexity and bits per byte."""

    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be >= 1")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens={args.max_tokens} must be >= 2")
    device = resolve_device(args.device, option="device")
    try:
        check_precision(args.dtype, device)
    except ValueError as exc:
        raise UserError(str(exc).replace("dtype=", "--dtype=")) from None
    model, tokenizer, run_cfg = load_run(args.run_dir, which="best" if args.best else "last",
                                         device=device)
    trained = run_cfg.seq_len if run_cfg is not None else model.max_seq_len
    window = trained if args.window is None else args.window
    if not 2 <= window <= model.max_seq_len:
        raise UserError(f"--window={window} must be in [2, max_seq_len={model.max_seq_len}] "
                        f"(the run was trained on windows of {trained})")
    if args.stride is not None and not 1 <= args.stride <= window:
        raise UserError(f"--stride={args.stride} must be in [1, window={window}]; smaller "
                        "strides give each prediction more context but cost window / stride "
                        "forward passes per window")
    model = prepare_model(model, args.dtype)
    tokens, n_bytes, desc, unknowns = load_eval_tokens(
        args.data, tokenizer, args.max_tokens, run_dir=args.run_dir,
        max_unknown=args.max_unknown)
    if len(tokens) < 2:
        raise UserError(f"{desc} has {len(tokens)} token(s); at least 2 are needed to score "
                        "a prediction")
    if int(tokens.max()) >= model.vocab_size:
        raise UserError(f"token id {int(tokens.max())} is outside the model's vocab "
                        f"({model.vocab_size}); the data was made with another tokenizer")
    check_eval_fits(args.batch_size, len(window_plan(len(tokens), window, args.stride)),
                    window, model.vocab_size, device)
    total, count = score_tokens(model, tokens, args.batch_size, device, args.stride, window)
    loss = total / count
    stride = args.stride if args.stride is not None and args.stride < window - 1 else None
    windows = (f"sliding windows of {window}, stride {stride} (context >= "
               f"{window - stride})" if stride else f"non-overlapping windows of {window}")
    result = {
        "run_dir": os.fspath(args.run_dir), "data": desc, "tokens": len(tokens),
        "predicted_tokens": count, "bytes": n_bytes, "loss": loss,
        "windows": windows, "window": window, "stride": stride, "dtype": args.dtype,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None,
        "unknown_tokens": unknowns["tokens"], "unknown_fraction": unknowns["fraction"],
    }
    if not math.isfinite(loss):
        warnings.warn(f"the loss of {args.run_dir} on {desc} is {loss} (not finite; null in "
                      "--json): its weights diverged in training; retrain it with a lower "
                      "--train.lr", stacklevel=1)
    if args.json:
        print(json_dumps(result))
    else:
        print(f"{'tokens':>10} {'loss':>8} {'ppl':>10} {'bpb':>7}  data")
        bpb = result["bits_per_byte"]
        print(f"{count:>10,} {loss:>8.4f} {result['perplexity']:>10.2f} "
              f"{(f'{bpb:.4f}' if bpb is not None else 'n/a'):>7}  {desc}")
        print(f"scored with {windows}, {args.dtype}")
        if unknowns["tokens"]:
            print(f"unknown: {unknowns['tokens']:,} characters "
                  f"({100 * (unknowns['fraction'] or 0):.3f}%) became the unknown token")
    return 0
