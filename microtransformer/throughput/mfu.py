"""Model FLOPs utilisation: training tokens/s -> achieved FLOP/s -> % of the card's bf16 peak.

FLOPs per trained token (multiply-add = 2 FLOPs), from `model.utils.flops_per_token`:
    forward  F(T) = 2 * (L * (4 d^2 + 2 d f) + V d)   matmul weights: QKV, attention output,
                                                       two feed-forward layers, the tied head
                  + 4 * L * T * d                      attention scores and weighted sum over
                                                       the full T x T (not halved for causality)
    training 3 * F(T) = 6 * N_matmul + 12 * L * T * d  backward = 2x forward

(the PaLM / nanoGPT convention; embedding lookups, norms, softmax and the optimizer are not
counted). MFU = tokens/s * 3 * F(T) / peak, with the peak the card's dense (no sparsity) bf16
tensor-core throughput from `PEAK_BF16_DENSE`. A card not in the table, or a CPU, has no MFU
(None) and `format_mfu` says why rather than guessing a peak.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from model import ModelConfig
from model.utils import flops_per_token

# Dense bf16 tensor-core peaks (FLOP/s), the vendors' datasheet figures halved where the sheet
# quotes "with sparsity":
#   H100 SXM5 1,979 TF sparse -> 989; H100 PCIe 1,513 -> 756; H100 NVL 1,671 -> 835
#     (NVIDIA H100 Tensor Core GPU datasheet);
#   H200 SXM 1,979 -> 989; H200 NVL 1,671 -> 835 (NVIDIA H200 datasheet); GH200 as H100 SXM;
#   A100 (SXM and PCIe) 312 dense (NVIDIA A100 datasheet);
#   L4 242 sparse -> 121 (NVIDIA L4 datasheet); L40S 733 -> 366 (NVIDIA L40S datasheet);
#   A10 250 -> 125 (NVIDIA A10 datasheet);
#   GeForce RTX 4090 165.2 dense with FP32 accumulate (NVIDIA Ada Lovelace architecture
#     whitepaper, appendix table); RTX 3090 71 dense with FP32 accumulate (NVIDIA Ampere GA102
#     whitepaper). torch's bf16 matmuls accumulate in FP32, hence those figures.
# Each key is a set of tokens that must all appear in torch.cuda.get_device_name() (split on
# anything not a letter or digit, upper-cased); the first matching row wins, so the more
# specific rows come first.
PEAK_BF16_DENSE: tuple[tuple[frozenset[str], str, float], ...] = (
    (frozenset({"H100", "NVL"}), "H100 NVL", 835e12),
    (frozenset({"H100", "PCIE"}), "H100 PCIe", 756e12),
    (frozenset({"H100"}), "H100 SXM", 989e12),
    (frozenset({"GH200"}), "GH200", 989e12),
    (frozenset({"H200", "NVL"}), "H200 NVL", 835e12),
    (frozenset({"H200"}), "H200 SXM", 989e12),
    (frozenset({"A100"}), "A100", 312e12),
    (frozenset({"L40S"}), "L40S", 366e12),
    (frozenset({"L4"}), "L4", 121e12),
    (frozenset({"A10"}), "A10", 125e12),
    (frozenset({"RTX", "4090"}), "RTX 4090", 165.2e12),
    (frozenset({"RTX", "3090"}), "RTX 3090", 71e12),
)


def _tokens(device_name: str) -> set[str]:
    return {t for t in re.split(r"[^A-Za-z0-9]+", device_name.upper()) if t}


def peak_bf16_flops(device_name: str) -> tuple[str, float] | None:
    """(table row name, dense bf16 FLOP/s) of a CUDA device name, or None if unknown."""
    tokens = _tokens(device_name)
    for needed, row, peak in PEAK_BF16_DENSE:
        if needed <= tokens:
            return row, peak
    return None


def train_flops_per_token(config: ModelConfig | dict[str, Any], seq_len: int) -> int:
    """FLOPs of one trained token (forward + backward = 3x forward, attention included)."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    return 3 * flops_per_token(config, seq_len=seq_len)


@dataclass(frozen=True)
class MFU:
    """Achieved training FLOP/s and its share of the device's dense bf16 peak."""

    tokens_per_s: float
    flops_per_token: int        # training FLOPs per token (3x forward)
    achieved_flops: float       # tokens_per_s * flops_per_token
    device_name: str
    peak_name: str | None       # the PEAK_BF16_DENSE row used, None when unknown
    peak_flops: float | None
    mfu: float | None           # achieved / peak in [0, ...), None without a peak
    note: str                   # why mfu is None, else ""


def compute_mfu(tokens_per_s: float, config: ModelConfig | dict[str, Any], seq_len: int,
                device_name: str) -> MFU:
    """MFU of a training run at `tokens_per_s` on `device_name` ("cpu" or a CUDA name)."""
    if not tokens_per_s >= 0:
        raise ValueError(f"tokens_per_s={tokens_per_s} must be >= 0")
    fpt = train_flops_per_token(config, seq_len)
    achieved = tokens_per_s * fpt
    found = None if device_name.lower() in ("cpu", "mps") else peak_bf16_flops(device_name)
    if found is None:
        why = ("no bf16 peak for CPU/MPS devices" if device_name.lower() in ("cpu", "mps")
               else f"{device_name!r} is not in the peak table (microtransformer/throughput/"
                    "mfu.py PEAK_BF16_DENSE); add its dense bf16 datasheet figure")
        return MFU(tokens_per_s, fpt, achieved, device_name, None, None, None, why)
    row, peak = found
    return MFU(tokens_per_s, fpt, achieved, device_name, row, peak, achieved / peak, "")


def run_mfu(global_tokens_per_s: float, world_size: int, config: ModelConfig | dict[str, Any],
            seq_len: int, device: Any) -> MFU:
    """MFU of one rank of a (data-parallel) run whose processes together reach
    `global_tokens_per_s`: the one place the training loop's log and the command's summary
    get it from."""
    return compute_mfu(global_tokens_per_s / world_size, config, seq_len, device_name(device))


def device_name(device: Any) -> str:
    """Name used for the peak lookup: torch.cuda.get_device_name on CUDA, else the type."""

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def format_mfu(m: MFU) -> str:
    """One log line, e.g. 'MFU 5.1% (3.03 TFLOP/s of H100 SXM 989 dense bf16; 3x(2N+4LTd))'."""
    achieved = f"{m.achieved_flops / 1e12:.3g} TFLOP/s"
    if m.mfu is None:
        return f"MFU n/a ({achieved} achieved; {m.note})"
    return (f"MFU {100 * m.mfu:.1f}% ({achieved} of {m.peak_name} {m.peak_flops / 1e12:.0f} "
            f"TFLOP/s dense bf16; {m.flops_per_token / 1e6:.2f} MFLOP/token = "
            "3x(2N_matmul + 4LTd))")
