"""Inference precision on this machine: which precisions it can run, native bf16 from the CPU
flags, and the thread setting restored after a block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microtransformer import device
from microtransformer.device import check_precision, cpu_has_native_bf16, intra_op_threads


def test_precision_checks() -> None:
    cpu = torch.device("cpu")
    check_precision("fp32", cpu, cpuinfo="flags : avx2")
    check_precision("int8", cpu, cpuinfo="flags : avx2")
    check_precision("bf16", cpu, cpuinfo="flags : avx2 avx512_bf16")
    check_precision("bf16", cpu, cpuinfo="flags : amx_bf16 amx_tile")
    with pytest.raises(ValueError, match="avx512_bf16"):
        check_precision("bf16", cpu, cpuinfo="flags : avx2 avx512f")
    check_precision("bf16", torch.device("cuda"), cpuinfo="flags : avx2")  # no CPU needed
    with pytest.raises(ValueError, match="CPU only"):
        check_precision("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="fp16"):
        check_precision("fp16", cpu)


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse avx2 avx512f avx512_bf16 avx512_vnni", True),
    ("fpu sse avx2 amx_tile amx_bf16", True),
    ("fpu sse avx2 avx512f", False),
])
def test_cpu_native_bf16_from_cpuinfo_flags(flags: str, native: bool) -> None:
    info = f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert cpu_has_native_bf16(info) is native


def test_cpu_native_bf16_false_where_cpuinfo_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device, "CPUINFO", str(tmp_path / "missing"))
    assert cpu_has_native_bf16() is False
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: avx2 amx_bf16\n")
    monkeypatch.setattr(device, "CPUINFO", str(info))
    assert cpu_has_native_bf16() is True


def test_intra_op_threads_restores_the_setting() -> None:
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with intra_op_threads(None):
        assert torch.get_num_threads() == before
