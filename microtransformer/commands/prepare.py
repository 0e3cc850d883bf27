"""`microtransformer prepare SOURCE... --out DATA_DIR`: tokenize a corpus to train/val.bin."""

from __future__ import annotations

import argparse

from microtransformer.data import prepare
from microtransformer.errors import UserError
from microtransformer.finetune import parent_tokenizer

# Kept literal (not imported from microtransformer.data) so `--help` does not import torch;
# tests/microtransformer/test_cli_prepare.py checks they match the data module.
DATASET_NAMES = ("tinyshakespeare", "tinystories", "tinystories-train")
STDLIB_DEFAULT_MAX_BYTES = 8_000_000
MAX_UNKNOWN = 0.01
DEFAULT_VOCAB_SIZE = 5000  # and these two, for --help: microtransformer.tokenizer's
SMALL_TEXT_CHARS = 2_000_000
SMALL_TEXT_VOCAB = 2000


def register(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add the `prepare` subcommand to the CLI."""
    p = sub.add_parser(
        name, help=help_text, description=help_text,
        epilog="With no SOURCE the Python standard library's own source is the (offline) corpus.",
    )
    p.add_argument(
        "sources", nargs="*", metavar="SOURCE",
        help="files, directories, globs (.txt/.md/.py/.jsonl: {\"text\"}, {\"prompt\", "
        "\"completion\"} or {\"messages\"} records), 'stdlib', or a dataset name: "
        + ", ".join(DATASET_NAMES),
    )
    p.add_argument("--out", required=True, metavar="DATA_DIR",
                   help="output directory for train.bin, val.bin, tokenizer.json, meta.json")
    p.add_argument("--tokenizer", choices=["bpe", "char"], default="bpe",
                   help="byte-level BPE or character level (default: bpe)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="largest vocabulary to train (default: by the training text's size, "
                   f"BPE {SMALL_TEXT_VOCAB} under {SMALL_TEXT_CHARS:,} characters, else "
                   f"{DEFAULT_VOCAB_SIZE}: docs/RESULTS.md, section 17)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=None,
                       help="fraction of documents held out for validation (default: 0.1)")
    split.add_argument("--val-tail", type=float, default=None,
                       help="hold out the last fraction of the corpus characters instead")
    split.add_argument("--val-from", nargs="+", action="extend", default=None,
                       metavar="VAL_SOURCE",
                       help="files, directories or globs whose text is the whole val split, "
                       "never trained on (nor used to train the tokenizer); every SOURCE then "
                       "goes to train. Name the training SOURCEs first: `prepare train.txt "
                       "--val-from valid.txt --out DATA_DIR`. A val file inside a training "
                       "directory or glob is left out of training; one named as both is an error")
    reuse = p.add_mutually_exclusive_group()
    reuse.add_argument("--tokenizer-path", default=None, metavar="FILE",
                       help="reuse this tokenizer.json instead of training one")
    reuse.add_argument("--tokenizer-from", default=None, metavar="RUN_OR_MODEL_DIR",
                       help="tokenize with the tokenizer of this run or model directory (to "
                       "fine-tune it: `train --init-from` it on DATA_DIR); characters it "
                       "cannot encode are counted and named")
    p.add_argument("--vary-breaks", action=argparse.BooleanOptionalAction, default=True,
                   help="give half of the training documents that put one paragraph per line "
                   "(no blank line, long lines) a blank line after each line break, so that "
                   "blank lines between paragraphs do not cost the model (default: on; the val "
                   "split, hard-wrapped text and code are never changed)")
    p.add_argument("--text-field", default="text",
                   help="field holding the text in .jsonl records (default: text)")
    p.add_argument("--stdlib-max-bytes", type=int, default=STDLIB_DEFAULT_MAX_BYTES,
                   help="cap on the standard library corpus, in bytes of whole files "
                   f"(default: {STDLIB_DEFAULT_MAX_BYTES:,}; 0 = no cap)")
    p.add_argument("--force", action="store_true",
                   help="replace DATA_DIR when it already holds a prepared dataset (never any "
                   "other directory); the old one stays until the new one is complete")
    p.add_argument("--max-unknown", type=float, default=MAX_UNKNOWN, metavar="SHARE",
                   help="refuse the corpus when more than this share of its characters would "
                   f"become the unknown token (default {MAX_UNKNOWN:g} = {100 * MAX_UNKNOWN:g}%%)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare the data directory and print a short summary."""

    if args.val_from and not args.sources:
        raise UserError(f"--val-from {' '.join(args.val_from)} needs the training SOURCE(s) "
                        "too, named before it: `prepare TRAIN... --val-from VAL... --out "
                        "DATA_DIR` (pass `stdlib` to train on the standard library)")
    tokenizer_path = args.tokenizer_path
    if args.tokenizer_from is not None:
        tokenizer_path = parent_tokenizer(args.tokenizer_from)
    if args.vocab_size is not None and tokenizer_path is None:  # a tokenizer will be trained
        from microtransformer.tokenizer import vocab_size_problem

        problem = vocab_size_problem(args.tokenizer, args.vocab_size, "--vocab-size")
        if problem:
            raise UserError(problem)
    meta = prepare(
        args.sources,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
        val_tail=args.val_tail,
        tokenizer_path=tokenizer_path,
        tokenizer_from=args.tokenizer_from,
        text_field=args.text_field,
        stdlib_max_bytes=args.stdlib_max_bytes or None,
        force=args.force,
        max_unknown=args.max_unknown,
        vary_breaks=args.vary_breaks,
        val_sources=args.val_from,
    )
    n_files = len(meta["sources"])
    split = meta["split"]
    print(f"prepared {args.out}: {meta['kind']} tokenizer, vocab {meta['vocab_size']}, "
          f"{meta['dtype']}, {n_files} file(s)")
    limit = meta.get("vocab_limit")
    if limit and limit["by"] == "training text" and meta["kind"] == "bpe":
        small = limit["train_characters"] < limit["small_text_chars"]  # as prepare decided
        print(f"vocabulary limit {limit['asked']}: the training text has "
              f"{limit['train_characters']:,} characters, {'under' if small else 'at least'} "
              f"{limit['small_text_chars']:,}" + (" (a smaller vocabulary generalises better on "
                                                  "a small text)" if small else "")
              + "; --vocab-size N to choose")
    if split["method"] == "val_sources":
        print(f"val from {', '.join(split['val_files'])}: "
              f"{split['documents_whole_in_val']:,} document(s), whole and never trained on"
              + ("" if tokenizer_path else " (nor used to train the tokenizer)")
              + f"; val holds {split['val_share_of_chars']:.1%} of the characters")
        if split["excluded_from_train"]:
            print(f"left out of training (validation files inside a training source): "
                  f"{', '.join(split['excluded_from_train'])}")
    else:
        print(f"split by {split['method']} {split[split['method']]:g}: "
              f"{split['documents_whole_in_val']:,} document(s) whole in val, "
              f"{split['documents_cut']:,} cut (their tail in val); val holds "
              f"{split['val_share_of_chars']:.1%} of the characters")
    breaks = meta["paragraph_breaks"]
    if breaks["one_paragraph_per_line"]:
        print(f"paragraph breaks: {breaks['one_paragraph_per_line']:,} document(s) put one "
              "paragraph per line; " + (f"{breaks['given_blank_lines']:,} of them got blank "
                                        "lines between paragraphs in train (--no-vary-breaks: "
                                        "keep them as they are)" if breaks["vary"]
                                        else "kept as they are (--no-vary-breaks)"))
    for split in ("train", "val"):
        print(f"  {split:5s} {meta['tokens'][split]:>12,} tokens  "
              f"{meta['documents'][split]:>7,} docs  "
              f"{meta['bytes_per_token'][split]:.3f} bytes/token")
    if meta.get("loss_mask"):
        lm = meta["loss_mask"]
        print(f"  instruction records: {lm['records']['train']:,} train / "
              f"{lm['records']['val']:,} val; loss on {lm['learned_tokens']['train']:,} / "
              f"{lm['learned_tokens']['val']:,} learned tokens (completions, assistant "
              "replies and each record's end), prompts masked")
    unknown = meta["unknown"]
    whose = (f"the tokenizer of {args.tokenizer_from}" if args.tokenizer_from
             else "the tokenizer")
    if unknown["tokens"]:
        shown = ", ".join(repr(c) for c in unknown.get("examples", [])[:10])
        print(f"  unknown: {unknown['tokens']:,} characters ({100 * unknown['fraction']:.3f}%) "
              f"became the unknown token: {whose} cannot encode them"
              + (f" ({shown})" if shown else ""))
    elif args.tokenizer_from:
        print(f"  unknown: none ({whose} encodes every character)")
    return 0
