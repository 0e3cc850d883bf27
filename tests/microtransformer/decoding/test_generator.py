"""The generator: `generate` on a `FixedShapeDecoder` gives `generate`'s tokens, the path rule
picks compiled only when it repays itself, and lower precisions stay close to fp32. (The
packaged compiled step itself: test_aot.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microtransformer.decoding.generator import (
    AutoPathGenerator,
    DecodeCosts,
    FixedShapeDecoder,
    choose_decode_path,
)
from microtransformer.decoding.step import DecodeStep
from microtransformer.device import cpu_has_native_bf16, prepare_model
from model import MicroTransformer

SMALL = {"vocab_size": 97, "max_seq_len": 48, "embed_dim": 32, "num_heads": 4,
         "num_layers": 3, "ff_dim": 64, "dropout": 0.0}


def _model(seed: int = 0, **over: object) -> MicroTransformer:
    torch.manual_seed(seed)
    return MicroTransformer(**(SMALL | over)).eval()


@pytest.mark.parametrize("padded", [False, True])
def test_fixed_shape_decoder_in_generate_matches_generate(padded: bool) -> None:
    """generate(decoder=FixedShapeDecoder(DecodeStep)): the fixed-shape step, same tokens."""
    model = _model(12)
    prompt = torch.randint(0, SMALL["vocab_size"], (3, 7))
    mask = None
    if padded:
        mask = torch.ones_like(prompt)
        mask[1, :4] = 0
    ref = model.generate(prompt, max_new_tokens=25, do_sample=False, attention_mask=mask)
    dec = FixedShapeDecoder(DecodeStep(model, 3, 40))  # cache longer than the sequence
    for _ in range(2):  # reused: stale cache columns stay masked
        got = model.generate(prompt, max_new_tokens=25, do_sample=False, attention_mask=mask,
                             decoder=dec)
        assert torch.equal(got, ref)
    kw = dict(max_new_tokens=25, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3,
              eos_token_id=3, attention_mask=mask)
    sampled = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    again = model.generate(prompt, generator=torch.Generator().manual_seed(1), decoder=dec, **kw)
    assert torch.equal(again, sampled)


def test_choose_decode_path_rule() -> None:
    costs = DecodeCosts(eager_step_base=1e-3, eager_step_per_row=0.2e-3,
                        compiled_step_base=0.5e-3, compiled_step_per_row=0.1e-3,
                        compile_cold=10.0, compile_cached=2.0)
    # batch 1 saves 0.6 ms per step: cold compile repays after 16,667 steps, cached after 3,334
    assert choose_decode_path(16_000, 1, costs=costs) == "eager"
    assert choose_decode_path(17_000, 1, costs=costs) == "compiled"
    assert choose_decode_path(3_000, 1, compile_cached=True, costs=costs) == "eager"
    assert choose_decode_path(3_500, 1, compile_cached=True, costs=costs) == "compiled"
    # batch 8 saves 1.3 ms per step
    assert choose_decode_path(1_600, 8, compile_cached=True, costs=costs) == "compiled"
    for kw in ({"allow_compile": False}, {"device_type": "cuda"}, {"fits_cache": False}):
        assert choose_decode_path(10**9, 1, costs=costs, **kw) == "eager"
    assert choose_decode_path(0, 1, costs=DecodeCosts(compile_cold=0.0)) == "eager"
    # a package on disk serves later runs: a cold compile spread over 1,000 of them costs
    # 10 ms here, repaid after 17 steps at batch 1
    reused = DecodeCosts(eager_step_base=1e-3, eager_step_per_row=0.2e-3,
                         compiled_step_base=0.5e-3, compiled_step_per_row=0.1e-3,
                         compile_cold=10.0, compile_cached=0.02, package_reuse=1000)
    assert choose_decode_path(16, 1, costs=reused) == "eager"
    assert choose_decode_path(17, 1, costs=reused) == "compiled"
    # on disk: loading (20 ms) is repaid after 34 steps
    assert choose_decode_path(33, 1, compile_cached=True, costs=reused) == "eager"
    assert choose_decode_path(34, 1, compile_cached=True, costs=reused) == "compiled"


def test_auto_path_generator_eager_path_equals_generate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROTRANSFORMER_CACHE_DIR", str(tmp_path))  # nothing compiled here
    model = _model(13)
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 5))
    fast = AutoPathGenerator(model, quiet=True)  # 5 tokens never repay a compile
    assert fast.plan(2, 5, 5) == "eager"
    got = fast.generate(prompt, max_new_tokens=5, do_sample=False)
    assert fast.last_path == "eager"
    assert torch.equal(got, model.generate(prompt, max_new_tokens=5, do_sample=False))
    assert AutoPathGenerator(model, compile=False).plan(1, 5, 10**7) == "eager"
    # 40 tokens repay the (spread) compile; a sequence past the context never
    assert AutoPathGenerator(model).plan(1, 5, 40) == "compiled"
    assert AutoPathGenerator(model).plan(1, 5, 44) == "eager"
    assert AutoPathGenerator(model).plan(1, 5, 40, use_cache=False) == "eager"


@pytest.mark.parametrize("precision, tolerance",
                         [("bf16", 0.1), ("int8", 0.5), ("int8wo", 0.25)])
def test_lower_precision_logits_within_tolerance(precision: str, tolerance: float) -> None:
    """bf16: max |logit - fp32 logit| <= 0.1 x the fp32 logits' std; int8: <= 0.5 x; int8wo
    (weight-only): <= 0.25 x (on this randomly initialised model; the quality cost on trained
    models is measured in bits per byte, docs/PERFORMANCE.md). Forward, decode step and
    DecodeStep all checked."""
    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (bf16 is refused here)")
    model = _model(14)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9))
    low = prepare_model(model, precision)
    with torch.no_grad():
        ref = model(ids)  # (B, T, V)
        got = low(ids).float()
    bound = tolerance * float(ref.std())
    assert float((got - ref).abs().max()) <= bound
    step = DecodeStep(model, 2, 12, dtype=precision)
    for row in range(2):
        torch.testing.assert_close(step.prefill(row, ids[row, :8]), ref[row, 7], atol=bound,
                                   rtol=0)
    cols = torch.tensor([8, 8])
    logits = step.step(ids[:, 8], cols, cols)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref[:, 8], atol=bound, rtol=0)
    greedy = AutoPathGenerator(model, precision=precision).generate(
        ids[:, :4], max_new_tokens=6, do_sample=False)
    assert greedy.shape == (2, 10) and torch.equal(greedy[:, :4], ids[:, :4])


@pytest.mark.slow
def test_auto_path_generator_compiled_path_equals_generate() -> None:
    """The compiled path through generate (the packaged step, `decoding.aot`): greedy tokens
    equal, sampled tokens equal with the same generator (penalty, nucleus, EOS); and the
    serve engine's compiled `DecodeStep`; ~20-60 s of compiling."""
    model = _model(15)
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 6))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    fast = AutoPathGenerator(model, costs=DecodeCosts(compile_cold=0.0, compile_cached=0.0))
    ref = model.generate(prompt, max_new_tokens=30, do_sample=False, attention_mask=mask)
    got = fast.generate(prompt, max_new_tokens=30, do_sample=False, attention_mask=mask)
    assert fast.last_path == "compiled"
    assert torch.equal(got, ref)
    kw = dict(max_new_tokens=30, temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.2,
              eos_token_id=5, attention_mask=mask)
    a = model.generate(prompt, generator=torch.Generator().manual_seed(3), **kw)
    b = fast.generate(prompt, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
    step = DecodeStep(model, 2, 48, compile=True)  # the serve engine's compiled step
    cols = torch.tensor([3, 5])
    for row, n in enumerate((3, 5)):
        step.prefill(row, prompt[row, -n:])
    got = step.step(prompt[:, -1], cols, cols)
    assert step.compiled, step.compile_error
    ref_step = DecodeStep(model, 2, 48)
    for row, n in enumerate((3, 5)):
        ref_step.prefill(row, prompt[row, -n:])
    torch.testing.assert_close(got, ref_step.step(prompt[:, -1], cols, cols), atol=1e-4,
                               rtol=1e-4)
