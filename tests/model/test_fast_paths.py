"""The speed paths compute what the plain paths compute.

Covers the copy-free `lm_loss`, the lean one-token `decode_step`, top-k-before-temperature
sampling, and the static-cache decoder of `microtransformer.fast_generate` (eager on CPU,
CUDA graph when a GPU is present).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microtransformer.fast_generate import (
    DecodeCosts,
    DecodeStep,
    FastGenerator,
    StaticDecoder,
    StaticKVDecoder,
    cache_length,
    check_precision,
    choose_decode_path,
    cpu_has_native_bf16,
    prepare_model,
    race_sample,
)
from model import MicroTransformer
from model.attention import KVCache
from model.sampling import sample_next_token
from model.transformer import lm_loss

SMALL = {"vocab_size": 97, "max_seq_len": 48, "embed_dim": 32, "num_heads": 4,
         "num_layers": 3, "ff_dim": 64, "dropout": 0.0}


def _model(seed: int = 0, **over: object) -> MicroTransformer:
    torch.manual_seed(seed)
    return MicroTransformer(**(SMALL | over)).eval()


def _reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The seed's formulation: slice the logits, shift the labels."""
    V = logits.size(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def test_lm_loss_matches_sliced_formulation_values_and_grads() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[1, 3] = -100  # ignored targets count in neither
    ref = _reference_loss(logits, labels)
    (g_ref,) = torch.autograd.grad(ref, logits)
    got = lm_loss(logits, labels)
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
    assert torch.all(g_got[:, -1] == 0)  # the last position predicts nothing


def test_block_decode_step_matches_cached_forward() -> None:
    model = _model()
    block = model.blocks[0]
    B, T, C = 2, 5, SMALL["embed_dim"]
    x = torch.randn(B, T + 1, C)
    nh, hs = SMALL["num_heads"], C // SMALL["num_heads"]
    with torch.no_grad():
        ref_cache = KVCache(1, B, nh, T + 1, hs, dtype=x.dtype, device=x.device)
        block(x[:, :T], None, ref_cache.layer(0), 0)
        ref = block(x[:, T:], None, ref_cache.layer(0), T)[:, 0]  # (B, C)
        cache = KVCache(1, B, nh, T + 1, hs, dtype=x.dtype, device=x.device)
        block(x[:, :T], None, cache.layer(0), 0)
        got = block.decode_step(x[:, T].clone(), *cache.layer(0), T)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(cache.k, ref_cache.k)
    torch.testing.assert_close(cache.v, ref_cache.v)


def test_top_k_before_temperature_draws_the_same_tokens() -> None:
    """Scaling by 1/T after top-k gives bit-identical values, hence identical draws."""
    torch.manual_seed(2)
    logits = torch.randn(4, 300) * 3
    for temperature in (0.3, 0.8, 1.7):
        g1 = torch.Generator().manual_seed(5)
        got = sample_next_token(logits, temperature=temperature, top_k=20, generator=g1)
        g2 = torch.Generator().manual_seed(5)
        values, idx = torch.topk(logits / temperature, 20, dim=-1)
        ref = idx.gather(-1, torch.multinomial(values.softmax(-1), 1, generator=g2)).squeeze(-1)
        assert torch.equal(got, ref)


def test_sampled_generate_same_with_and_without_cache() -> None:
    model = _model(3)
    prompt = torch.randint(0, SMALL["vocab_size"], (3, 6))
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(11)
        outs.append(model.generate(prompt, max_new_tokens=20, temperature=0.8, top_k=10,
                                   generator=g, use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])


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
def test_static_decoder_greedy_matches_generate(padded: bool) -> None:
    model = _model(5)
    prompt = torch.randint(0, SMALL["vocab_size"], (3, 8))
    mask = None
    if padded:
        mask = torch.ones_like(prompt)
        mask[0, :3] = 0
        mask[2, :5] = 0
        prompt = prompt.masked_fill(mask == 0, 0)
    ref = model.generate(prompt, max_new_tokens=30, do_sample=False, attention_mask=mask)
    dec = StaticDecoder(model, batch_size=3, max_len=40)
    got = dec.generate(prompt, 30, temperature=0, attention_mask=mask)
    assert torch.equal(got, ref)
    again = dec.generate(prompt, 30, temperature=0, attention_mask=mask)  # buffers reused
    assert torch.equal(again, ref)


def test_static_decoder_sampling_shapes_and_prompt() -> None:
    model = _model(6)
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 5))
    torch.manual_seed(0)
    out = StaticDecoder(model, 2, 25).generate(prompt, 20, temperature=0.8, top_k=10)
    assert out.shape == (2, 25)
    assert torch.equal(out[:, :5], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < SMALL["vocab_size"]


def test_static_decoder_rejects_bad_sizes() -> None:
    model = _model()
    with pytest.raises(ValueError, match="max_len"):
        StaticDecoder(model, 1, SMALL["max_seq_len"] + 1)
    with pytest.raises(ValueError, match="compile"):
        StaticDecoder(model, 1, 10, compile="fast")
    dec = StaticDecoder(model, 2, 10)
    with pytest.raises(ValueError, match="batch_size"):
        dec.generate(torch.zeros(3, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_len"):
        dec.generate(torch.zeros(2, 4, dtype=torch.long), 7)


def test_static_decoder_math_attention_step_matches_generate() -> None:
    """The explicit-attention step the compiled decoder traces, run eagerly (fast)."""
    model = _model(8)
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 7))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    ref = model.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=mask)
    dec = StaticDecoder(model, 2, 27)
    dec._math_attention = True
    assert torch.equal(dec.generate(prompt, 20, temperature=0, attention_mask=mask), ref)


def test_static_decoder_compile_failure_falls_back_to_eager() -> None:
    model = _model(9)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 5))
    ref = model.generate(prompt, max_new_tokens=12, do_sample=False)
    dec = StaticDecoder(model, 1, 17, compile=True)

    def broken(top_k: int, greedy: bool) -> None:
        raise RuntimeError("no compiler")

    dec._compiled.compiled = broken
    with pytest.warns(RuntimeWarning, match="eager"):
        got = dec.generate(prompt, 12, temperature=0)
    assert torch.equal(got, ref)
    assert dec.compile_error is not None and "no compiler" in dec.compile_error
    assert torch.equal(dec.generate(prompt, 12, temperature=0), ref)  # stays eager, no warning


@pytest.mark.slow
def test_static_decoder_compiled_cpu_matches_generate() -> None:
    """torch.compile'd CPU step (inductor C++): greedy equals model.generate; ~10-30 s."""
    model = _model(10)
    prompt = torch.randint(0, SMALL["vocab_size"], (3, 6))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    ref = model.generate(prompt, max_new_tokens=25, do_sample=False, attention_mask=mask)
    dec = StaticDecoder(model, 3, 31, compile=True)
    got = dec.generate(prompt, 25, temperature=0, attention_mask=mask)
    assert dec.compile_error is None, dec.compile_error
    assert torch.equal(got, ref)
    assert torch.equal(dec.generate(prompt, 25, temperature=0, attention_mask=mask), ref)
    out = dec.generate(prompt, 25, temperature=0.8, top_k=10, attention_mask=mask)
    assert out.shape == (3, 31) and torch.equal(out[:, :6], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < SMALL["vocab_size"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_static_decoder_cuda_graph_matches_eager() -> None:
    model = _model(7).cuda()
    prompt = torch.randint(0, SMALL["vocab_size"], (4, 6), device="cuda")
    ref = model.generate(prompt, max_new_tokens=25, do_sample=False)
    got = StaticDecoder(model, 4, 31, cuda_graph=True).generate(prompt, 25, temperature=0)
    assert torch.equal(got, ref)


def test_chunked_loss_matches_lm_loss_values_and_grads() -> None:
    model = _model(8).train()
    ids = torch.randint(0, SMALL["vocab_size"], (3, 20))
    labels = ids.clone()
    labels[0, 5] = -100
    ref = lm_loss(model(ids), labels)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got = model.loss(ids, labels, chunk_size=7)  # chunks that do not divide B*T
    got_grads = torch.autograd.grad(got * 2.0, list(model.parameters()))  # scaled upstream
    torch.testing.assert_close(got, ref)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, 2.0 * r, atol=1e-6, rtol=1e-4)


def test_model_decode_step_per_row_columns_matches_full_forward() -> None:
    """Static mode: rows at different lengths (slots of a continuous batch) decode together."""
    model = _model(3)
    cfg = model.config
    lengths = [3, 7, 1]  # each row's prompt length: its next token goes to that column
    S = 12
    torch.manual_seed(4)
    prompts = [torch.randint(0, SMALL["vocab_size"], (n,)) for n in lengths]
    nxt = torch.randint(0, SMALL["vocab_size"], (len(lengths),))
    cache = KVCache(cfg.num_layers, len(lengths), cfg.num_heads, S, cfg.head_dim,
                    dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        for row, prompt in enumerate(prompts):  # prefill each slot on its own
            view = KVCache.__new__(KVCache)
            view.layers = [(k[row:row + 1], v[row:row + 1]) for k, v in cache.layers]
            model._hidden(prompt[None], torch.arange(len(prompt)), None, view, 0)
        cols = torch.tensor(lengths)  # (B,)
        mask = (torch.arange(S)[None, :] <= cols[:, None])[:, None, None, :]  # (B, 1, 1, S)
        got = model.decode_step(nxt, cols, cache, cols, mask)  # (B, V)
        for row, prompt in enumerate(prompts):
            full = torch.cat([prompt, nxt[row:row + 1]])[None]
            ref = model(full)[0, -1]
            torch.testing.assert_close(got[row], ref, atol=1e-5, rtol=1e-5)


def test_decode_step_per_row_columns_needs_a_mask() -> None:
    model = _model()
    cfg = model.config
    cache = KVCache(cfg.num_layers, 1, cfg.num_heads, 4, cfg.head_dim,
                    dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="key_mask"):
        model.decode_step(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                          cache, torch.zeros(1, dtype=torch.long))


def test_decode_step_slots_match_generate_greedy() -> None:
    """Slots prefilled at different times and lengths decode the same tokens as generate."""
    from microtransformer.fast_generate import DecodeStep

    model = _model(5)
    torch.manual_seed(6)
    prompts = [torch.randint(0, SMALL["vocab_size"], (n,)) for n in (4, 9)]
    n_new = 6
    refs = [model.generate(p[None], max_new_tokens=n_new, do_sample=False)[0, len(p):]
            for p in prompts]
    dec = DecodeStep(model, batch_size=3, max_len=20)
    cols = torch.zeros(3, dtype=torch.long)
    tokens = torch.zeros(3, dtype=torch.long)
    outs: list[list[int]] = [[], [], []]
    for row, p in ((2, prompts[0]), (0, prompts[1])):  # rows 2 and 0 used, row 1 idle
        tokens[row] = int(dec.prefill(row, p).argmax())
        outs[row].append(int(tokens[row]))
        cols[row] = len(p)
    for _ in range(n_new - 1):
        logits = dec.step(tokens, cols, cols)  # position == column: no padding here
        tokens = logits.argmax(-1)
        for row in (0, 2):
            outs[row].append(int(tokens[row]))
        cols += 1
    assert outs[2] == refs[0].tolist()
    assert outs[0] == refs[1].tolist()


# ---------------------------------------------------------------------------- default paths
def test_explicit_attention_decode_step_matches_sdpa() -> None:
    model = _model(11)
    cfg = model.config
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 6))
    logits = []
    for explicit in (False, True):
        cache = KVCache(cfg.num_layers, 2, cfg.num_heads, 10, cfg.head_dim,
                        dtype=torch.float32, device=torch.device("cpu"))
        with torch.no_grad():
            model.prefill(prompt, cache)
            cols = torch.tensor([6, 6])
            mask = (torch.arange(10)[None, :] <= cols[:, None])[:, None, None, :]
            logits.append(model.decode_step(prompt[:, -1], cols, cache, cols, mask,
                                             explicit_attention=explicit))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_static_kv_decoder_in_generate_matches_generate(padded: bool) -> None:
    """generate(decoder=StaticKVDecoder(DecodeStep)): the fixed-shape step, same tokens."""
    model = _model(12)
    prompt = torch.randint(0, SMALL["vocab_size"], (3, 7))
    mask = None
    if padded:
        mask = torch.ones_like(prompt)
        mask[1, :4] = 0
    ref = model.generate(prompt, max_new_tokens=25, do_sample=False, attention_mask=mask)
    dec = StaticKVDecoder(DecodeStep(model, 3, 40))  # cache longer than the sequence
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


def test_cache_length_buckets() -> None:
    assert [cache_length(n, 512) for n in (1, 64, 65, 272, 513)] == [64, 64, 128, 512, 512]
    assert cache_length(100, 96) == 96


def test_fast_generator_eager_path_equals_generate() -> None:
    model = _model(13)
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 5))
    fast = FastGenerator(model)  # 20 tokens never repay a compile
    assert fast.plan(2, 5, 20)[0] == "eager"
    got = fast.generate(prompt, max_new_tokens=20, do_sample=False)
    assert fast.last_path == "eager"
    assert torch.equal(got, model.generate(prompt, max_new_tokens=20, do_sample=False))
    assert FastGenerator(model, compile=False).plan(1, 5, 10**7)[0] == "eager"
    # 40 tokens x 10**6 expected calls repay any compile; a sequence past the context never
    assert FastGenerator(model, expected_calls=10**6).plan(1, 5, 40)[0] == "compiled"
    assert FastGenerator(model, expected_calls=10**6).plan(1, 5, 44)[0] == "eager"
    assert FastGenerator(model).plan(1, 5, 10**7, use_cache=False)[0] == "eager"


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


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.1), ("int8", 0.5)])
def test_lower_precision_logits_within_tolerance(precision: str, tolerance: float) -> None:
    """bf16: max |logit - fp32 logit| <= 0.1 x the fp32 logits' std; int8: <= 0.5 x (on this
    randomly initialised model; the quality cost on trained models is measured in bits per
    byte, docs/PERFORMANCE.md). Forward, decode step and DecodeStep all checked."""
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
    greedy = FastGenerator(model, precision=precision).generate(
        ids[:, :4], max_new_tokens=6, do_sample=False)
    assert greedy.shape == (2, 10) and torch.equal(greedy[:, :4], ids[:, :4])


@pytest.mark.slow
def test_fast_generator_compiled_path_equals_generate() -> None:
    """Compiled fixed-shape DecodeStep through generate: greedy tokens equal, sampled tokens
    equal with the same generator (penalty, nucleus, EOS); ~20-60 s of compiling."""
    model = _model(15)
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 6))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    fast = FastGenerator(model, costs=DecodeCosts(compile_cold=0.0, compile_cached=0.0))
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


def test_decode_step_over_a_cache_view_writes_the_shared_cache() -> None:
    """A smaller DecodeStep over `KVCache.view` fills the big cache's first rows and columns,
    and a cache of the wrong shape is refused by name."""
    from microtransformer.fast_generate import DecodeStep

    model = _model(7)
    big = DecodeStep(model, batch_size=4, max_len=16)
    small = DecodeStep(model, batch_size=2, max_len=8, cache=big.cache.view(2, 8))
    prompt = torch.randint(0, SMALL["vocab_size"], (5,))
    torch.testing.assert_close(small.prefill(1, prompt), big.prefill(1, prompt))
    k_small, _ = small.cache.layer(0)
    k_big, _ = big.cache.layer(0)
    assert k_small.data_ptr() == k_big.data_ptr()  # the same storage, not a copy
    assert k_big[1, :, :5].abs().sum() > 0 and k_big[2:].abs().sum() == 0
    with pytest.raises(ValueError, match="2 rows x 8 columns"):
        DecodeStep(model, batch_size=2, max_len=16, cache=big.cache.view(2, 8))
