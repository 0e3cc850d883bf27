"""batch_size auto: the memory estimate against measured saved tensors, the choice rule and
the OOM binary search."""

from __future__ import annotations

import pytest
import torch

from microtransformer.config import batch_size_problem
from microtransformer.errors import UserError
from microtransformer.throughput.batch_size import (
    activation_bytes_per_token,
    choose_batch,
    estimate_train_bytes,
    largest_fitting,
    probe_cuda_batch,
    resolve_auto_batch,
    static_train_bytes,
)
from model import MicroTransformer, ModelConfig
from model.losses import lm_loss

SMALL = ModelConfig(vocab_size=300, max_seq_len=64, embed_dim=48, num_heads=4, num_layers=2,
                    ff_dim=192, dropout=0.0)
BALANCED = ModelConfig(vocab_size=5000, max_seq_len=512, embed_dim=160, num_heads=5,
                       num_layers=5, ff_dim=640, dropout=0.0)


def saved_bytes(cfg: ModelConfig, B: int, T: int, bf16: bool, loss: str) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one
    forward (CPU): what the estimate's per-token term models."""
    torch.manual_seed(0)
    model = MicroTransformer.from_config(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(ids, labels=ids) if loss == "chunked" else lm_loss(model(ids).float(), ids)
    del out
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("cfg", [SMALL, BALANCED], ids=["small", "balanced"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_per_token_estimate_matches_saved_tensors(cfg, bf16):
    """The slope (bytes per extra token) of what autograd saves is within 10% of the
    estimate's per-token term minus its backward-gradient allowance, for the chunked loss."""
    T = 32
    measured = (saved_bytes(cfg, 6, T, bf16, "chunked")
                - saved_bytes(cfg, 2, T, bf16, "chunked")) / (4 * T)
    e = 2 if bf16 else 4
    estimate = activation_bytes_per_token(cfg, compute_bytes=e)
    in_flight = 4 * (3 * cfg.embed_dim + cfg.ff_dim) + 16  # not saved: backward, ids
    assert measured == pytest.approx(estimate - in_flight, rel=0.10)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_full_logits_estimate_bounds_saved_tensors(bf16):
    """The logits loss saves its (B, T, V) log-softmax; the estimate adds the two (B, T, V)
    gradients alive at its backward peak, so it lies above the saved bytes, within 2.5x."""
    cfg, T = SMALL, 32
    measured = (saved_bytes(cfg, 6, T, bf16, "logits")
                - saved_bytes(cfg, 2, T, bf16, "logits")) / (4 * T)
    estimate = activation_bytes_per_token(cfg, compute_bytes=2 if bf16 else 4, loss="logits")
    assert measured < estimate < 2.5 * measured


def test_dropout_adds_mask_bytes():
    with_dropout = ModelConfig(**{**SMALL.to_dict(), "dropout": 0.1})
    assert (activation_bytes_per_token(with_dropout) - activation_bytes_per_token(SMALL)
            == SMALL.num_layers * 2 * SMALL.embed_dim)


def test_estimate_is_static_plus_linear_in_tokens():
    s = static_train_bytes(BALANCED)
    a = activation_bytes_per_token(BALANCED)
    assert estimate_train_bytes(BALANCED, 8, 512) == s + 8 * 512 * a
    assert static_train_bytes(BALANCED, compute_bytes=4) < s  # no low-precision weight copies
    with pytest.raises(ValueError, match="compute_bytes"):
        static_train_bytes(BALANCED, compute_bytes=3)
    with pytest.raises(ValueError, match="loss"):
        activation_bytes_per_token(BALANCED, loss="fused")


def test_choose_batch_fills_the_budget_when_memory_limits():
    budget = estimate_train_bytes(BALANCED, 100, 512) + 1000  # room for 100 sequences
    c = choose_batch(BALANCED, 512, budget)
    assert c.limited_by == "memory"
    assert c.micro_batch == 96  # largest multiple of 8 not above 100
    assert c.grad_accum_steps == 1 and c.tokens_per_step == 96 * 512
    assert c.estimated_bytes <= budget
    assert "micro-batch 96" in c.describe()


def test_choose_batch_small_fits_are_not_rounded():
    budget = estimate_train_bytes(BALANCED, 5, 512) + 10
    assert choose_batch(BALANCED, 512, budget).micro_batch == 5


def test_choose_batch_token_cap_and_target_accumulation():
    huge = 1 << 40
    capped = choose_batch(BALANCED, 512, huge, max_micro_tokens=2**16)
    assert (capped.micro_batch, capped.limited_by) == (128, "token cap")
    # target below the cap: one micro-batch of exactly the target
    t = choose_batch(BALANCED, 256, huge, target_tokens_per_step=64 * 256)
    assert (t.micro_batch, t.grad_accum_steps, t.limited_by) == (64, 1, "target")
    # memory-limited: accumulation reaches the target
    budget = estimate_train_bytes(BALANCED, 16, 256) + 10
    m = choose_batch(BALANCED, 256, budget, target_tokens_per_step=100 * 256)
    assert m.micro_batch == 16 and m.grad_accum_steps == 7  # ceil(100 / 16)
    assert m.tokens_per_step >= 100 * 256


def test_choose_batch_too_small_budget_names_the_need():
    with pytest.raises(ValueError, match="MiB but the memory budget is"):
        choose_batch(BALANCED, 512, static_train_bytes(BALANCED))


@pytest.mark.parametrize("limit", [1, 2, 7, 64, 100, 999])
def test_largest_fitting_finds_the_boundary_in_log_trials(limit):
    calls: list[int] = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= limit

    assert largest_fitting(fits, 1, 1000) == min(limit, 1000)
    assert len(calls) <= 12  # 1 + ceil(log2(1000))


def test_largest_fitting_none_and_bad_range():
    assert largest_fitting(lambda b: False, 1, 10) is None
    with pytest.raises(ValueError):
        largest_fitting(lambda b: True, 5, 4)


def test_probe_treats_out_of_memory_as_not_fitting(monkeypatch):
    """The CUDA probe's logic with a fake step that runs out of memory above 37."""
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def step(b: int) -> None:
        if b > 37:
            raise torch.OutOfMemoryError("fake OOM")

    assert probe_cuda_batch(step, 1, 256) == 37


def test_probe_lets_other_errors_through(monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def step(b: int) -> None:
        raise RuntimeError("shape bug")

    with pytest.raises(RuntimeError, match="shape bug"):
        probe_cuda_batch(step, 1, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss", ["chunked", "logits"])
def test_cuda_peak_within_estimate(loss):
    """Eager bf16 training step: measured max_memory_allocated is between 0.5x and 1.3x the
    estimate (the estimate is meant to be safe, not exact)."""
    from microtransformer.throughput.fast_path import LossHead

    device = torch.device("cuda")
    B, T = 32, 512
    model = MicroTransformer.from_config(BALANCED).to(device)
    step = LossHead(model, loss)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    ids = torch.randint(0, BALANCED.vocab_size, (B, T), device=device)
    for _ in range(2):  # the second step has the optimizer state allocated
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step(ids, labels=ids)
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated()  # weights, grads, AdamW state, activations
    est = estimate_train_bytes(BALANCED, B, T, loss=loss)
    assert 0.5 * est < peak < 1.3 * est, (peak, est)


@pytest.mark.parametrize("value, ok", [(1, True), (64, True), ("auto", True), (0, False),
                                       (-3, False), (True, False), ("big", False), (2.0, False)])
def test_batch_size_problem(value, ok):
    problem = batch_size_problem(value)
    assert (problem is None) == ok
    if not ok:
        assert repr(value) in problem and "auto" in problem


def test_resolve_auto_batch_needs_cuda():
    with pytest.raises(UserError, match="device is cpu; set a number"):
        resolve_auto_batch(BALANCED, 512, "cpu")


def test_resolve_auto_batch_splits_the_target_over_ranks(monkeypatch):
    from microtransformer.throughput import batch_size as bs

    monkeypatch.setattr(bs, "cuda_budget_bytes", lambda device: 1 << 40)
    c = resolve_auto_batch(BALANCED, 256, torch.device("cuda"), world_size=4,
                           target_tokens_per_step=256 * 256)
    assert (c.micro_batch, c.grad_accum_steps) == (64, 1)  # 64 rows per rank x 4 ranks
    monkeypatch.setattr(bs, "cuda_budget_bytes", lambda device: 1000)
    with pytest.raises(UserError, match="memory budget"):
        resolve_auto_batch(BALANCED, 256, torch.device("cuda"))
