"""Corpus preparation: text -> train.bin / val.bin, tokenizer.json and meta.json.

Split (`prepare`): every document (a text file, a `<|endoftext|>`-separated part of one, or a
JSONL record) either goes to one split whole or is cut in two, its tail going to val. So val
is a fraction of the text as the user means it, whatever the sizes of the files.
  - `val_fraction=f` (default 0.1): a document larger than a tenth of f of the corpus ("large")
    is cut: its last f of characters go to val. The other ("small") documents go to val whole,
    in the order of their content hash, until f of their characters are in val. Val thus holds
    f of the characters, within a tenth of f, and a corpus of a few files of very different
    sizes gives val a tail of each; a corpus of many small documents (stories, records, source
    files) gives whole documents. Deterministic and independent of file order.
  - `val_tail=f`: the last f of the corpus characters go to val: with n characters in all
    (documents concatenated, separators not counted), val = chars[int(n * (1 - f)):], which is
    nanoGPT's split of tinyshakespeare for f=0.1 (`val = text[int(n * 0.9):]`). With several
    files this is the end of the last file(s); `prepare` warns when a file that is most of val
    is all in val (none of it trained on).
  - `val_sources=[...]`: these sources (files, directories, globs, as `sources`) are the val
    split, whole and as written; the training sources go to train whole (neither fraction
    applies; `val_tail` with them is an error). The tokenizer is trained on the training text
    only. A val file that a training directory or glob also matches is left out of training
    (meta.json's "split" names it under "excluded_from_train", and `prepare` prints it), so
    `prepare books/ --val-from books/frankenstein.txt` holds one book out; a file named
    explicitly as both a training and a val source is an error (say which one it is).
`meta.json`'s "split" records what was done (documents whole and cut, the val share of
characters); `prepare` prints it and warns when the share is lopsided (outside [f/2, 2f]).

Paragraph breaks (`vary_breaks`, on by default): a document that puts one paragraph per line
and has no blank line (`formatting.LineShape`: TinyStories' files, much generated or scraped
prose) gets, with probability 1/2 keyed by its content hash, a blank line after each line break
in the training split, so the model expects both formats and a text that separates paragraphs
with blank lines does not cost it much more (docs/RESULTS.md, section 6). Hard-wrapped prose,
code and the val split are never touched; meta.json's "paragraph_breaks" counts both.

In the token stream, documents of the same split are separated by one EOS token
(`<|endoftext|>`); there is no EOS before the first document or after the last one, so a
one-document corpus is exactly the tokens of its text.

Instruction data: a corpus of `.jsonl` prompt/completion or chat records (`data.instructions`)
is prepared whole-record: a record goes to one split (a record the split plan would cut goes to
val whole), each record is `prompt completion <|endoftext|>` in the token stream (no separator
of its own besides that end), and each split gets a loss mask (`data.tokens`: which tokens are
learned, where each record starts). meta.json's "loss_mask" counts the learned tokens and their
UTF-8 bytes; bits per byte of such a run are per byte of learned text. Plain text and
instruction records cannot be mixed in one dataset.

Output (`out_dir`): `train.bin`, `val.bin`, `tokenizer.json` and `meta.json`, built together in
a hidden sibling directory and renamed into place when all four are complete
(`artifacts.begin_stage` / `publish`), so a crash leaves the old directory or the new one, never
a mix. `out_dir` must be new, empty, or (with `force`) a prepared dataset; never a run or any
other directory, nor one of the inputs (`artifacts.check_output`). meta.json records the
dataset's identity (tokenizer content hash, each .bin file's size and sha256: `data.tokens`) and
the share of characters the tokenizer cannot represent (refused above `max_unknown`).
`bytes_per_token[split]` = UTF-8 bytes of the split's text / tokens in its .bin (EOS
separators included); bits per byte = loss_in_nats / ln(2) / bytes_per_token.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import microtransformer.tokenizer as vocab_rule  # its limit, read when the rule runs
from microtransformer import __version__
from microtransformer.artifacts import DATASET, begin_stage, check_output, discard, publish
from microtransformer.data.documents import Scan, iter_pieces, iter_records, scan_sources
from microtransformer.data.formatting import add_blank_lines, chosen
from microtransformer.data.sources import (
    DATASETS,
    STDLIB_DEFAULT_MAX_BYTES,
    Source,
    resolve_sources,
)
from microtransformer.data.tokens import (
    LOSS,
    SPLITS,
    START,
    MaskWriter,
    TokenWriter,
    dataset_id,
    mask_name,
    tokenizer_text_sha256,
)
from microtransformer.errors import UserError
from microtransformer.fileio import atomic_write_json
from microtransformer.tokenizer import (
    KINDS,
    Tokenizer,
    auto_vocab_size,
    min_vocab_size,
    train_tokenizer,
)

TOKENIZER_SAMPLE_CHARS = 200_000_000  # train the tokenizer on at most this many characters
META_VERSION = 2  # 2: "identity" and "unknown" (version 1 directories are still read)
MAX_UNKNOWN = 0.01  # refuse a corpus when more than this share of characters is unknown
BATCH_CHARS = 1 << 19  # characters per multithreaded encode_batch call (~200 B/token transient)


def prepare(
    sources: Sequence[str] | None,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str = "bpe",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    val_tail: float | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    text_field: str = "text",
    stdlib_max_bytes: int | None = STDLIB_DEFAULT_MAX_BYTES,
    tokenizer_sample_chars: int = TOKENIZER_SAMPLE_CHARS,
    progress: bool = True,
    force: bool = False,
    max_unknown: float = MAX_UNKNOWN,
    tokenizer_from: str | os.PathLike | None = None,
    vary_breaks: bool = True,
    val_sources: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Tokenize a corpus into `out_dir`/{train.bin, val.bin, tokenizer.json, meta.json}.

    `tokenizer` ("bpe" | "char") and `vocab_size` choose the tokenizer trained on the corpus (on
    its first `tokenizer_sample_chars` characters at most; `vocab_size=None` lets the training
    text's size choose, `tokenizer.auto_vocab_size`); `tokenizer_path` reuses an existing
    tokenizer.json instead (its kind and vocab size win). `val_tail`, when given, replaces the
    document split `val_fraction` (see the module docstring); `val_sources`, when given, are
    the val split whole and `sources` all go to train (`val_fraction` is then unused, `val_tail`
    an error; a val file inside a training directory or glob is left out of training). Memory
    stays bounded: files are streamed, encoded in batches with the multithreaded `tokenizers`
    encoder and appended to the .bin files. `vary_breaks`: half of the training documents that
    put one paragraph per line (chosen by a hash of their content) get a blank line after each
    line break, so that a model does not pay for blank lines it never saw (`data.formatting`;
    the val split and every other document stay as they are). The output is a pure function of
    the inputs (byte-identical when run again). Returns the meta dict also written to meta.json.
    """
    val_args = _check_val_sources(val_sources, val_tail)
    split_mode, fraction = (("val_sources", 0.0) if val_args
                            else _check_split_args(val_fraction, val_tail))
    if tokenizer_path is None and (tokenizer not in KINDS or (
        vocab_size is not None and vocab_size < min_vocab_size(tokenizer)
    )):  # fail before reading the corpus: this call raises the argument's UserError
        train_tokenizer([], kind=tokenizer, vocab_size=vocab_size)
    target = Path(out_dir)
    check_unknown_limit(max_unknown)
    check_output(target, command="prepare", makes=DATASET, replace=force)
    resolved = resolve_sources(sources, stdlib_max_bytes=stdlib_max_bytes)
    val_resolved: list[Source] = []
    excluded: list[Source] = []
    if val_args:
        val_resolved = resolve_sources(val_args, stdlib_max_bytes=stdlib_max_bytes)
        resolved, excluded = _separate_val_files(resolved, val_resolved)
    inputs = [s.path for s in (*resolved, *val_resolved)]  # tokenizer_path may lie in `target`
    check_output(target, command="prepare", makes=DATASET, replace=force, inputs=inputs)
    if val_args:
        train_scan = scan_sources(resolved, text_field, progress)
        val_scan = scan_sources(val_resolved, text_field, progress)
        scan = _join_scans(train_scan, val_scan)
    else:
        train_scan = scan = scan_sources(resolved, text_field, progress)
    n_docs = len(scan.doc_keys)
    instruction = scan.instruction_docs > 0
    if instruction and scan.instruction_docs != n_docs:
        raise UserError(f"the corpus mixes {scan.instruction_docs:,} instruction/chat records "
                        f"with {n_docs - scan.instruction_docs:,} plain-text documents; prepare "
                        "them into separate datasets (the instruction records need a loss mask)")
    if scan.chars == 0:
        raise UserError(
            f"the corpus is empty: {len(resolved)} file(s) gave no text; pass sources with text"
        )

    # --- split plan: where val starts inside each document that contributes to val
    if val_args:
        _check_val_sources_split(train_scan, val_scan, val_args)
        n_train = len(train_scan.doc_keys)
        val_from = dict.fromkeys(range(n_train, n_docs), 0)
    elif split_mode == "val_fraction":
        val_from = plan_fraction_split(scan.doc_chars, scan.doc_keys, fraction,
                                       cut_large=not instruction)
    else:
        val_from = plan_tail_split(scan.doc_chars, fraction)
    if instruction:  # records are never cut: a record with a val part goes to val whole
        val_from = dict.fromkeys(val_from, 0)
    val_chars = sum(scan.doc_chars[d] - start for d, start in val_from.items())
    if val_chars in (0, scan.chars):
        raise UserError(
            f"the corpus is too small to split: {scan.chars} characters with a val "
            f"{'tail' if val_tail is not None else 'fraction'} of {fraction} leaves an empty "
            "split; use a larger corpus or another fraction"
        )
    if val_args:
        split_note = _describe_val_sources(scan, val_from, val_chars, val_args, val_scan,
                                           excluded)
    else:
        split_note = _describe_split(scan, val_from, val_chars, split_mode, fraction)
    varied = (array("B", (flat and chosen(key) for flat, key in
                          zip(scan.paragraph_lines, scan.doc_keys, strict=True)))
              if vary_breaks and not instruction else array("B", bytes(n_docs)))

    # --- tokenizer: reuse or train (streaming, on a bounded sample)
    train_chars = train_scan.chars if val_args else scan.chars - val_chars
    vocab_limit = None
    if tokenizer_path is not None:
        tok = Tokenizer.load(tokenizer_path)
    else:
        vocab_limit = ({"asked": vocab_size, "by": "typed"} if vocab_size is not None else
                       {"asked": auto_vocab_size(tokenizer, train_chars), "by": "training text",
                        "small_text_chars": vocab_rule.SMALL_TEXT_CHARS})
        vocab_limit["train_characters"] = train_chars
        # the training text only: the val split never shapes the tokenizer
        sample = _take_chars((t for _, t in iter_pieces(train_scan.sources, text_field)),
                             tokenizer_sample_chars)
        tok = train_tokenizer(sample, kind=tokenizer, vocab_size=vocab_limit["asked"],
                              show_progress=False)

    # --- encode and write, into a hidden sibling that replaces `target` when complete
    out = begin_stage(target)
    writers = {s: TokenWriter(out / f"{s}.bin", tok.vocab_size) for s in SPLITS}
    masks = {mask_name(s): MaskWriter(out / mask_name(s)) for s in SPLITS} if instruction else {}
    for w in writers.values():
        w.unknown_id = tok.unknown_token_id
    text_bytes = dict.fromkeys(SPLITS, 0)
    learned_bytes = dict.fromkeys(SPLITS, 0)
    docs_in = dict.fromkeys(SPLITS, 0)  # documents (or parts of one) per split
    try:
        if instruction:
            _encode_records(tok, iter_records(scan.sources, text_field), val_from, writers,
                            {s: masks[mask_name(s)] for s in SPLITS}, text_bytes,
                            learned_bytes, docs_in, progress, scan.chars)
        else:
            _encode_documents(tok, iter_pieces(scan.sources, text_field), val_from, varied,
                              writers, text_bytes, docs_in, progress, scan.chars)
        for split in SPLITS:
            if writers[split].count == 0:
                raise UserError(
                    f"the corpus is too small for the split: the {split} split got no tokens "
                    f"({n_docs} document(s), {scan.chars} characters); use a larger corpus "
                    "or change --val-fraction / --val-tail / --val-from"
                )
        unknown = sum(w.unknown for w in writers.values())
        if unknown > max_unknown * scan.chars:
            message = unknown_message(
                f"the corpus ({', '.join(str(s.path) for s in scan.sources[:2])}"
                f"{', ...' if len(scan.sources) > 2 else ''})", unknown, scan.chars,
                max_unknown, tok, _sample_text(scan, text_field), "--max-unknown")
            if tokenizer_path is not None:  # a reused tokenizer (a parent's) cannot grow
                message = re.sub(r"prepare with a larger --vocab-size \(at least \d+\)|use a "
                                 r"tokenizer that covers this text", "the reused tokenizer "
                                 "cannot change (a model keeps its tokenizer)", message)
            elif val_args and tok.kind == "char":  # val-only characters are unknown to it
                message = message.replace(
                    "prepare with a larger --vocab-size", "the tokenizer learns from the "
                    "training sources only, so add training text that has them or prepare "
                    "with a larger --vocab-size")
            raise UserError(message)
        for w in (*writers.values(), *masks.values()):
            w.commit()
        tok.save(out / "tokenizer.json")
    except BaseException:
        for w in (*writers.values(), *masks.values()):
            w.abort()
        discard(out)
        raise

    meta = {
        "format_version": META_VERSION,
        "created_by": f"microtransformer {__version__}",
        "tokenizer": {"kind": tok.kind, "file": "tokenizer.json",
                      "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                      **({"from": str(Path(tokenizer_from).resolve())} if tokenizer_from
                         else {})},
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        **({"vocab_limit": vocab_limit} if vocab_limit else {}),
        "eos_token_id": tok.eos_token_id,
        "dtype": writers["train"].dtype.name,
        "tokens": {s: writers[s].count for s in SPLITS},
        "bytes": text_bytes,
        "bytes_per_token": {s: text_bytes[s] / writers[s].count for s in SPLITS},
        "documents": docs_in,
        "characters": scan.chars,
        "split": {"method": split_mode, **split_note},
        "paragraph_breaks": {"vary": vary_breaks and not instruction,
                             "one_paragraph_per_line": sum(scan.paragraph_lines),
                             "given_blank_lines": sum(1 for d, v in enumerate(varied)
                                                      if v and val_from.get(d) != 0)},
        "text_field": text_field,
        "sources": scan.records,
    }
    if instruction:
        meta["loss_mask"] = {
            "records": docs_in,
            "learned_tokens": {s: masks[mask_name(s)].learned for s in SPLITS},
            "learned_bytes": learned_bytes,
            "bytes_per_learned_token": {s: learned_bytes[s] / masks[mask_name(s)].learned
                                        for s in SPLITS}}
    examples = tok.unknown_characters(_sample_text(scan, text_field)) if unknown else []
    _publish_dataset(out, target, meta, tok, {**writers, **masks}, unknown, max_unknown,
                     examples)
    return meta


def _encode_documents(tok: Tokenizer, pieces: Iterator[tuple[int, str]],
                      val_from: dict[int, int], varied: array, writers: dict[str, TokenWriter],
                      text_bytes: dict[str, int], docs_in: dict[str, int], progress: bool,
                      chars: int) -> None:
    """Encode plain-text documents into the token writers, each piece routed to its split,
    documents of a split separated by one end-of-text token; the training text of a document
    flagged in `varied` gets blank lines between its lines (`formatting.add_blank_lines`)."""
    last_doc: dict[str, int | None] = dict.fromkeys(SPLITS)
    pos, current = 0, -1  # character offset of the current piece in its document
    carry = ""  # a line break that ended the last training piece of a varied document
    batch: list[tuple[str, int, str]] = []
    batch_chars = 0
    bar = tqdm(total=chars, unit="char", unit_scale=True, desc="tokenize",
               disable=None if progress else True)
    with bar:
        for doc, text in pieces:
            if doc != current:
                pos, current, carry = 0, doc, ""
            for split, part in _route(text, pos, val_from.get(doc)):
                if split == "train" and varied[doc]:
                    part, carry = add_blank_lines(part, carry)
                batch.append((split, doc, part))
                batch_chars += len(part)
            pos += len(text)
            if batch_chars >= BATCH_CHARS:
                _flush(tok, batch, writers, text_bytes, docs_in, last_doc)
                bar.update(batch_chars)
                batch, batch_chars = [], 0
        _flush(tok, batch, writers, text_bytes, docs_in, last_doc)
        bar.update(batch_chars)


def _encode_records(tok: Tokenizer, records: Iterator[tuple[int, list[tuple[str, bool]]]],
                    val_from: dict[int, int], writers: dict[str, TokenWriter],
                    masks: dict[str, MaskWriter], text_bytes: dict[str, int],
                    learned_bytes: dict[str, int], docs_in: dict[str, int], progress: bool,
                    chars: int) -> None:
    """Encode instruction records whole into their split: each piece on its own (the prompt's
    tokens are those `serve` would feed), then the learned end-of-text token; the mask marks
    learned tokens (LOSS) and each record's first token (START)."""
    backend = tok.backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    bar = tqdm(total=chars, unit="char", unit_scale=True, desc="tokenize",
               disable=None if progress else True)

    def flush(batch: list[tuple[int, list[tuple[str, bool]]]]) -> None:
        texts = [text for _, pieces in batch for text, _ in pieces]
        encodings = iter(encode(texts, add_special_tokens=False))
        for doc, pieces in batch:
            split = "val" if doc in val_from else "train"
            ids: list[int] = []
            bits: list[int] = []
            for text, learned in pieces:
                piece_ids = next(encodings).ids
                ids += piece_ids
                bits += [LOSS if learned else 0] * len(piece_ids)
                text_bytes[split] += len(text.encode("utf-8"))
                if learned:
                    learned_bytes[split] += len(text.encode("utf-8"))
            ids.append(tok.eos_token_id)  # learned: the model learns to stop
            bits.append(LOSS)
            bits[0] |= START
            writers[split].append(ids)
            masks[split].append(bits)
            docs_in[split] += 1
        bar.update(sum(len(text) for _, pieces in batch for text, _ in pieces))

    with bar:
        batch: list[tuple[int, list[tuple[str, bool]]]] = []
        batch_chars = 0
        for doc, pieces in records:
            batch.append((doc, pieces))
            batch_chars += sum(len(text) for text, _ in pieces)
            if batch_chars >= BATCH_CHARS:
                flush(batch)
                batch, batch_chars = [], 0
        flush(batch)


def _publish_dataset(out: Path, target: Path, meta: dict[str, Any], tok: Tokenizer,
                     writers: dict[str, TokenWriter | MaskWriter], unknown: int,
                     max_unknown: float, unknown_examples: list[str]) -> None:
    """Add the identity and unknown share to `meta`, write meta.json into the stage `out` and
    move it over `target`: all files appear at once (the stage is deleted on failure).
    `writers`: the token writers by split, and the mask writers by their file name."""
    try:
        tok_hash = tokenizer_text_sha256(tok.to_json())
        files = {w.path.name: {"bytes": w.path.stat().st_size, "sha256": w.sha256.hexdigest()}
                 for w in writers.values()}
        meta["identity"] = {
            "tokenizer_sha256": tok_hash, "files": files,
            "dataset_id": dataset_id(tok_hash, {k: v["sha256"] for k, v in files.items()})}
        meta["unknown"] = {"tokens": unknown, "fraction": unknown / max(meta["characters"], 1),
                           "limit": max_unknown, "examples": unknown_examples[:20]}
        atomic_write_json(out / "meta.json", meta, sort_keys=True)
        publish(out, target)
    except BaseException:
        discard(out)
        raise


def check_unknown_limit(value: float, flag: str = "--max-unknown") -> None:
    """UserError unless `value` is a share in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"{flag}={value} must be a share between 0 and 1, e.g. 0.01 (1%)")


def unknown_message(what: str, unknown: int, total: int, limit: float, tok: Tokenizer,
                    sample: str, flag: str) -> str:
    """The one-line refusal for text the tokenizer cannot represent (shared with `eval`)."""
    examples = tok.unknown_characters(sample)[:8]
    shown = ", ".join(repr(c) for c in examples) if examples else "see the text"
    fix = (f"prepare with a larger --vocab-size (at least {tok.vocab_size + len(examples)})"
           if tok.kind == "char" else "use a tokenizer that covers this text")
    return (f"{unknown:,} of {total:,} characters of {what} ({100 * unknown / max(total, 1):.2f}%)"
            f" are not in the {tok.kind} tokenizer's vocabulary of {tok.vocab_size} and would "
            f"become the unknown token (limit {100 * limit:g}%): {shown}; {fix}, or raise "
            f"{flag} to accept the loss")


def _sample_text(scan: Any, text_field: str, limit: int = 1 << 20) -> str:
    """The first `limit` characters of the corpus (to name the unknown characters)."""
    return "".join(_take_chars((t for _, t in iter_pieces(scan.sources, text_field)), limit))


def _check_split_args(val_fraction: float, val_tail: float | None) -> tuple[str, float]:
    name, value = ("val_tail", val_tail) if val_tail is not None else ("val_fraction", val_fraction)
    if not isinstance(value, (int, float)) or not 0 < value < 1 or math.isnan(value):
        raise UserError(f"{name}={value} must be between 0 and 1 (exclusive), e.g. 0.1")
    return name, float(value)


def _check_val_sources(val_sources: Sequence[str] | None, val_tail: float | None
                       ) -> list[str]:
    """The val sources as a list of strings ([] when none are given); UserError for a bad
    value or for `val_tail` given with them (two answers to "what is val")."""
    if val_sources is None:
        return []
    if isinstance(val_sources, (str, os.PathLike)):
        val_sources = [val_sources]
    args = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in val_sources]
    if not all(isinstance(v, str) and v for v in args):
        raise UserError(f"val_sources={args!r} must be a list of files, directories or globs")
    if args and val_tail is not None:
        raise UserError(f"val_sources={args} and val_tail={val_tail} both choose the val split; "
                        "pass one: the val sources are the whole val split (drop --val-tail), "
                        "or drop --val-from to hold out the corpus tail")
    return args


def _named_explicitly(source: Source) -> bool:
    """True when `source` came from an argument naming this one file (a path or a dataset
    name), not from a directory, a glob or the stdlib corpus."""
    return source.origin in DATASETS or Path(source.origin).expanduser().is_file()


def _separate_val_files(train: list[Source], val: list[Source]
                        ) -> tuple[list[Source], list[Source]]:
    """(training sources without the val files, the training sources left out because they
    are val files). A val file that a training directory or glob found is left out of
    training; one named explicitly as a training source too is a UserError."""
    val_paths = {s.path.resolve() for s in val}
    kept: list[Source] = []
    excluded: list[Source] = []
    for source in train:
        if source.path.resolve() not in val_paths:
            kept.append(source)
        elif _named_explicitly(source):
            raise UserError(f"{source.path} is both a training and a validation source; drop it "
                            "from one (the SOURCE list or --val-from)")
        else:
            excluded.append(source)
    if train and not kept:
        origins = ", ".join(sorted({s.origin for s in train}))
        raise UserError(f"no training files are left: every file of {origins} is a validation "
                        "source; pass training text besides the --val-from files")
    return kept, excluded


def _join_scans(train: Scan, val: Scan) -> Scan:
    """One scan of the training then the val sources (documents numbered in that order),
    each file's record marked with its split."""
    records = ([{**r, "split": "train"} for r in train.records]
               + [{**r, "split": "val"} for r in val.records])
    return Scan(train.sources + val.sources, train.doc_keys + val.doc_keys,
                train.doc_chars + val.doc_chars, train.chars + val.chars, records,
                train.instruction_docs + val.instruction_docs,
                train.paragraph_lines + val.paragraph_lines)


def _check_val_sources_split(train: Scan, val: Scan, val_args: Sequence[str]) -> None:
    """UserError when the training or the val sources give no text."""
    if train.chars == 0:
        raise UserError(f"the training sources are empty: {len(train.sources)} file(s) gave no "
                        "text; pass training text besides the --val-from files")
    if val.chars == 0:
        raise UserError(f"the validation sources {', '.join(val_args)} are empty: "
                        f"{len(val.sources)} file(s) gave no text; pass --val-from files with "
                        "text")


def _describe_val_sources(scan: Scan, val_from: dict[int, int], val_chars: int,
                          val_args: Sequence[str], val_scan: Scan, excluded: Sequence[Source]
                          ) -> dict[str, Any]:
    """meta.json's account of a split by `val_sources`."""
    return {"val_sources": list(val_args),
            "val_files": [str(s.path) for s in val_scan.sources],
            "excluded_from_train": [str(s.path) for s in excluded],
            "documents_whole_in_val": len(val_from), "documents_cut": 0,
            "val_share_of_chars": round(val_chars / scan.chars, 6)}


def _take_chars(texts: Iterator[str], limit: int) -> Iterator[str]:
    """Pass texts through until `limit` characters have been yielded (the last one is cut)."""
    left = limit
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


def plan_fraction_split(doc_chars: Sequence[int], doc_keys: Sequence[int],
                        fraction: float, *, cut_large: bool = True) -> dict[int, int]:
    """{document: character offset where its val part starts} for `val_fraction` (see the
    module docstring): large documents are cut at their last `fraction`, small ones go whole
    (offset 0) by content hash until `fraction` of the small documents' characters. With
    `cut_large` false every document counts as small (instruction records). Pure."""
    total = sum(doc_chars)
    # above this a document is cut, not held out whole
    large = fraction * total / 10 if cut_large else math.inf
    val_from: dict[int, int] = {}
    small: list[int] = []
    for d, n in enumerate(doc_chars):
        if n > large:
            val_from[d] = int(n * (1 - fraction))
        else:
            small.append(d)
    goal = fraction * sum(doc_chars[d] for d in small)
    taken = 0
    for d in sorted(small, key=lambda d: (doc_keys[d], d)):
        if taken >= goal:
            break
        val_from[d] = 0
        taken += doc_chars[d]
    return val_from


def plan_tail_split(doc_chars: Sequence[int], fraction: float) -> dict[int, int]:
    """{document: offset where its val part starts} for `val_tail`: the corpus' last
    `fraction` of characters, documents concatenated in order. Pure."""
    cut = int(sum(doc_chars) * (1 - fraction))
    val_from: dict[int, int] = {}
    start = 0
    for d, n in enumerate(doc_chars):
        if start + n > cut:
            val_from[d] = max(0, cut - start)
        start += n
    return val_from


def _describe_split(scan: Any, val_from: dict[int, int], val_chars: int, mode: str,
                    fraction: float) -> dict[str, Any]:
    """meta.json's account of the split, and a warning when it is lopsided."""
    whole = sum(1 for start in val_from.values() if start == 0)
    share = val_chars / scan.chars
    note = {"val_fraction" if mode == "val_fraction" else "val_tail": fraction,
            "documents_whole_in_val": whole, "documents_cut": len(val_from) - whole,
            "val_share_of_chars": round(share, 6)}
    problems = []
    if not fraction / 2 <= share <= 2 * fraction:
        problems.append(f"val holds {share:.1%} of the characters, asked for {fraction:.1%}")
    first = 0  # documents of each source, in order: a source that is most of val, none trained
    for record in scan.records:
        docs = range(first, first + record["documents"])
        first += record["documents"]
        size = sum(scan.doc_chars[d] for d in docs)
        if size > val_chars / 2 and all(val_from.get(d) == 0 for d in docs):
            problems.append(f"all of {record['path']} ({size / val_chars:.0%} of val) is "
                            "validation text, none of it trained on")
    if problems:
        warnings.warn("lopsided split: " + "; ".join(problems) + "; the default "
                      "--val-fraction holds out a part of every large file", stacklevel=3)
    return note


def _route(text: str, pos: int, val_start: int | None) -> list[tuple[str, str]]:
    """Which split(s) a piece at character `pos` of its document goes to, given where val
    starts in that document (None: nowhere)."""
    if val_start is None or pos + len(text) <= val_start:
        return [("train", text)]
    if pos >= val_start:
        return [("val", text)]
    return [("train", text[: val_start - pos]), ("val", text[val_start - pos:])]


def _flush(tok: Tokenizer, batch: list[tuple[str, int, str]], writers: dict[str, TokenWriter],
           text_bytes: dict[str, int], docs_in: dict[str, int], last_doc: dict[str, int | None]
           ) -> None:
    if not batch:
        return
    backend = tok.backend
    # encode_batch_fast (tokenizers >= 0.20) skips offsets: same ids, ~2x faster, less memory
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encodings = encode([t for _, _, t in batch], add_special_tokens=False)
    eos = tok.eos_token_id
    for (split, doc, text), enc in zip(batch, encodings, strict=True):
        ids = enc.ids
        if last_doc[split] != doc:
            if last_doc[split] is not None:
                ids = [eos, *ids]  # separator between two documents of this split
            docs_in[split] += 1
        last_doc[split] = doc
        writers[split].append(ids)
        text_bytes[split] += len(text.encode("utf-8"))


