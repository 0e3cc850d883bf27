"""Devices, compute dtypes and autocast: the one place every command and loop resolves them.

Depends on torch and `microtransformer.errors` only, so any module may import it (the
training loop, the distributed runtime, the study, the CLI commands, the server).
"""

from __future__ import annotations

import contextlib

import torch

from microtransformer.errors import UserError

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
