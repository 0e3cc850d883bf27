"""`DecodeStep`: the fixed-shape step decodes rows at different lengths as `generate` does,
over its own cache or a view of a larger one, compiled or (when compiling fails) eager."""

from __future__ import annotations

import pytest
import torch

from microtransformer.decoding.step import DecodeStep
from model import MicroTransformer

SMALL = {"vocab_size": 97, "max_seq_len": 48, "embed_dim": 32, "num_heads": 4,
         "num_layers": 3, "ff_dim": 64, "dropout": 0.0}


def _model(seed: int = 0, **over: object) -> MicroTransformer:
    torch.manual_seed(seed)
    return MicroTransformer(**(SMALL | over)).eval()


VARIANTS = {"position": "rotary", "activation": "relu2", "qk_norm": True}


@pytest.mark.parametrize("variant, compile", [({}, False), (VARIANTS, False), (VARIANTS, True)],
                         ids=["seed", "variants", "variants-compiled"])
def test_decode_step_slots_match_generate_greedy(variant: dict, compile: bool) -> None:
    """Slots prefilled at different times and lengths decode the same tokens as generate;
    with the architecture variants too, eager and compiled (the server's step)."""
    model = _model(5, **variant)
    torch.manual_seed(6)
    prompts = [torch.randint(0, SMALL["vocab_size"], (n,)) for n in (4, 9)]
    n_new = 6
    refs = [model.generate(p[None], max_new_tokens=n_new, do_sample=False)[0, len(p):]
            for p in prompts]
    dec = DecodeStep(model, batch_size=3, max_len=20, compile=compile)
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
    assert dec.compile_error is None
    assert dec.compiled == compile


def test_decode_step_over_a_cache_view_writes_the_shared_cache() -> None:
    """A smaller DecodeStep over `KVCache.view` fills the big cache's first rows and columns,
    and a cache of the wrong shape is refused by name."""
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


def test_decode_step_compile_failure_falls_back_to_eager() -> None:
    model = _model(9)
    prompt = torch.randint(0, SMALL["vocab_size"], (5,))
    ref = DecodeStep(model, 1, 12)
    step = DecodeStep(model, 1, 12, compile=True)

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("no compiler")

    step._compiled.compiled = broken
    for dec in (ref, step):
        dec.prefill(0, prompt)
    cols = torch.tensor([5])
    with pytest.warns(RuntimeWarning, match="eager"):
        got = step.step(prompt[-1:], cols, cols)
    torch.testing.assert_close(got, ref.step(prompt[-1:], cols, cols), atol=1e-5, rtol=1e-5)
    assert not step.compiled
    assert step.compile_error is not None and "no compiler" in step.compile_error
