"""What `export` and `import` check before they read a model: where they may write (the
rules of `artifacts.check_output`) and which ONNX opsets this torch can write."""

from __future__ import annotations

import os

from torch.onnx import _constants

from microtransformer.artifacts import FILE, HF, MODEL, WEB, check_output
from microtransformer.errors import UserError
from model import ModelConfig

MIN_OPSET = 14  # scaled_dot_product_attention needs opset >= 14


def max_onnx_opset(dynamo: bool) -> int:
    """The newest opset the chosen ONNX exporter of this torch writes."""

    if dynamo:
        return int(_constants.ONNX_MAX_OPSET)
    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET",
                       _constants.ONNX_MAX_OPSET))


def check_opset(opset: int, *, dynamo: bool, default: int) -> None:
    """UserError unless `opset` is one the exporter can write (the range and the fix)."""
    top = max_onnx_opset(dynamo)
    if not MIN_OPSET <= opset <= top:
        exporter = "dynamo" if dynamo else "TorchScript"
        raise UserError(f"--opset {opset} is outside what the {exporter} exporter of this torch "
                        f"writes ({MIN_OPSET}..{top}; attention needs opset >= {MIN_OPSET}); "
                        f"use the default {default} or a value in that range")


def check_export_output(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike, *,
                        force: bool) -> None:
    """`export` writes a new file or directory, or (with --force) replaces an export of the
    same kind; never its own run directory, a file in it, or another kind of artifact."""
    makes, suffix = {"onnx": (FILE, ".onnx"), "gguf": (FILE, ".gguf"), "web": (WEB, None)
                     }.get(fmt, (HF, None))
    check_output(out, command="export", makes=makes, inputs=[run_dir], replace=force,
                 suffix=suffix)


def check_import_output(hf_dir: str | os.PathLike, out: str | os.PathLike, *,
                        force: bool) -> None:
    """`import` writes a new or empty directory, or (with --force) replaces an imported model
    directory; never a training run, a dataset or its own source."""
    check_output(out, command="import", makes=MODEL, inputs=[hf_dir], replace=force)


def check_seed_architecture(config: ModelConfig, target: str) -> None:
    """UserError when `config` uses an opt-in architecture variant (`ModelConfig.variants`)
    that `target` cannot hold (callers pass the config with the variants their format does
    hold set back to the seed's); the message names the options that train without them."""
    if config.variants:
        seed = ModelConfig()
        names = [v.split("=", 1)[0] for v in config.variants]
        without = " ".join(f"--model.{n} {str(getattr(seed, n)).lower()}" for n in names)
        raise UserError(
            f"{target} cannot hold this model's {', '.join(config.variants)} (the format has "
            f"no such layer); export it with --format onnx or --format web, or train the model "
            f"without it ({without})")
