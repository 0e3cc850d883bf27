"""The benchmarks' `StaticLoopGenerator` (sampling inside the replayed step) decodes what
`generate` decodes: eager on CPU, compiled (slow), and as a CUDA graph when a GPU is present."""

from __future__ import annotations

import pytest
import torch

from benchmarks.static_loop import StaticLoopGenerator, race_sample
from model import MicroTransformer

SMALL = {"vocab_size": 97, "max_seq_len": 48, "embed_dim": 32, "num_heads": 4,
         "num_layers": 3, "ff_dim": 64, "dropout": 0.0}


def _model(seed: int = 0, **over: object) -> MicroTransformer:
    torch.manual_seed(seed)
    return MicroTransformer(**(SMALL | over)).eval()


def test_race_sample_follows_softmax() -> None:
    torch.manual_seed(4)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 3.0]])
    n = 20000
    draws = race_sample(logits.expand(n, -1), 1 / 0.8, top_k=4)
    freq = torch.bincount(draws, minlength=6).float() / n
    top = torch.topk(logits[0], 4).indices
    expected = torch.zeros(6)
    expected[top] = (logits[0, top] / 0.8).softmax(-1)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_static_loop_greedy_matches_generate(padded: bool) -> None:
    model = _model(5)
    prompt = torch.randint(0, SMALL["vocab_size"], (3, 8))
    mask = None
    if padded:
        mask = torch.ones_like(prompt)
        mask[0, :3] = 0
        mask[2, :5] = 0
        prompt = prompt.masked_fill(mask == 0, 0)
    ref = model.generate(prompt, max_new_tokens=30, do_sample=False, attention_mask=mask)
    dec = StaticLoopGenerator(model, batch_size=3, max_len=40)
    got = dec.generate(prompt, 30, temperature=0, attention_mask=mask)
    assert torch.equal(got, ref)
    again = dec.generate(prompt, 30, temperature=0, attention_mask=mask)  # buffers reused
    assert torch.equal(again, ref)


def test_static_loop_sampling_shapes_and_prompt() -> None:
    model = _model(6)
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 5))
    torch.manual_seed(0)
    out = StaticLoopGenerator(model, 2, 25).generate(prompt, 20, temperature=0.8, top_k=10)
    assert out.shape == (2, 25)
    assert torch.equal(out[:, :5], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < SMALL["vocab_size"]


def test_static_loop_rejects_bad_sizes() -> None:
    model = _model()
    with pytest.raises(ValueError, match="max_len"):
        StaticLoopGenerator(model, 1, SMALL["max_seq_len"] + 1)
    with pytest.raises(ValueError, match="compile"):
        StaticLoopGenerator(model, 1, 10, compile="fast")
    dec = StaticLoopGenerator(model, 2, 10)
    with pytest.raises(ValueError, match="batch_size"):
        dec.generate(torch.zeros(3, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_len"):
        dec.generate(torch.zeros(2, 4, dtype=torch.long), 7)


def test_static_loop_math_attention_step_matches_generate() -> None:
    """The explicit-attention step the compiled decoder traces, run eagerly (fast)."""
    model = _model(8)
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 7))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    ref = model.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=mask)
    dec = StaticLoopGenerator(model, 2, 27)
    dec._math_attention = True
    assert torch.equal(dec.generate(prompt, 20, temperature=0, attention_mask=mask), ref)


def test_static_loop_compile_failure_falls_back_to_eager() -> None:
    model = _model(9)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 5))
    ref = model.generate(prompt, max_new_tokens=12, do_sample=False)
    dec = StaticLoopGenerator(model, 1, 17, compile=True)

    def broken(top_k: int, greedy: bool) -> None:
        raise RuntimeError("no compiler")

    dec._compiled.compiled = broken
    with pytest.warns(RuntimeWarning, match="eager"):
        got = dec.generate(prompt, 12, temperature=0)
    assert torch.equal(got, ref)
    assert dec.compile_error is not None and "no compiler" in dec.compile_error
    assert torch.equal(dec.generate(prompt, 12, temperature=0), ref)  # stays eager, no warning


@pytest.mark.slow
def test_static_loop_compiled_cpu_matches_generate() -> None:
    """torch.compile'd CPU step (inductor C++): greedy equals model.generate; ~10-30 s."""
    model = _model(10)
    prompt = torch.randint(0, SMALL["vocab_size"], (3, 6))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    ref = model.generate(prompt, max_new_tokens=25, do_sample=False, attention_mask=mask)
    dec = StaticLoopGenerator(model, 3, 31, compile=True)
    got = dec.generate(prompt, 25, temperature=0, attention_mask=mask)
    assert dec.compile_error is None, dec.compile_error
    assert torch.equal(got, ref)
    assert torch.equal(dec.generate(prompt, 25, temperature=0, attention_mask=mask), ref)
    out = dec.generate(prompt, 25, temperature=0.8, top_k=10, attention_mask=mask)
    assert out.shape == (3, 31) and torch.equal(out[:, :6], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < SMALL["vocab_size"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_static_loop_cuda_graph_matches_eager() -> None:
    model = _model(7).cuda()
    prompt = torch.randint(0, SMALL["vocab_size"], (4, 6), device="cuda")
    ref = model.generate(prompt, max_new_tokens=25, do_sample=False)
    got = StaticLoopGenerator(model, 4, 31, cuda_graph=True).generate(prompt, 25, temperature=0)
    assert torch.equal(got, ref)
