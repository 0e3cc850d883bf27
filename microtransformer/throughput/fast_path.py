"""`prepare_for_gpu`: the settings that make a small model's training step fill a GPU.

What it does, each switchable (`FastPathSettings`), each recorded in `Prepared.notes`:
  - compute dtype: `train.dtype` resolved by `microtransformer.device` (bf16 autocast on CUDA);
  - TF32 for the fp32 matmuls left (`torch.backends.cuda.matmul.allow_tf32`, cuDNN too), CUDA
    only: the chunked loss runs its head matmul in fp32;
  - the loss: "chunked" (`MicroTransformer.loss`: head + cross-entropy in row chunks, fp32, no
    (B, T, V) logits) or "logits" (head under autocast, `F.cross_entropy` on the full logits in
    fp32, which torch.compile fuses); `LossHead` puts the choice behind the
    `model(input_ids, labels=...)` call the training step already makes;
  - `torch.compile` of that module (default on CUDA, off elsewhere), mode "default", or
    "reduce-overhead" when `cuda_graphs` is set (inductor records the compiled forward and
    backward as CUDA graphs and replays them); the compile time is measured on a warm-up step
    when an example shape is given (RNG state and gradients untouched), else it is paid by the
    first training step;
  - fused AdamW on CUDA (`adamw_options`).
A compile failure falls back to the eager module with the reason in the notes, as the training
loop's `--train.compile` does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from microtransformer.config import LOSS_KINDS
from microtransformer.device import autocast_context, resolve_dtype
from model.losses import lm_loss

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class FastPathSettings:
    """Choices of `prepare_for_gpu`; None means "the device's default"."""

    dtype: str = "auto"                 # auto | float32 | bfloat16 | float16
    compile: bool | None = None         # None: on for CUDA, off elsewhere
    compile_mode: str = "default"       # one of COMPILE_MODES
    cuda_graphs: bool = False           # CUDA only: compile mode "reduce-overhead"
    loss: str = "chunked"               # chunked | logits
    chunk_size: int = 128               # rows per chunk of the chunked loss
    fused_adamw: bool | None = None     # None: on for CUDA
    tf32: bool = True                   # CUDA only

    def __post_init__(self) -> None:
        problems = []
        if self.loss not in LOSS_KINDS:
            problems.append(f"loss={self.loss!r} must be one of {', '.join(LOSS_KINDS)}")
        if self.compile_mode not in COMPILE_MODES:
            problems.append(f"compile_mode={self.compile_mode!r} must be one of "
                            f"{', '.join(COMPILE_MODES)}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) \
                or self.chunk_size < 1:
            problems.append(f"chunk_size={self.chunk_size!r} must be an integer >= 1")
        if problems:
            raise ValueError("invalid fast-path settings: " + "; ".join(problems))


class LossHead(nn.Module):
    """`forward(input_ids, labels=None)`: the training loss with the chosen head + loss, or the
    model's logits without labels. Holds the model as `.model` (no parameters of its own)."""

    def __init__(self, model: nn.Module, loss: str = "chunked", chunk_size: int = 128) -> None:
        super().__init__()
        if loss not in LOSS_KINDS:
            raise ValueError(f"loss={loss!r} must be one of {', '.join(LOSS_KINDS)}")
        self.model = model
        self.loss_kind = loss
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        if labels is None:
            return self.model(input_ids)  # (B, T, V)
        if self.loss_kind == "chunked":
            return self.model.loss(input_ids, labels, chunk_size=self.chunk_size)
        return lm_loss(self.model(input_ids).float(), labels)  # fp32 CE on (B, T, V) logits


@dataclass
class Prepared:
    """What `prepare_for_gpu` built; `model(ids, labels=ids)` is the training step's call."""

    model: nn.Module                    # compiled (or eager) LossHead, maybe wrapped
    raw_model: nn.Module                # the parameters' owner (clip, save, evaluate)
    device: torch.device
    compute_dtype: torch.dtype
    compiled: bool
    compile_mode: str | None
    cuda_graphs: bool
    compile_seconds: float | None       # warm-up step time incl. compile; None if not measured
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # AdamW kwargs (fused)
    notes: list[str] = field(default_factory=list)

    def amp(self) -> contextlib.AbstractContextManager:
        """Autocast context for the forward pass (no-op in fp32)."""
        return autocast_context(self.device, self.compute_dtype)

    def step_begin(self) -> None:
        """Call before each micro-step's forward: with CUDA graphs it tells inductor a new
        iteration starts (the previous step's graph outputs may be overwritten)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def describe(self) -> str:
        """One line for the training log."""
        how = (f"torch.compile mode={self.compile_mode}" if self.compiled else "eager")
        if self.compile_seconds is not None:
            how += f" (warm-up step incl. compile {self.compile_seconds:.1f} s)"
        return (f"fast path: {self.device.type}, {str(self.compute_dtype).replace('torch.', '')}"
                f", {how}; " + "; ".join(self.notes))


def adamw_options(device: torch.device, fused: bool | None = None) -> dict[str, Any]:
    """Extra AdamW keyword arguments: `fused=True` on CUDA unless `fused` is False."""
    use = device.type == "cuda" if fused is None else fused
    if use and device.type != "cuda":
        raise ValueError(f"fused AdamW needs a CUDA device, not {device.type}")
    return {"fused": True} if use else {}


def make_adamw(params: Iterable[Any], device: torch.device, *, lr: float,
               betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1,
               fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `params` (tensors or groups) with `adamw_options`."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                             **adamw_options(device, fused))


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions (process-wide torch flags)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def resolve_compile(settings: FastPathSettings, device: torch.device
                    ) -> tuple[bool, str | None, bool, list[str]]:
    """(compile?, mode, CUDA graphs?, notes) for `settings` on `device`."""
    notes: list[str] = []
    compile_on = device.type == "cuda" if settings.compile is None else settings.compile
    graphs = settings.cuda_graphs
    if graphs and device.type != "cuda":
        notes.append("cuda_graphs ignored: not a CUDA device")
        graphs = False
    if graphs and not compile_on:
        notes.append("cuda_graphs turns torch.compile on (mode reduce-overhead)")
        compile_on = True
    if not compile_on:
        return False, None, False, notes
    mode = "reduce-overhead" if graphs else settings.compile_mode
    # inductor replays CUDA graphs in these two modes (CUDA devices only)
    graphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
    return True, mode, graphs, notes


def prepare_for_gpu(model: nn.Module, device: torch.device | str,
                    settings: FastPathSettings | None = None, *,
                    example_shape: tuple[int, int] | None = None,
                    wrap: Callable[[nn.Module], nn.Module] | None = None) -> Prepared:
    """Put `model` (a MicroTransformer, already on `device`) on the fast path.

    `wrap` is applied to the loss module before compiling (the training loop's DDP seam).
    `example_shape` (B, T) runs one forward + backward on zeros to compile now and time it
    (random state restored, gradients cleared). Returns a `Prepared`.
    """
    settings = settings or FastPathSettings()
    device = torch.device(device)
    dtype = resolve_dtype(settings.dtype, device)
    notes: list[str] = []
    if device.type == "cuda":
        set_tf32(settings.tf32)
        notes.append(f"TF32 {'on' if settings.tf32 else 'off'}")
    notes.append(f"loss {settings.loss}"
                 + (f" (chunks of {settings.chunk_size} rows)" if settings.loss == "chunked"
                    else ""))
    fused = adamw_options(device, settings.fused_adamw) if (
        settings.fused_adamw is not False) else {}
    notes.append("fused AdamW" if fused else "AdamW (for-each)")
    step_model: nn.Module = LossHead(model, settings.loss, settings.chunk_size)
    if wrap is not None:
        step_model = wrap(step_model)
    compile_on, mode, graphs, compile_notes = resolve_compile(settings, device)
    notes += compile_notes
    prepared = Prepared(step_model, model, device, dtype, False, None, False, None, fused,
                        notes)
    if not compile_on:
        return prepared
    try:
        compiled = torch.compile(step_model, mode=mode, dynamic=False)
        prepared.model, prepared.compiled = compiled, True
        prepared.compile_mode, prepared.cuda_graphs = mode, graphs
        if example_shape is not None:
            prepared.compile_seconds = _warm_up(prepared, example_shape)
    except Exception as exc:  # any compile/backend failure: train eagerly, say why
        model.zero_grad(set_to_none=True)
        prepared.model, prepared.compiled = step_model, False
        prepared.compile_mode, prepared.cuda_graphs, prepared.compile_seconds = None, False, None
        notes.append(f"torch.compile failed ({type(exc).__name__}: {exc}); eager")
    return prepared


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(prepared: Prepared, shape: tuple[int, int]) -> float:
    """One forward + backward on zeros; seconds taken (compile included). RNG restored."""
    device = prepared.device
    ids = torch.zeros(shape, dtype=torch.long, device=device)  # (B, T)
    cuda = [device.index or 0] if device.type == "cuda" else []
    _sync(device)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=cuda):
        prepared.step_begin()
        with prepared.amp():
            loss = prepared.model(ids, labels=ids)
        loss.backward()
    _sync(device)
    seconds = time.perf_counter() - start
    prepared.raw_model.zero_grad(set_to_none=True)
    return seconds
