"""The opt-in architecture variants (rotary positions, squared ReLU, QK-norm, an untied head):
the seed's model is unchanged without them, and every decoding path gives the full forward's
logits with them."""

from __future__ import annotations

import math

import pytest
import torch

from model import MicroTransformer, ModelConfig
from model.attention import KVCache, apply_rotary
from model.generation import decode_step, prefill
from model.layers import RotaryTable
from model.utils import count_parameters, parameter_formula
from tests.conftest import TINY

VARIANTS = [
    {"position": "rotary"},
    {"activation": "relu2"},
    {"qk_norm": True},
    {"head": "untied"},
    {"position": "rotary", "activation": "relu2", "qk_norm": True, "head": "untied"},
]


def _model(seed: int = 0, **variant) -> MicroTransformer:
    torch.manual_seed(seed)
    model = MicroTransformer(**TINY, dropout=0.0, **variant).eval()
    with torch.no_grad():  # gains away from 1, so a gain that is ignored shows
        for block in model.blocks:
            if block.attn.qk_gain is not None:
                block.attn.qk_gain.uniform_(0.5, 2.0)
        if model.config.head == "untied":  # away from its zero start, so a head ignored shows
            model.lm_head.weight.normal_(0.0, 0.05)
    return model


def test_the_seed_model_has_no_variant_and_its_parameters_are_unchanged() -> None:
    seed = MicroTransformer(**TINY, dropout=0.0)
    assert seed.config.variants == []
    assert seed.rotary is None and seed.position_embedding is not None
    assert all(b.attn.qk_gain is None for b in seed.blocks)
    names = {n for n, _ in seed.named_parameters()}
    assert not any("qk_gain" in n for n in names)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_parameter_formula_counts_each_variant(variant) -> None:
    model = _model(**variant)
    assert parameter_formula(model.config) == count_parameters(model)
    seed_count = parameter_formula(ModelConfig(**TINY))
    expected = seed_count
    if variant.get("position") == "rotary":
        expected -= TINY["max_seq_len"] * TINY["embed_dim"]  # no position table
    if variant.get("qk_norm"):
        expected += TINY["num_layers"] * 2 * TINY["embed_dim"] // TINY["num_heads"]
    if variant.get("head") == "untied":
        expected += TINY["vocab_size"] * TINY["embed_dim"]  # the head's own matrix
    assert count_parameters(model) == expected
    assert model.config.variants  # named, for exports that refuse them


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_cached_decoding_gives_the_full_forwards_logits(variant) -> None:
    """Prefill + one-token steps, with one shared column and with per-row columns (the
    serving engine's mode), in both attention forms, against the full forward."""
    model = _model(**variant)
    c = model.config
    ids = torch.randint(0, c.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
        cache = KVCache(c.num_layers, 3, c.num_heads, c.max_seq_len, c.head_dim,
                        dtype=torch.float32, device=torch.device("cpu"))
        logits = prefill(model, ids[:, :8], cache)
        torch.testing.assert_close(logits, full[:, 7], atol=1e-5, rtol=1e-5)
        for t in range(8, 20):
            if t % 2:
                logits = decode_step(model, ids[:, t], torch.full((3,), t), cache, t)
            else:
                cols = torch.full((3,), t)
                mask = torch.ones(3, 1, 1, t + 1, dtype=torch.bool)
                logits = decode_step(model, ids[:, t], cols.clone(), cache, cols, mask,
                                     explicit_attention=t % 4 == 0)
            torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_left_padded_rows_match_the_unpadded_rows(variant) -> None:
    model = _model(**variant)
    gen = torch.Generator().manual_seed(2)
    short = torch.randint(0, model.vocab_size, (1, 6), generator=gen)
    long = torch.randint(0, model.vocab_size, (1, 10), generator=gen)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    batch = torch.cat([padded, long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        torch.testing.assert_close(out[0, 4:], model(short)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], model(long)[0], atol=1e-5, rtol=1e-5)
        greedy = model.generate(batch, max_new_tokens=6, do_sample=False, attention_mask=mask)
        alone = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(greedy[0, 4:], alone[0])


def test_rotary_logits_depend_only_on_relative_positions() -> None:
    """Shifting every position by the same amount leaves rotary's logits unchanged (and
    changes the learned table's): the property that makes them rotary."""
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    shifted = torch.arange(12) + 9
    rotary, learned = _model(position="rotary"), _model()
    with torch.no_grad():
        torch.testing.assert_close(rotary(ids, position_ids=shifted), rotary(ids),
                                   atol=1e-5, rtol=1e-5)
        assert not torch.allclose(learned(ids, position_ids=shifted), learned(ids), atol=1e-3)


def test_the_complex_rotation_equals_the_real_one_in_value_and_gradient() -> None:
    table = RotaryTable(16, 8)
    rope = table(torch.arange(16))  # (1, 1, T, hs)
    x = torch.randn(2, 3, 4, 16, 8, dtype=torch.float64, requires_grad=True)
    real = apply_rotary(x, rope.double())
    fast = apply_rotary(x, rope.double(), as_complex=True)
    torch.testing.assert_close(fast, real)
    (g_real,) = torch.autograd.grad(real.square().sum(), x)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
    torch.testing.assert_close(g_fast, g_real)
    # a rotation keeps each pair's length
    pairs = real.unflatten(-1, (4, 2)).norm(dim=-1)
    torch.testing.assert_close(pairs, x.unflatten(-1, (4, 2)).norm(dim=-1))


def test_training_mode_and_eval_mode_give_the_same_logits_without_dropout() -> None:
    """Training runs the complex rotation, eval the real one: the same function."""
    model = _model(position="rotary", qk_norm=True)
    ids = torch.randint(0, model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        evaluated = model(ids)
        model.train()
        trained = model(ids)
    torch.testing.assert_close(trained, evaluated, atol=1e-5, rtol=1e-5)


def test_qk_gains_are_used_and_get_gradients() -> None:
    model = _model(qk_norm=True)
    ids = torch.randint(0, model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    model.train()
    model(ids, labels=ids).backward()
    gain = model.blocks[0].attn.qk_gain
    assert gain.grad is not None and gain.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        before = model(ids)
        gain.mul_(3.0)
        assert not torch.allclose(model(ids), before, atol=1e-4)


def test_relu2_is_the_square_of_relu() -> None:
    model = _model(activation="relu2")
    ff = model.blocks[0].ff
    x = torch.randn(4, TINY["embed_dim"])
    with torch.no_grad():
        expected = ff.proj(torch.relu(ff.fc(x)) ** 2)
        torch.testing.assert_close(ff(x), expected)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_save_and_load_keep_the_variant(tmp_path, variant) -> None:
    model = _model(**variant)
    model.save_pretrained(str(tmp_path))
    loaded = MicroTransformer.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    ids = torch.randint(0, model.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


@pytest.mark.parametrize("bad, message", [
    ({"position": "alibi"}, "position='alibi' must be one of learned, rotary"),
    ({"activation": "swish"}, "activation='swish' must be one of gelu, relu2"),
    ({"qk_norm": "yes"}, "qk_norm='yes' must be true or false"),
    ({"position": "rotary", "embed_dim": 36, "num_heads": 4},
     "position='rotary' needs an even head size"),
])
def test_bad_variant_values_are_named(bad, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig(**{**TINY, **bad})


def test_an_untied_head_is_its_own_matrix_and_starts_at_zero() -> None:
    """head='untied': the head is not the token table, starts at zero (every next token
    equally likely: the loss starts at ln V), trains apart from the table, and survives a
    save and load."""
    torch.manual_seed(0)
    model = MicroTransformer(**TINY, dropout=0.0, head="untied")
    assert model.lm_head.weight is not model.token_embedding.weight
    assert not model.lm_head.weight.detach().any()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    assert abs(float(loss) - math.log(TINY["vocab_size"])) < 1e-6
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.token_embedding.weight.grad is not None
    assert not torch.equal(model.lm_head.weight.grad, model.token_embedding.weight.grad)


def test_untied_model_round_trips_through_save_pretrained(tmp_path) -> None:
    model = _model(head="untied")
    model.save_pretrained(tmp_path / "m")
    back = MicroTransformer.from_pretrained(tmp_path / "m").eval()
    assert back.config == model.config
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    assert back.lm_head.weight is not back.token_embedding.weight


def test_zero_out_init_starts_every_block_as_the_identity() -> None:
    """init='zero_out': Kaiming as the seed's, but the attention and feed-forward output
    projections start at zero, so each block adds nothing and the network's first output is
    the final LayerNorm of the embeddings; the other weights are the seed's draws."""
    torch.manual_seed(3)
    model = MicroTransformer(**TINY, dropout=0.0, init="zero_out").eval()
    torch.manual_seed(3)
    seed = MicroTransformer(**TINY, dropout=0.0).eval()
    for block in model.blocks:
        assert not block.attn.proj.weight.detach().any()
        assert not block.ff.proj.weight.detach().any()
    assert torch.equal(model.blocks[0].attn.qkv.weight, seed.blocks[0].attn.qkv.weight)
    assert model.config.variants == []  # an init is not an architecture: every export holds it
    assert model.config.departures == ["init='zero_out'"]  # but a run's header names it
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        x, _ = model.embed(ids, torch.arange(7))
        expected = model.lm_head(model.ln_f(x))
        torch.testing.assert_close(model(ids), expected)
