"""Generation: KV cache == recompute, batching, sampling semantics, stopping, sliding window;
the prefill and one-token decode step over the model's one forward."""

from __future__ import annotations

import pytest
import torch

from model import MicroTransformer
from model.attention import KVCache
from model.generation import decode_step, prefill
from tests.conftest import TINY

V = TINY["vocab_size"]
SMALL = {"vocab_size": 97, "max_seq_len": 48, "embed_dim": 32, "num_heads": 4,
         "num_layers": 3, "ff_dim": 64, "dropout": 0.0}


def _model(seed: int = 0) -> MicroTransformer:
    torch.manual_seed(seed)
    return MicroTransformer(**SMALL).eval()


def prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_greedy(model: MicroTransformer, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by full recomputation through forward(), one token at a time."""
    for _ in range(n):
        window = ids[:, -model.max_seq_len:]
        next_id = model(window)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def test_greedy_kv_cache_equals_full_recompute(tiny_model):
    ids = prompt(2, 5, 0)
    expected = reference_greedy(tiny_model, ids, 20)
    assert torch.equal(tiny_model.generate(ids, max_new_tokens=20, do_sample=False), expected)
    assert torch.equal(
        tiny_model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False), expected
    )


def test_cached_decode_logits_equal_recompute_logits(tiny_model):
    ids = prompt(1, 4, 1)
    seen = []
    out = tiny_model.generate(ids, max_new_tokens=10, do_sample=False, streamer=seen.append)
    assert len(seen) == 10
    assert torch.equal(torch.stack(seen, dim=1), out[:, 4:])
    # every generated token is the argmax of a full forward over the prefix
    logits = tiny_model(out[:, :-1])
    assert torch.equal(logits[:, 3:].argmax(-1), out[:, 4:])


def test_sampled_generation_with_cache_equals_without(tiny_model):
    ids = prompt(3, 6, 2)
    kwargs = dict(max_new_tokens=15, temperature=0.9, top_k=20, top_p=0.9)
    a = tiny_model.generate(ids, generator=torch.Generator().manual_seed(5), **kwargs)
    b = tiny_model.generate(
        ids, generator=torch.Generator().manual_seed(5), use_cache=False, **kwargs
    )
    assert torch.equal(a, b)


def test_context_slides_past_max_seq_len(tiny_model):
    ids = prompt(2, 20, 3)
    n = 30  # 50 tokens total > max_seq_len 32
    expected = reference_greedy(tiny_model, ids, n)
    assert torch.equal(tiny_model.generate(ids, max_new_tokens=n, do_sample=False), expected)


def test_prompt_longer_than_context_is_cropped(tiny_model):
    ids = prompt(1, 40, 4)
    expected = reference_greedy(tiny_model, ids, 5)
    assert torch.equal(tiny_model.generate(ids, max_new_tokens=5, do_sample=False), expected)


def test_batched_left_padded_greedy_equals_each_prompt_alone(tiny_model):
    prompts = [prompt(1, n, 10 + n)[0] for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batched = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for i, p in enumerate(prompts):
        alone = tiny_model.generate(p[None], max_new_tokens=12, do_sample=False)
        assert torch.equal(batched[i, width - len(p):], alone[0]), i


def test_batched_left_padded_sliding_equals_alone(tiny_model):
    prompts = [prompt(1, n, 20 + n)[0] for n in (4, 10)]
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 10 - len(p):] = p
        mask[i, 10 - len(p):] = 1
    batched = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False)
    # row 1 has no padding: it must equal the unbatched sliding-window decode exactly
    alone = tiny_model.generate(prompts[1][None], max_new_tokens=25, do_sample=False)
    assert torch.equal(batched[1], alone[0])


def test_top_k_1_equals_greedy(tiny_model):
    ids = prompt(2, 5, 5)
    greedy = tiny_model.generate(ids, max_new_tokens=12, do_sample=False)
    top1 = tiny_model.generate(ids, max_new_tokens=12, temperature=1.3, top_k=1)
    assert torch.equal(top1, greedy)
    assert torch.equal(tiny_model.generate(ids, max_new_tokens=12, temperature=0), greedy)


def test_same_seed_same_sample_and_different_seed_differs(tiny_model):
    ids = prompt(1, 5, 6)
    torch.manual_seed(123)
    a = tiny_model.generate(ids, max_new_tokens=30, temperature=1.0)
    torch.manual_seed(123)
    b = tiny_model.generate(ids, max_new_tokens=30, temperature=1.0)
    torch.manual_seed(321)
    c = tiny_model.generate(ids, max_new_tokens=30, temperature=1.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_max_length_counts_the_prompt(tiny_model):
    ids = prompt(1, 10, 7)
    assert tiny_model.generate(ids, max_length=20, temperature=0.8, top_k=50).shape == (1, 20)
    assert tiny_model.generate(ids, max_length=10).shape == (1, 10)
    assert tiny_model.generate(ids, max_length=5, max_new_tokens=3).shape == (1, 13)


def test_eos_finishes_rows_and_stops_when_all_done(tiny_model):
    ids = prompt(2, 4, 8)
    free = tiny_model.generate(ids, max_new_tokens=10, do_sample=False)
    eos = int(free[0, 6])  # row 0's third generated token
    out = tiny_model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    row0 = out[0, 4:].tolist()
    first = row0.index(eos)
    assert all(t == eos for t in row0[first:])  # padded with eos once finished
    if eos not in free[1, 4:].tolist():
        assert out.shape[1] == 14  # row 1 never finished: full length
    single = tiny_model.generate(ids[:1], max_new_tokens=10, do_sample=False, eos_token_id=eos)
    assert single.shape[1] == 4 + first + 1  # stops as soon as the only row finishes


def test_repetition_penalty_discourages_repeats(tiny_model):
    ids = prompt(1, 4, 9)
    plain = tiny_model.generate(ids, max_new_tokens=25, do_sample=False)
    penalised = tiny_model.generate(ids, max_new_tokens=25, do_sample=False, repetition_penalty=5.0)
    assert len(set(penalised[0].tolist())) >= len(set(plain[0].tolist()))
    assert not torch.equal(plain, penalised)


def test_generate_restores_training_mode_and_returns_normal_tensor():
    model = MicroTransformer(**TINY, dropout=0.2).train()
    out = model.generate(prompt(1, 3, 1), max_new_tokens=4)
    assert model.training
    assert not out.is_inference()


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
    dict(repetition_penalty=0.0), dict(max_new_tokens=-1), dict(max_length=2),
    dict(eos_token_id=V),
])
def test_bad_generation_arguments_raise_value_error(tiny_model, bad):
    with pytest.raises(ValueError):
        tiny_model.generate(prompt(1, 5, 0), **bad)


def test_right_padded_prompts_are_rejected(tiny_model):
    ids = prompt(2, 5, 0)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="left"):
        tiny_model.generate(ids, attention_mask=mask, max_new_tokens=3)


# ---------------------------------------------------------------- prefill and decode step
def test_sampled_generate_same_with_and_without_cache_small_model() -> None:
    model = _model(3)
    prompt = torch.randint(0, SMALL["vocab_size"], (3, 6))
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(11)
        outs.append(model.generate(prompt, max_new_tokens=20, temperature=0.8, top_k=10,
                                   generator=g, use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])


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
            model.hidden_states(prompt[None], torch.arange(len(prompt)), None,
                                cache.rows(row, row + 1), 0)
        cols = torch.tensor(lengths)  # (B,)
        mask = (torch.arange(S)[None, :] <= cols[:, None])[:, None, None, :]  # (B, 1, 1, S)
        got = decode_step(model, nxt, cols, cache, cols, mask)  # (B, V)
        for row, prompt in enumerate(prompts):
            full = torch.cat([prompt, nxt[row:row + 1]])[None]
            ref = model(full)[0, -1]
            torch.testing.assert_close(got[row], ref, atol=1e-5, rtol=1e-5)


def test_decode_step_per_row_columns_needs_a_mask() -> None:
    model = _model()
    cfg = model.config
    cache = KVCache(cfg.num_layers, 1, cfg.num_heads, 4, cfg.head_dim,
                    dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="key mask"):
        decode_step(model, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                    cache, torch.zeros(1, dtype=torch.long))


def test_explicit_attention_decode_step_matches_sdpa() -> None:
    model = _model(11)
    cfg = model.config
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 6))
    logits = []
    for explicit in (False, True):
        cache = KVCache(cfg.num_layers, 2, cfg.num_heads, 10, cfg.head_dim,
                        dtype=torch.float32, device=torch.device("cpu"))
        with torch.no_grad():
            prefill(model, prompt, cache)
            cols = torch.tensor([6, 6])
            mask = (torch.arange(10)[None, :] <= cols[:, None])[:, None, None, :]
            logits.append(decode_step(model, prompt[:, -1], cols, cache, cols, mask,
                                      explicit_attention=explicit))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_block_one_token_cached_forward_matches_full_forward() -> None:
    """One block forward serves all: T tokens then one more through the cache (one column for
    all rows, or per-row columns) give the full causal forward's last position."""
    model = _model()
    block = model.blocks[0]
    B, T, C = 2, 5, SMALL["embed_dim"]
    x = torch.randn(B, T + 1, C)
    nh, hs = SMALL["num_heads"], C // SMALL["num_heads"]
    with torch.no_grad():
        full = block(x)  # (B, T + 1, C), no cache
        cache = KVCache(1, B, nh, T + 1, hs, dtype=x.dtype, device=x.device)
        block(x[:, :T], None, cache.layer(0), 0)
        last = block(x[:, T:], None, cache.layer(0), T)  # (B, 1, C)
        rows = KVCache(1, B, nh, T + 1, hs, dtype=x.dtype, device=x.device)
        block(x[:, :T], None, rows.layer(0), 0)
        mask = torch.ones(B, 1, 1, T + 1, dtype=torch.bool)
        last_rows = block(x[:, T:], mask, rows.layer(0), torch.full((B,), T))
    torch.testing.assert_close(last[:, 0], full[:, T])
    torch.testing.assert_close(last_rows, last)
    torch.testing.assert_close(rows.k, cache.k)
    torch.testing.assert_close(rows.v, cache.v)


def test_explicit_attention_forward_matches_sdpa() -> None:
    model = _model(2)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        for attn_mask in (None, model.attention_mask_4d(mask)):
            positions = torch.arange(9)
            ref = model.hidden_states(ids, positions, attn_mask)
            got = model.hidden_states(ids, positions, attn_mask, explicit_attention=True)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
