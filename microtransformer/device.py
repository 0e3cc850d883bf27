"""Devices, compute dtypes, autocast and inference precision: the one place every command and
loop resolves them.

Depends on torch, `microtransformer.errors` and `microtransformer.quantization` only, so any
module may import it (the
training loop, the distributed runtime, the study, the CLI commands, the server).
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import warnings
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn
from torch.ao.quantization import quantize_dynamic

from microtransformer.errors import UserError
from microtransformer.quantization import quantize_int8_weights

ModuleT = TypeVar("ModuleT", bound=nn.Module)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def mps_available() -> bool:
    """True when Apple's MPS backend is built into this torch and usable."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def no_cuda_error(option: str = "train.device") -> UserError:
    """The one message for asking for CUDA on a machine without it."""
    return UserError(f"{option}='cuda' but no CUDA device is available; use "
                     f"--{option} cpu (or auto)")


def resolve_device(name: str, *, option: str = "train.device") -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; explicit names are checked.

    `option` is the flag named in the error message (e.g. "device" for `generate --device`).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise no_cuda_error(option)
    if name == "mps" and not mps_available():
        raise UserError(f"{option}='mps' but MPS is not available; use --{option} cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"{option}={name!r} is not a device torch knows ({exc}); use auto, "
                        "cpu, cuda, cuda:N or mps") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype for autocast: "auto" is bf16 on CUDA (fp16 if unsupported), fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast_context(device: torch.device | str, dtype: torch.dtype
                     ) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes (a no-op in float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype)


def default_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast for `dtype="auto"` on `device`: bf16 (or fp16) on CUDA, nothing elsewhere."""
    device = torch.device(device) if isinstance(device, str) else device
    return autocast_context(device, resolve_dtype("auto", device))


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(threads)` (None: unchanged), then restore."""
    if threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------- inference precision
PRECISIONS = ("fp32", "bf16", "int8", "int8wo")
CPUINFO = "/proc/cpuinfo"


def read_cpuinfo() -> str:
    """The text of `CPUINFO` (Linux's /proc/cpuinfo); "" where it cannot be read (not Linux)."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def cpuinfo_values(key: str, cpuinfo: str) -> list[str]:
    """The values of every `key : value` line of `cpuinfo` (one per logical CPU)."""
    return [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
            if ":" in line and line.split(":", 1)[0].strip() == key]


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The instruction-set flags the CPU lists (empty where /proc/cpuinfo cannot be read).

    cpuinfo: the text of /proc/cpuinfo (None: `read_cpuinfo()`).
    """
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    return frozenset(f for value in cpuinfo_values("flags", text) for f in value.split())


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name as `lscpu` prints it (e.g. "AMD EPYC 9R14"); the platform's
    processor string, or "unknown", where /proc/cpuinfo has none.

    cpuinfo: as for `cpu_flags`.
    """
    names = cpuinfo_values("model name", read_cpuinfo() if cpuinfo is None else cpuinfo)
    return names[0] if names else (platform.processor() or "unknown")


MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def matmul_flags(cpuinfo: str | None = None) -> list[str]:
    """Which of `MATMUL_FLAGS` the CPU has, sorted (MKL and oneDNN pick their kernels by them;
    compiled decode packages are keyed by them).

    cpuinfo: as for `cpu_flags`.
    """
    return sorted(cpu_flags(cpuinfo).intersection(MATMUL_FLAGS))


def describe_cpu(cpuinfo: str | None = None) -> str:
    """One line for a benchmark's header: model, logical CPUs and the flags that decide which
    matrix kernels run, e.g. "Intel(R) Xeon(R) Processor, 2 CPUs (avx2 avx512f amx_bf16)".

    cpuinfo: as for `cpu_flags` (the CPU count is this process's `os.cpu_count()`).
    """
    text = read_cpuinfo() if cpuinfo is None else cpuinfo  # read once for both fields
    listed = " ".join(matmul_flags(text)) or "none of " + "/".join(MATMUL_FLAGS)
    return f"{cpu_model(text)}, {os.cpu_count()} CPUs ({listed})"


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU's flags list native bf16 arithmetic (avx512_bf16 or amx_bf16).

    cpuinfo: as for `cpu_flags` (False where /proc/cpuinfo cannot be read).
    """
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def check_precision(precision: str, device: torch.device,
                    cpuinfo: str | None = None) -> None:
    """Raise ValueError naming the precision, what this machine lacks and the fix.

    precision: one of PRECISIONS; cpuinfo: as for `cpu_has_native_bf16`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"dtype={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16(cpuinfo):
        raise ValueError("dtype='bf16' needs a CPU with native bf16 (avx512_bf16 or amx_bf16 "
                         "in /proc/cpuinfo) or a CUDA device; this CPU has neither: use fp32 "
                         "or int8")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"dtype='int8' (dynamic quantization of the linear layers) runs on "
                         f"the CPU only, not on {device.type}: use --device cpu, or bf16")


def prepare_model(model: ModuleT, precision: str) -> ModuleT:
    """An eval-mode model for inference in `precision`: the model itself for fp32, a bf16
    copy, or a copy whose linear layers (the tied head included) are int8: "int8" dynamically
    quantized (`torch.ao.quantization.quantize_dynamic`: int8 weights, activations quantized
    per call), "int8wo" weight-only (`quantization.Int8WeightLinear`: int8 weights with
    per-row scales, fp32 activations; what the compiled decode step runs). Embeddings and
    LayerNorms stay fp32."""
    if precision == "fp32":
        return model.eval()
    if precision == "bf16":
        out = copy.deepcopy(model).to(torch.bfloat16).eval()
    elif precision == "int8":
        # The eager quantization API warns it will move to torchao; it stays because torchao's
        # int8 linear is slower eagerly on CPU (docs/PERFORMANCE.md, "Precision").
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear},
                                   dtype=torch.qint8)
    elif precision == "int8wo":
        return quantize_int8_weights(model)  # type: ignore[return-value]
    else:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    out.requires_grad_(False)
    return out
