"""MFU accounting: the FLOP formula, the peak table lookup and the log line."""

from __future__ import annotations

import pytest

from microtransformer.throughput.mfu import (
    PEAK_BF16_DENSE,
    compute_mfu,
    format_mfu,
    peak_bf16_flops,
    train_flops_per_token,
)
from model import ModelConfig
from model.utils import parameter_formula

BALANCED = ModelConfig(vocab_size=5000, max_seq_len=512, embed_dim=160, num_heads=5,
                       num_layers=5, ff_dim=640)


def test_train_flops_are_6n_plus_12ltd():
    c, T = BALANCED, 512
    d, f, L, V = c.embed_dim, c.ff_dim, c.num_layers, c.vocab_size
    n_matmul = L * (4 * d * d + 2 * d * f) + V * d
    assert train_flops_per_token(c, T) == 6 * n_matmul + 12 * L * T * d
    # the matmul weights are the parameters minus biases, norms and the position table
    biases_norms = L * (4 * d + f + d + 4 * d) + 2 * d
    assert n_matmul == parameter_formula(c) - biases_norms - c.max_seq_len * d


def test_attention_term_grows_with_seq_len():
    assert (train_flops_per_token(BALANCED, 512) - train_flops_per_token(BALANCED, 256)
            == 12 * BALANCED.num_layers * 256 * BALANCED.embed_dim)
    with pytest.raises(ValueError, match="seq_len=0"):
        train_flops_per_token(BALANCED, 0)


@pytest.mark.parametrize("name, row, peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835e12),
    ("NVIDIA H200", "H200 SXM", 989e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100", 312e12),
    ("NVIDIA L4", "L4", 121e12),
    ("NVIDIA L40S", "L40S", 366e12),
    ("NVIDIA A10", "A10", 125e12),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2e12),
])
def test_peak_lookup_by_device_name(name, row, peak):
    assert peak_bf16_flops(name) == (row, peak)


@pytest.mark.parametrize("name", ["NVIDIA L40", "NVIDIA A10G", "Tesla V100-SXM2-16GB",
                                  "NVIDIA GeForce RTX 4080", "AMD Instinct MI300X"])
def test_unknown_cards_have_no_peak(name):
    # token matching: "L40" is not "L4" or "L40S", "A10G" is not "A10"
    assert peak_bf16_flops(name) is None


def test_table_rows_are_positive_and_specific_rows_come_first():
    for i, (needed, _row, peak) in enumerate(PEAK_BF16_DENSE):
        assert peak > 0
        for later, _, _ in PEAK_BF16_DENSE[i + 1:]:
            assert not needed < later, f"{set(needed)} would shadow {set(later)}"


def test_compute_mfu_on_a_known_card():
    m = compute_mfu(3e6, BALANCED, 512, "NVIDIA H100 80GB HBM3")
    fpt = train_flops_per_token(BALANCED, 512)
    assert m.achieved_flops == pytest.approx(3e6 * fpt)
    assert m.mfu == pytest.approx(3e6 * fpt / 989e12)
    line = format_mfu(m)
    assert line.startswith(f"MFU {100 * m.mfu:.1f}%") and "H100 SXM" in line
    assert "3x(2N_matmul + 4LTd)" in line


@pytest.mark.parametrize("device", ["cpu", "NVIDIA Mystery Card"])
def test_compute_mfu_without_a_peak_is_none_with_a_reason(device):
    m = compute_mfu(1e5, BALANCED, 256, device)
    assert m.mfu is None and m.peak_flops is None and m.note
    line = format_mfu(m)
    assert line.startswith("MFU n/a") and m.note in line


def test_negative_throughput_is_rejected():
    with pytest.raises(ValueError, match="tokens_per_s"):
        compute_mfu(-1.0, BALANCED, 256, "cpu")
