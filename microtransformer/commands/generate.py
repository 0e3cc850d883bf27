"""`microtransformer generate`: sample text from a trained run, streaming to the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import torch

from microtransformer.checkpoint import check_finite_weights, load_run
from microtransformer.decoding.generator import AutoPathGenerator
from microtransformer.device import PRECISIONS, check_precision, resolve_device
from microtransformer.errors import UserError
from microtransformer.memory import check_generation_fits
from model.sampling import validate_sampling_args

REPLACEMENT_CHAR = "\ufffd"


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add the `generate` subcommand."""
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory")
    p.add_argument("--prompt", default="",
                   help="text to continue (empty: start from the end-of-text token)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling: smallest set with this probability mass (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide logits of tokens already present (e.g. 1.1); default off")
    p.add_argument("--seed", type=int, default=None, help="random seed (reproducible samples)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to draw")
    p.add_argument("--best", action="store_true",
                   help="use best.safetensors (best val loss) instead of the last weights")
    p.add_argument("--no-stream", action="store_true",
                   help="print each sample when complete instead of token by token")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto (default cpu)")
    p.add_argument("--dtype", choices=PRECISIONS, default="fp32",
                   help="inference precision: fp32 (exact), bf16 (CPUs with avx512_bf16/amx, "
                        "or CUDA), int8 (dynamically quantized linear layers, CPU, eager) or "
                        "int8wo (int8 weight-only linear layers: the fastest compiled step at "
                        "batch 1)")
    p.add_argument("--no-compile", action="store_true",
                   help="always decode eagerly (by default the decode step is compiled ahead "
                        "of time once per model shape, batch size and precision, cached on "
                        "disk and loaded in milliseconds after; see docs/PERFORMANCE.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads while decoding (default: 1 on the compiled step, torch's "
                        "on the eager one)")
    p.set_defaults(func=run)


class StreamPrinter:
    """Streamer for `model.generate`: prints the text of each new token as it arrives.

    Byte-level BPE can split one character over several tokens, so the whole sequence is decoded
    each time and only the new suffix is printed; trailing replacement characters (an incomplete
    multi-byte character) are held back until the next token completes them or `finish()`.
    """

    def __init__(self, tokenizer: object, prompt_ids: list[int], out: TextIO) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.out = out
        self.printed = tokenizer.decode(self.ids)

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))  # tokens: (B,) with B == 1
        self._emit(self.tokenizer.decode(self.ids).rstrip(REPLACEMENT_CHAR))

    def finish(self) -> str:
        """Print what is left and return the full decoded text."""
        text = self.tokenizer.decode(self.ids)
        self._emit(text)
        return text

    def _emit(self, text: str) -> None:
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


def unknown_characters(tokenizer: Any, text: str) -> list[str]:
    """Characters of `text` a char tokenizer does not know (each once, in order of first
    appearance); always empty for byte-level BPE, which knows every byte."""
    if getattr(tokenizer, "kind", None) != "char":
        return []
    vocab = tokenizer.backend.get_vocab()
    return list(dict.fromkeys(c for c in text if c not in vocab))


def check_args(args: argparse.Namespace) -> None:
    """Every flag that can be checked without the run; raises UserError naming them all."""

    problems = []
    if args.max_new_tokens < 0:
        problems.append(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
    if args.num_samples < 1:
        problems.append(f"--num-samples={args.num_samples} must be >= 1")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads={args.threads} must be >= 1 (or left out: all cores)")
    try:
        validate_sampling_args(args.temperature, args.top_k, args.top_p,
                               args.repetition_penalty)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise UserError("; ".join(problems))


def run(args: argparse.Namespace) -> int:
    """Validate everything, load the run, encode the prompt, then sample `--num-samples`
    continuations through the fastest exact path (`decoding.generator.AutoPathGenerator`)."""

    check_args(args)
    device = resolve_device(args.device, option="device")
    try:
        check_precision(args.dtype, device)
    except ValueError as exc:
        raise UserError(str(exc).replace("dtype=", "--dtype=")) from None
    model, tokenizer, _ = load_run(args.run_dir, which="best" if args.best else "last",
                                   device=device)
    prompt_ids = tokenizer.encode(args.prompt) if args.prompt else []
    if len(prompt_ids) > model.max_seq_len:
        raise UserError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context (max_seq_len) is "
            f"{model.max_seq_len}; shorten the prompt to at most {model.max_seq_len} tokens"
        )
    unknown = unknown_characters(tokenizer, args.prompt)
    if unknown:
        count = sum(args.prompt.count(c) for c in unknown)
        print(f"warning: {count} character(s) of the prompt are not in the char tokenizer's "
              f"vocabulary and become the unknown token: {', '.join(map(repr, unknown))}",
              file=sys.stderr)
    check_generation_fits(args.num_samples, len(prompt_ids), args.max_new_tokens, device)
    start = prompt_ids or [tokenizer.eos_token_id]
    check_finite_weights(model, args.run_dir, probe_ids=start)
    input_ids = torch.tensor([start], dtype=torch.long, device=device)  # (1, T0)
    fast = AutoPathGenerator(model, precision=args.dtype, compile=not args.no_compile,
                             threads=args.threads, expected_calls=args.num_samples)
    if fast.plan(1, input_ids.size(1), args.max_new_tokens) == "compiled":
        fast.decoder(1)  # compile or load it now, so its note is not printed inside the text
    # the serve engine reproduces --seed S with exactly this generator
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed if args.seed is not None else torch.seed())
    greedy = args.temperature == 0
    out = sys.stdout
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\n")
        printer = StreamPrinter(tokenizer, prompt_ids, out)
        out.write(printer.printed)
        out.flush()
        generated = fast.generate(
            input_ids, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None, top_p=args.top_p, do_sample=not greedy,
            repetition_penalty=args.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
            generator=generator, streamer=None if args.no_stream else printer,
        )  # (1, T0 + new)
        if args.no_stream:
            printer.ids = list(prompt_ids) + generated[0, len(start):].tolist()
        printer.finish()
        out.write("\n")
        out.flush()
    return 0
