"""Inference precision on this machine: which precisions it can run, native bf16 from the CPU
flags, and the thread setting restored after a block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microtransformer import device
from microtransformer.device import (
    check_precision,
    cpu_flags,
    cpu_has_native_bf16,
    cpu_model,
    describe_cpu,
    intra_op_threads,
    matmul_flags,
)


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


INTEL = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
         "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\nbugs\t\t: spectre_v1 avx2\n\n"
         "processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
         "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")


def test_cpu_model_and_flags_from_cpuinfo() -> None:
    assert cpu_model(INTEL) == "Intel(R) Xeon(R) Processor"
    assert "amx_tile" in cpu_flags(INTEL) and "spectre_v1" not in cpu_flags(INTEL)  # flags only
    assert matmul_flags(INTEL) == ["amx_bf16", "avx2", "avx512_bf16", "avx512f"]  # sorted
    line = describe_cpu(INTEL)
    assert line.startswith("Intel(R) Xeon(R) Processor, ") and line.endswith(
        "(amx_bf16 avx2 avx512_bf16 avx512f)")
    old = "processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu sse2\n"
    assert matmul_flags(old) == [] and "none of avx2/" in describe_cpu(old)
    assert cpu_model("") != ""  # no model name line: the platform's string or "unknown"


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
