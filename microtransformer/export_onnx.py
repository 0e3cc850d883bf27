"""ONNX export: the full-sequence forward as a trace-friendly module, written with torch's exporter.

`export_onnx` writes inputs `input_ids` and (by default) `attention_mask`, output `logits`, with
dynamic batch and sequence axes; the file appears whole or not at all. Needs the `onnx` package
(and `onnxscript` for the dynamo exporter). docs/INTEROP.md has the parity checks.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from microtransformer.errors import UserError
from microtransformer.export import prepare_output
from microtransformer.export_checks import MIN_OPSET
from microtransformer.hub import unwrap_model

DEFAULT_OPSET = 17


class OnnxForward(nn.Module):
    """The full-sequence forward as a trace-friendly module: no data-dependent Python branches.

    With `attention_mask` (B, T) (1 = token, 0 = padding), positions count real tokens only and
    padding keys are masked, exactly as `MicroTransformer.forward` does; without it, plain causal
    attention over positions 0..T-1. Input checks (id range, lengths) are the caller's job.
    """

    def __init__(self, model: nn.Module, with_attention_mask: bool = True) -> None:
        super().__init__()
        self.model = unwrap_model(model)
        self.with_attention_mask = with_attention_mask

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        T = input_ids.shape[1]
        mask4d = None
        if self.with_attention_mask and attention_mask is not None:
            real = attention_mask.to(torch.bool)  # (B, T)
            positions = (real.to(torch.long).cumsum(-1) - 1).clamp(min=0)  # (B, T)
            idx = torch.arange(T, device=input_ids.device)
            causal = idx[None, :] <= idx[:, None]  # (T, T)
            eye = idx[None, :] == idx[:, None]  # (T, T): a padding row still sees itself
            mask4d = (causal[None, None] & real[:, None, None, :]) | eye  # (B, 1, T, T)
        else:
            positions = torch.arange(T, device=input_ids.device)[None, :]  # (1, T)
        x, rope = m.embed(input_ids, positions)  # (B, T, C); rope None or (B, 1, T, hs)
        for block in m.blocks:
            x = block(x, mask4d, rope=rope)
        return m.lm_head(m.ln_f(x))  # (B, T, V)


def export_onnx(model: nn.Module, out_path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                with_attention_mask: bool = True, force: bool = False,
                dynamo: bool = False) -> Path:
    """Export the full-sequence forward to ONNX: inputs `input_ids` (int64, (batch, seq)) and,
    by default, `attention_mask` (int64, same shape); output `logits` (float32,
    (batch, seq, vocab)). Batch and sequence axes are dynamic (seq <= max_seq_len).

    Uses the TorchScript-based exporter (`dynamo=False`) by default; `dynamo=True` uses the
    torch.export-based one (needs onnxscript).
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise UserError(f"--opset {opset} is too old: attention needs opset >= {MIN_OPSET}; "
                        f"use the default {DEFAULT_OPSET}")
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise UserError("ONNX export needs the onnx package: pip install onnx") from exc
    m = unwrap_model(model)
    out = prepare_output(out_path, force=force, kind="file")
    wrapper = OnnxForward(m, with_attention_mask).eval()
    T = min(8, m.config.max_seq_len)
    ids = torch.randint(0, m.config.vocab_size, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, : T // 2] = 0  # trace the padded path (no branch depends on it, but be explicit)
    args: tuple[torch.Tensor, ...] = (ids, mask) if with_attention_mask else (ids,)
    names = ["input_ids", "attention_mask"] if with_attention_mask else ["input_ids"]
    tmp = out.with_name(f".{out.name}.tmp")
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter deprecation/tracer chatter
            if dynamo:
                batch, seq = torch.export.Dim("batch"), torch.export.Dim(
                    "sequence", max=m.config.max_seq_len)
                shapes = {n: {0: batch, 1: seq} for n in names}
                torch.onnx.export(wrapper, args, str(tmp), input_names=names,
                                  output_names=["logits"], opset_version=opset, dynamo=True,
                                  dynamic_shapes=shapes, external_data=False)
            else:
                axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "logits"]}
                torch.onnx.export(wrapper, args, str(tmp), input_names=names,
                                  output_names=["logits"], opset_version=opset, dynamo=False,
                                  dynamic_axes=axes, do_constant_folding=True)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        m.train(was_training)
        if tmp.exists():
            tmp.unlink()
    return out
