"""Property-based tests (hypothesis): tokenizer round trips on arbitrary Unicode, `forward` and
`generate` on random valid inputs keep their contracts, random invalid arguments always raise
ValueError/TypeError naming the argument. max_examples is kept modest (~15 s in all)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from microtransformer.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from model import MicroTransformer

V, CTX = 40, 16
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    docs = ["the cat sat on the mat. " * 20, "def f(x):\n    return x * 2\n" * 10,
            "Ünïcödé 世界 🎉 ñ ø å\n" * 10]
    return train_tokenizer(docs, kind="bpe", vocab_size=400)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return train_tokenizer(["abcdefgh ijkl\nmnop"] * 5, kind="char", vocab_size=30)


@pytest.fixture(scope="module")
def model() -> MicroTransformer:
    torch.manual_seed(0)
    return MicroTransformer(vocab_size=V, max_seq_len=CTX, embed_dim=32, num_heads=2,
                            num_layers=2, ff_dim=64, dropout=0.0).eval()


def _no_special(s: str) -> bool:
    return not any(t in s for t in SPECIAL_TOKENS)


# ====================================================================== tokenizer
@FAST
@given(text=st.text(max_size=200))
def test_bpe_round_trip_on_arbitrary_unicode(bpe: Tokenizer, text: str) -> None:
    assume(_no_special(text))
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@FAST
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=100))
def test_char_tokenizer_ids_in_range_and_known_chars_round_trip(char: Tokenizer,
                                                                text: str) -> None:
    assume(_no_special(text))
    ids = char.encode(text)
    assert len(ids) == len(text) and all(0 <= i < char.vocab_size for i in ids)
    known = "".join(c for c in text if c in "abcdefghijklmnop \n")
    assert char.decode(char.encode(known)) == known


@FAST
@given(texts=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=4))
def test_encode_batch_left_pads_and_masks(bpe: Tokenizer, texts: list[str]) -> None:
    assume(all(_no_special(t) for t in texts))
    out = bpe.encode_batch(texts, padding_side="left")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == len(texts)
    for row, text in enumerate(texts):
        n = int(mask[row].sum())
        assert bool(mask[row, ids.shape[1] - n:].all()) and not bool(mask[row, :-n].any()) \
            if n < ids.shape[1] else bool(mask[row].all())
        assert bpe.decode(ids[row, ids.shape[1] - n:]) == text


# ====================================================================== forward / generate
@st.composite
def prompts(draw, max_len: int = CTX + 4):
    """(input_ids (B, T), left-padding attention_mask or None)."""
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, max_len))
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(0, V - 1), min_size=T, max_size=T),
                                     min_size=B, max_size=B)))
    if not draw(st.booleans()):
        return ids, None
    pads = [draw(st.integers(0, T - 1)) for _ in range(B)]  # >= 1 real token per row
    mask = torch.ones(B, T, dtype=torch.long)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
    return ids, mask


@FAST
@given(data=prompts(max_len=CTX))
def test_forward_shapes_and_finite_logits(model: MicroTransformer, data) -> None:
    ids, mask = data
    with torch.no_grad():
        logits = model(ids, mask)
    assert logits.shape == (*ids.shape, V)
    assert torch.isfinite(logits).all()


@FAST
@given(data=prompts(), max_new=st.integers(0, 6),
       temperature=st.one_of(st.just(0.0), st.floats(0.05, 3.0)),
       top_k=st.one_of(st.none(), st.integers(0, V + 5)),
       top_p=st.one_of(st.none(), st.floats(0.01, 1.0)),
       penalty=st.one_of(st.none(), st.floats(0.5, 2.0)),
       do_sample=st.booleans(), use_cache=st.booleans(),
       eos=st.one_of(st.none(), st.integers(0, V - 1)), seed=st.integers(0, 2**31 - 1))
def test_generate_contract(model: MicroTransformer, data, max_new, temperature, top_k, top_p,
                           penalty, do_sample, use_cache, eos, seed) -> None:
    ids, mask = data
    g = torch.Generator().manual_seed(seed)
    out = model.generate(ids, max_new_tokens=max_new, attention_mask=mask,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=penalty, do_sample=do_sample, use_cache=use_cache,
                         eos_token_id=eos, generator=g)
    B, T0 = ids.shape
    assert out.shape[0] == B and T0 <= out.shape[1] <= T0 + max_new
    if eos is None:
        assert out.shape[1] == T0 + max_new
    assert torch.equal(out[:, :T0], ids)  # the prompt is preserved
    assert out.dtype == torch.long and int(out.min()) >= 0 and int(out.max()) < V
    if eos is not None and out.shape[1] < T0 + max_new:
        assert bool((out[:, T0:] == eos).any(dim=1).all())  # stopped early: every row ended


# ====================================================================== invalid arguments
BAD_SAMPLING = st.one_of(
    st.tuples(st.just("temperature"),
              st.one_of(st.floats(max_value=-1e-6), st.just(math.nan), st.just("hot"))),
    st.tuples(st.just("top_k"), st.one_of(st.integers(max_value=-1), st.floats(0.5, 5.0),
                                          st.just("5"))),
    st.tuples(st.just("top_p"), st.one_of(st.floats(max_value=0.0), st.floats(1.0001, 1e6),
                                          st.just(math.nan), st.just("0.9"))),
    st.tuples(st.just("repetition_penalty"), st.one_of(st.floats(max_value=0.0),
                                                       st.just(math.nan))),
    st.tuples(st.just("max_new_tokens"), st.one_of(st.integers(max_value=-1),
                                                   st.floats(0.5, 5.0))),
    st.tuples(st.just("eos_token_id"), st.one_of(st.integers(max_value=-1),
                                                 st.integers(min_value=V))),
)


@FAST
@given(bad=BAD_SAMPLING)
def test_invalid_generate_arguments_raise_naming_the_argument(model: MicroTransformer,
                                                              bad) -> None:
    name, value = bad
    ids = torch.zeros(1, 3, dtype=torch.long)
    kwargs = {"max_new_tokens": 2, name: value}
    with pytest.raises((ValueError, TypeError), match=name):
        model.generate(ids, **kwargs)


@st.composite
def bad_inputs(draw):
    """(input_ids, attention_mask, the argument the error must name)."""
    kind = draw(st.sampled_from(["ids_1d", "ids_float", "ids_range", "ids_long", "ids_list",
                                 "mask_shape", "mask_values", "mask_type"]))
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, CTX))
    ids = torch.randint(0, V, (B, T))
    if kind == "ids_1d":
        return ids[0], None, "input_ids"
    if kind == "ids_float":
        return ids.float(), None, "input_ids"
    if kind == "ids_range":
        # any id an int64 tensor can hold outside [0, V) (beyond int64 cannot be stored at all)
        lo, hi = -(2**63), 2**63 - 1
        bad = draw(st.one_of(st.integers(lo, -1), st.integers(V, hi)))
        ids[draw(st.integers(0, B - 1)), draw(st.integers(0, T - 1))] = bad
        return ids, None, "token id"
    if kind == "ids_long":
        return torch.randint(0, V, (B, CTX + draw(st.integers(1, 8)))), None, "max_seq_len"
    if kind == "ids_list":
        return ids.tolist(), None, "input_ids"
    if kind == "mask_shape":
        return ids, torch.ones(B, T + draw(st.integers(1, 3))), "attention_mask"
    if kind == "mask_values":
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, -1] = draw(st.sampled_from([2, -1, 7]))
        return ids, mask, "attention_mask"
    return ids, ids.tolist(), "attention_mask"


@FAST
@given(bad=bad_inputs())
def test_invalid_forward_inputs_raise_naming_the_argument(model: MicroTransformer,
                                                          bad) -> None:
    ids, mask, name = bad
    with pytest.raises((ValueError, TypeError), match=name):
        model(ids, mask)
