"""prepare_for_gpu: the decisions per device, the loss kinds, and the CPU fallbacks."""

from __future__ import annotations

import pytest
import torch

from microtransformer.throughput import fast_path
from microtransformer.throughput.fast_path import (
    FastPathSettings,
    LossHead,
    adamw_options,
    prepare_for_gpu,
    resolve_compile,
)
from model import MicroTransformer
from model.losses import lm_loss
from tests.conftest import TINY

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def tiny(seed: int = 0) -> MicroTransformer:
    torch.manual_seed(seed)
    return MicroTransformer(**TINY, dropout=0.0)


def test_compile_defaults_per_device():
    assert resolve_compile(FastPathSettings(), CPU)[:3] == (False, None, False)
    assert resolve_compile(FastPathSettings(), CUDA)[:3] == (True, "default", False)
    assert resolve_compile(FastPathSettings(compile=False), CUDA)[:3] == (False, None, False)
    assert resolve_compile(FastPathSettings(compile=True), CPU)[:3] == (True, "default", False)


def test_cuda_graphs_mean_reduce_overhead_on_cuda_only():
    on, mode, graphs, _ = resolve_compile(FastPathSettings(cuda_graphs=True), CUDA)
    assert (on, mode, graphs) == (True, "reduce-overhead", True)
    on, mode, graphs, notes = resolve_compile(FastPathSettings(cuda_graphs=True, compile=False),
                                              CUDA)
    assert (on, mode, graphs) == (True, "reduce-overhead", True) and "turns" in notes[0]
    on, mode, graphs, notes = resolve_compile(FastPathSettings(cuda_graphs=True), CPU)
    assert (on, graphs) == (False, False) and "ignored" in notes[0]
    # max-autotune replays graphs on CUDA, not on CPU
    assert resolve_compile(FastPathSettings(compile_mode="max-autotune"), CUDA)[2] is True
    assert resolve_compile(FastPathSettings(compile=True, compile_mode="max-autotune"),
                           CPU)[2] is False


def test_settings_are_validated_together():
    with pytest.raises(ValueError) as err:
        FastPathSettings(loss="fused", compile_mode="fast", chunk_size=0)
    for part in ("loss='fused'", "compile_mode='fast'", "chunk_size=0"):
        assert part in str(err.value)


def test_adamw_options():
    assert adamw_options(CPU) == {}
    assert adamw_options(CUDA) == {"fused": True}
    assert adamw_options(CUDA, fused=False) == {}
    with pytest.raises(ValueError, match="CUDA"):
        adamw_options(CPU, fused=True)


@pytest.mark.parametrize("kind", ["chunked", "logits"])
def test_loss_head_matches_the_model_loss_and_gradients(kind):
    model = tiny()
    ids = torch.randint(0, TINY["vocab_size"], (3, 16))
    ref = model(ids, labels=ids)
    ref.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = LossHead(model, kind, chunk_size=7)(ids, labels=ids)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, lm_loss(model(ids), ids), rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_loss_head_without_labels_returns_logits():
    model = tiny()
    ids = torch.randint(0, TINY["vocab_size"], (2, 5))
    assert torch.equal(LossHead(model)(ids), model(ids))
    assert list(LossHead(model).parameters()) == list(model.parameters())


def test_cpu_defaults_leave_the_model_eager_in_fp32():
    model = tiny()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    p = prepare_for_gpu(model, "cpu")
    assert not p.compiled and p.compile_mode is None and not p.cuda_graphs
    assert p.compute_dtype == torch.float32 and p.optimizer_options == {}
    assert isinstance(p.model, LossHead) and p.raw_model is model
    assert torch.backends.cuda.matmul.allow_tf32 == tf32  # CUDA flags untouched on CPU
    assert "eager" in p.describe() and "loss chunked" in p.describe()
    p.step_begin()  # a no-op without CUDA graphs


def test_wrap_is_applied_before_compiling():
    seen = []

    def wrap(m):
        seen.append(m)
        return m

    p = prepare_for_gpu(tiny(), "cpu", wrap=wrap)
    assert seen == [p.model]


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fast_path.torch, "compile", broken)
    model = tiny()
    p = prepare_for_gpu(model, "cpu", FastPathSettings(compile=True), example_shape=(2, 8))
    assert not p.compiled and p.compile_seconds is None
    assert any("no compiler here" in n for n in p.notes)
    assert all(q.grad is None for q in model.parameters())


def test_warm_up_keeps_rng_and_clears_grads(monkeypatch):
    """The warm-up step (here through an eager 'compile') restores the RNG and the grads."""
    monkeypatch.setattr(fast_path.torch, "compile", lambda m, **kw: m)
    model = MicroTransformer(**TINY, dropout=0.1)  # dropout draws random numbers
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    p = prepare_for_gpu(model, "cpu", FastPathSettings(compile=True), example_shape=(2, 8))
    assert p.compiled and p.compile_mode == "default" and p.compile_seconds > 0
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(q.grad is None for q in model.parameters())


@pytest.mark.slow
def test_real_compile_on_cpu_matches_eager():
    model = tiny()
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    want = model(ids, labels=ids).item()
    p = prepare_for_gpu(model, "cpu", FastPathSettings(compile=True), example_shape=(2, 16))
    assert p.compiled, p.notes
    assert p.model(ids, labels=ids).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("settings", [
    FastPathSettings(), FastPathSettings(loss="logits"), FastPathSettings(cuda_graphs=True),
], ids=["default", "logits", "cuda-graphs"])
def test_cuda_fast_path_trains_like_eager(settings):
    """Compiled bf16 steps on CUDA decrease the loss like the eager fp32 model does."""
    torch.manual_seed(0)
    model = MicroTransformer(**{**TINY, "max_seq_len": 64}, dropout=0.0).cuda()
    p = prepare_for_gpu(model, "cuda", settings, example_shape=(8, 64))
    assert p.compiled and p.compute_dtype == torch.bfloat16 and p.compile_seconds > 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, **p.optimizer_options)
    ids = torch.randint(0, TINY["vocab_size"], (8, 64), device="cuda")
    losses = []
    for _ in range(30):
        p.step_begin()
        with p.amp():
            loss = p.model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
