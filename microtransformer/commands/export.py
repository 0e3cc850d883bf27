"""`microtransformer export RUN_DIR --format hf|onnx|gguf|web --out PATH`: share a trained model."""

from __future__ import annotations

import argparse

from microtransformer import export, export_onnx
from microtransformer.errors import UserError
from microtransformer.export_checks import check_export_output, check_opset
from microtransformer.export_gguf import export_gguf, gguf_architecture
from microtransformer.export_web import export_web
from microtransformer.hub import unwrap_model

# Kept literal (not imported from microtransformer.export) so `--help` does not import torch;
# tests/microtransformer/test_export.py checks they match the export modules.
FORMATS = ("hf", "onnx", "gguf", "web")
DEFAULT_OPSET = 17
QUANTS = ("f32", "f16", "q8_0")


def register(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add the `export` subcommand to the CLI."""
    p = sub.add_parser(
        name, help=help_text, description=help_text,
        epilog="hf: a GPT-2 directory for transformers.AutoModelForCausalLM / AutoTokenizer "
        "(no custom code). onnx: the full-sequence forward, dynamic batch and sequence axes. "
        "gguf: one file for llama.cpp, Ollama, LM Studio. web: a static page that generates in "
        "the browser with ONNX Runtime Web. See docs/INTEROP.md.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a training run directory (or a save_pretrained / import directory)")
    p.add_argument("--format", required=True, dest="fmt", metavar="FORMAT",
                   help=f"output format: {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="output directory (hf, web) or file (onnx: .onnx, gguf: .gguf)")
    p.add_argument("--best", action="store_true",
                   help="export best.safetensors (lowest validation loss) instead of the latest")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset version (onnx only; default {DEFAULT_OPSET}, minimum 14)")
    p.add_argument("--no-attention-mask", action="store_true",
                   help="onnx only: export input_ids as the only input (no padding support)")
    p.add_argument("--dynamo", action="store_true",
                   help="onnx only: use the torch.export-based exporter instead of the "
                   "TorchScript one (needs onnxscript)")
    p.add_argument("--quant", default=None, metavar="TYPE",
                   help=f"gguf only: matrix type, one of {', '.join(QUANTS)} (default f32; "
                   "q8_0 needs embed_dim and ff_dim multiples of 32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export the run and print where it went."""

    fmt = args.fmt.lower()
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {args.fmt!r}: use one of {', '.join(FORMATS)}")
    onnx_only = [flag for flag, on in (("--opset", args.opset is not None),
                                       ("--no-attention-mask", args.no_attention_mask),
                                       ("--dynamo", args.dynamo)) if on]
    if fmt != "onnx" and onnx_only:
        raise UserError(f"{', '.join(onnx_only)} only applies to --format onnx; drop it for "
                        f"--format {fmt}")
    if fmt != "gguf" and args.quant is not None:
        raise UserError(f"--quant only applies to --format gguf; drop it for --format {fmt}")
    if fmt == "gguf":
        _check_quant_name(args.quant or "f32")

    check_export_output(args.run_dir, fmt, args.out, force=args.force)
    if fmt == "onnx":
        check_opset(DEFAULT_OPSET if args.opset is None else args.opset, dynamo=args.dynamo,
                    default=DEFAULT_OPSET)
    model, tokenizer = export.load_for_export(args.run_dir, best=args.best)
    which = "best" if args.best else "latest"
    if fmt == "hf":
        if tokenizer is None:
            raise UserError(f"{args.run_dir} has no tokenizer.json; a Hugging Face export "
                            "needs one (copy the data directory's tokenizer.json into the run)")
        out = export.export_hf(model, args.out, tokenizer, force=args.force)
        kind = export.hf_architecture(unwrap_model(model).config)
        print(f"wrote Hugging Face {kind} directory {out} ({which} weights); load it with "
              f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    elif fmt == "gguf":
        quant = args.quant or "f32"
        out = export_gguf(model, args.out, tokenizer, quant=quant, force=args.force)
        arch = gguf_architecture(unwrap_model(model).config)
        print(f"wrote GGUF file {out} ({which} weights, {quant}, llama.cpp architecture {arch}); "
              f"run it with llama.cpp, e.g. llama-cli -m {out} -p 'Once upon a time'")
    elif fmt == "web":
        out = export_web(model, args.out, tokenizer, force=args.force)
        print(f"wrote web page {out} ({which} weights); serve the folder with any static file "
              f"host, e.g. python -m http.server -d {out}, and open index.html")
    else:
        out = export_onnx.export_onnx(
            model, args.out, opset=DEFAULT_OPSET if args.opset is None else args.opset,
            with_attention_mask=not args.no_attention_mask, force=args.force,
            dynamo=args.dynamo,
        )
        inputs = "input_ids" + ("" if args.no_attention_mask else ", attention_mask")
        print(f"wrote ONNX model {out} ({which} weights; inputs {inputs}; output logits; "
              f"sequence length <= {model.config.max_seq_len})")
    return 0


def _check_quant_name(quant: str) -> None:
    """Refuse an unknown --quant before the model is loaded."""

    if quant not in QUANTS:
        raise UserError(f"unknown --quant {quant!r}: use one of {', '.join(QUANTS)}")
