"""Measurements of a trained model: loss by context position, peak memory, throughput.

Loss by position: with windows of T + 1 tokens, position p (1..T) is the prediction of token p + 1
from p tokens of context; its loss is averaged over all val windows. The mean over positions is
the ordinary mean loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from microtransformer.config import TrainConfig
from microtransformer.device import default_autocast
from microtransformer.training import RuntimeContext, StepParts, build_optimizer, train_step
from model import MicroTransformer, ModelConfig

BUCKET = 32  # width of the early / late loss-by-position buckets


@torch.no_grad()
def loss_by_position(model: nn.Module, windows: Iterable[torch.Tensor], device: str = "cpu"
                     ) -> torch.Tensor:
    """Mean next-token loss at each context position, over all windows.

    Each window is a LongTensor (B, T + 1); position p (1..T, index p - 1) predicts token p + 1
    from the first p tokens. Returns a float64 tensor (T,); its mean is the window-mean loss.
    """
    was_training = model.training
    model.eval()
    total: torch.Tensor | None = None
    count = 0
    try:
        for ids in windows:
            ids = ids.to(device)
            inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T), (B, T)
            with default_autocast(device):
                logits = model(inputs)  # (B, T, V)
            loss = F.cross_entropy(logits.float().transpose(1, 2), targets,
                                   reduction="none")  # (B, T)
            part = loss.double().sum(0).cpu()  # (T,)
            total = part if total is None else total + part
            count += ids.size(0)
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError("loss_by_position needs at least one window")
    return total / count


def position_buckets(per_pos: Sequence[float], width: int = BUCKET) -> dict[str, float]:
    """Mean loss of the first and last `width` positions (1-indexed names, e.g. '1-32')."""
    n = len(per_pos)
    if n < 2 * width:
        raise ValueError(f"need at least {2 * width} positions for buckets of {width}, got {n}")
    early = sum(per_pos[:width]) / width
    late = sum(per_pos[-width:]) / width
    return {"early": early, "late": late, "early_range": f"1-{width}",
            "late_range": f"{n - width + 1}-{n}"}


def smooth_positions(per_pos: Sequence[float], width: int = 8) -> tuple[list[float], list[float]]:
    """(bucket centre positions, bucket means) for plotting: consecutive buckets of `width`."""
    xs, ys = [], []
    for start in range(0, len(per_pos), width):
        chunk = per_pos[start:start + width]
        xs.append(start + (len(chunk) + 1) / 2)
        ys.append(sum(chunk) / len(chunk))
    return xs, ys


def block_grad_norms(model: MicroTransformer, input_ids: torch.Tensor) -> list[float]:
    """The gradient norm of each block's parameters for one batch's loss; input_ids (B, T).

    At initialisation this shows whether gradients shrink with depth (the seed's "vanishing
    gradients" concern for deep models). Index 0 is the block nearest the input.
    """
    model.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=input_ids)
    loss.backward()
    norms = [math.sqrt(sum(float(p.grad.pow(2).sum()) for p in block.parameters()
                           if p.grad is not None)) for block in model.blocks]
    model.zero_grad(set_to_none=True)
    return norms


def generation_speed(model: MicroTransformer, prompt: torch.Tensor, new_tokens: int, *,
                     seed: int, device: str, repeats: int = 3) -> tuple[float, torch.Tensor]:
    """(tokens/s per sequence, last output) of KV-cache sampling from `prompt` (B, T0),
    temperature 0.8, top-k 50: the fastest of `repeats` (robust to other load on the machine).
    Tokens/s counts the new tokens of one sequence, so batch 8 at the same speed does 8x the
    work."""
    gen = torch.Generator(device=device).manual_seed(seed)
    best = math.inf
    out = prompt
    for _ in range(repeats):
        gen.manual_seed(seed)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():  # fp32: the KV cache keeps the model's dtype
            out = model.generate(prompt, max_new_tokens=new_tokens, temperature=0.8, top_k=50,
                                 generator=gen)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return new_tokens / best, out


class PeakMemory:
    """Peak memory of the code run inside: CUDA max allocated, or on CPU (Linux) the growth of
    this process's RSS high-water mark (VmHWM, reset on entry) over its RSS at entry. The CPU
    figure includes allocator caching; compare runs, not bytes."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.mb: float = float("nan")
        self.kind = "cuda_max_allocated" if device == "cuda" else "rss_high_water_growth"

    @staticmethod
    def _status_mb(field_name: str) -> float:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
        return float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            # "5" resets VmHWM to the current RSS (Linux); elsewhere the figure is the peak so far
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        self._base = self._status_mb("VmRSS")
        return self

    def __exit__(self, *_: Any) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.mb = max(0.0, self._status_mb("VmHWM") - self._base)


def measure_throughput(config: ModelConfig, *, vocab_size: int, seq_len: int, batch_size: int,
                       device: str, steps: int = 5) -> float:
    """Training tokens/s of a config on windows of `seq_len` tokens (random tokens,
    `training.train_step`), for planning.

    Uses the fastest of `steps` timed steps after two warm-up steps: on a shared machine the
    minimum is the reproducible figure (other processes only ever slow a step down)."""

    torch.manual_seed(0)
    model = MicroTransformer.from_config(replace(config, vocab_size=vocab_size,
                                                 dropout=0.0)).to(device)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)  # (B, T)
    tc = TrainConfig(batch_size=batch_size, device=device)
    opt = build_optimizer(model, tc, torch.device(device))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ctx = RuntimeContext(device=torch.device(device))

    def step() -> None:
        parts = StepParts(model, model, opt, amp=lambda: default_autocast(device))
        train_step(parts, lambda: batch, tc, ctx)

    step()  # warm-up (allocations, kernels)
    step()
    best = math.inf
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return batch_size * seq_len / best


