"""`microtransformer import HF_DIR --out RUN_DIR`: a GPT-2 Hugging Face directory as a run."""

from __future__ import annotations

import argparse

from microtransformer.export import import_hf_to_run
from microtransformer.export_checks import check_import_output
from microtransformer.hub import read_model_config


def register(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add the `import` subcommand to the CLI."""
    p = sub.add_parser(
        name, help=help_text, description=help_text,
        epilog="The source must be expressible by MicroTransformer: exact 'gelu' or 'relu2', "
        "LayerNorm eps 1e-5, and a head equal to the input table / sqrt(width) (what `export "
        "--format hf` writes); GPT-NeoX only with a sequential residual and full rotary at "
        "base 10000. See docs/INTEROP.md.",
    )
    p.add_argument("hf_dir", metavar="HF_DIR",
                   help="directory with config.json (model_type gpt2 or gpt_neox), "
                   "model.safetensors and tokenizer.json")
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run directory to write (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--force", action="store_true", help="overwrite files in an existing RUN_DIR")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="import the weights even if HF_DIR has no tokenizer.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert and print a one-line summary."""

    check_import_output(args.hf_dir, args.out, force=args.force)
    out = import_hf_to_run(args.hf_dir, args.out, force=args.force,
                           require_tokenizer=not args.no_tokenizer)
    cfg = read_model_config(out)
    print(f"wrote run directory {out}: {cfg.num_layers} layers, embed_dim {cfg.embed_dim}, "
          f"{cfg.num_heads} heads, vocab {cfg.vocab_size}, context {cfg.max_seq_len}")
    return 0
