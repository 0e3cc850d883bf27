"""The ahead-of-time compiled decode step (`decoding.aot`): greedy tokens equal
`model.generate`'s at batch 1 and with padding at batch 3, one package serves every model of
its shape (the second load does not compile), and a failed compile falls back to eager.

The package folder is one temporary folder for the module, so each batch size compiles once
(about 10-20 s each on a 2-core CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from microtransformer.decoding import aot
from microtransformer.decoding.aot import AOTDecoder, AOTDecodeStep
from microtransformer.decoding.generator import AutoPathGenerator, DecodeCosts
from microtransformer.quantization import Int8WeightLinear
from model import MicroTransformer

SMALL = {"vocab_size": 61, "max_seq_len": 40, "embed_dim": 32, "num_heads": 4,
         "num_layers": 2, "ff_dim": 64, "dropout": 0.0}
ALWAYS = DecodeCosts(compile_cold=0.0, compile_cached=0.0)  # the rule always compiles


@pytest.fixture(scope="module")
def package_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("aot-packages")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MICROTRANSFORMER_CACHE_DIR", str(folder))
        yield folder


def _model(seed: int) -> MicroTransformer:
    torch.manual_seed(seed)
    return MicroTransformer(**SMALL).eval()


def _prompt(batch: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    prompt = torch.randint(0, SMALL["vocab_size"], (batch, 7))
    if not padded:
        return prompt, None
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return prompt, mask


@pytest.mark.parametrize("batch, padded", [(1, False), (3, True)])
def test_packaged_step_gives_generates_tokens_and_is_reused(package_folder: Path, batch: int,
                                                            padded: bool) -> None:
    """Greedy tokens of the packaged step equal `model.generate`'s, over the whole context;
    a second model of the same shape (other weights) loads the package without compiling
    and gets its own tokens (the weights are swapped in, not baked in)."""
    first, second = _model(1), _model(2)
    prompt, mask = _prompt(batch, padded)
    n_new = SMALL["max_seq_len"] - prompt.size(1)  # up to the last cache column
    before = aot.compile_count
    step = AOTDecodeStep(first, batch)
    assert step.compiled_now and aot.compile_count == before + 1
    assert step.path.parent == package_folder / "decode" and step.path.is_file()
    again = AOTDecodeStep(second, batch)
    assert not again.compiled_now and aot.compile_count == before + 1  # loaded, not compiled
    for model, packaged in ((first, step), (second, again)):
        dec = AOTDecoder(packaged)
        ref = model.generate(prompt, max_new_tokens=n_new, do_sample=False,
                             attention_mask=mask)
        for _ in range(2):  # a decoder is reused: stale cache columns are not attended
            got = model.generate(prompt, max_new_tokens=n_new, do_sample=False,
                                 attention_mask=mask, decoder=dec)
            assert torch.equal(got, ref)
    kw = dict(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3,
              eos_token_id=3, attention_mask=mask)
    sampled = first.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    same = first.generate(prompt, generator=torch.Generator().manual_seed(1),
                          decoder=AOTDecoder(step), **kw)
    assert torch.equal(same, sampled)


def test_auto_path_generator_uses_the_cached_package(package_folder: Path) -> None:
    """The default generator takes the packaged path once the package is on disk (batch 1 was
    compiled by the test above, or is compiled here) and gives `generate`'s tokens."""
    model = _model(3)
    prompt, _ = _prompt(1, False)
    AOTDecodeStep(model, 1)  # on disk from here on
    before = aot.compile_count
    fast = AutoPathGenerator(model, quiet=True)
    assert fast.plan(1, 7, 30) == "compiled"
    got = fast.generate(prompt, max_new_tokens=30, do_sample=False)
    assert fast.last_path == "compiled" and aot.compile_count == before
    assert torch.equal(got, model.generate(prompt, max_new_tokens=30, do_sample=False))


def test_failed_compile_falls_back_to_eager(package_folder: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model = MicroTransformer(**(SMALL | {"ff_dim": 48})).eval()  # a shape not compiled yet

    def broken(*args: object) -> None:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(aot, "compile_package", broken)
    prompt, _ = _prompt(1, False)
    fast = AutoPathGenerator(model, costs=ALWAYS, quiet=True)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        got = fast.generate(prompt, max_new_tokens=12, do_sample=False)
    assert fast.last_path == "eager (compile failed)"
    assert torch.equal(got, model.generate(prompt, max_new_tokens=12, do_sample=False))
    fast.generate(prompt, max_new_tokens=12, do_sample=False)  # no second try, no warning
    assert fast.plan(1, 7, 12) == "eager"


def test_package_key_names_shape_batch_and_precision() -> None:
    """The key changes with the shape, batch and precision, not with the weights."""
    a, b = _model(1), _model(2)
    assert aot.package_key(a, 1, "fp32") == aot.package_key(b, 1, "fp32")
    wider = MicroTransformer(**(SMALL | {"ff_dim": 96}))
    keys = {aot.package_key(a, 1, "fp32"), aot.package_key(a, 2, "fp32"),
            aot.package_key(a, 1, "bf16"), aot.package_key(wider, 1, "fp32")}
    assert len(keys) == 4


def test_int8_and_other_devices_are_not_compiled() -> None:
    model = _model(4)
    with pytest.raises(aot.AOTCompileError, match="int8"):
        AOTDecodeStep(model, 1, precision="int8")
    assert AutoPathGenerator(model, precision="int8", costs=ALWAYS).plan(1, 7, 30) == "eager"


def test_int8_weight_only_package_computes_the_quantized_model(package_folder: Path) -> None:
    """int8wo: the packaged step (one fused reduction per linear over the int8 weights)
    computes what the eager int8 weight-only model computes: step logits equal up to float
    rounding, greedy tokens equal to the last context column; the fp32 model is untouched."""
    model = _model(5)
    prompt, _ = _prompt(1, False)
    step = AOTDecodeStep(model, 1, precision="int8wo")
    quantized = step.model
    assert isinstance(quantized.lm_head, Int8WeightLinear)
    assert quantized.lm_head.weight_int8.dtype == torch.int8
    assert type(model.lm_head) is torch.nn.Linear  # a copy was quantized
    n_new = SMALL["max_seq_len"] - prompt.size(1)
    ref = quantized.generate(prompt, max_new_tokens=n_new, do_sample=False)
    got = quantized.generate(prompt, max_new_tokens=n_new, do_sample=False,
                             decoder=AOTDecoder(step))
    assert torch.equal(got, ref)
    # one step's logits against the eager step of the same quantized model
    eager = quantized.generate(prompt, max_new_tokens=1, do_sample=False)
    dec = AOTDecoder(step)
    dec.prefill(prompt, None)
    T = prompt.size(1)
    packaged = dec.step(eager[:, -1], torch.tensor([T]), T, None)
    with torch.no_grad():
        full = quantized(eager)[:, -1].float()  # (1, V): eager forward over the sequence
    torch.testing.assert_close(packaged, full, atol=1e-4 * float(full.std()) + 1e-5, rtol=0)
    fast = AutoPathGenerator(model, precision="int8wo", quiet=True)
    assert fast.plan(1, 7, 30) == "compiled"  # the package is on disk
    assert torch.equal(fast.generate(prompt, max_new_tokens=30, do_sample=False),
                       ref[:, :T + 30])


def test_packaged_step_of_the_architecture_variants(package_folder: Path) -> None:
    """Rotary positions, squared ReLU, QK-norm and an untied head compile into the package
    too (rotary's table is a buffer kept out of the saved weights, given to the package as a
    constant),
    with `model.generate`'s greedy tokens over the whole context, left padding included;
    the variants are part of the package's name."""
    variant = {**SMALL, "position": "rotary", "activation": "relu2", "qk_norm": True,
               "head": "untied"}
    torch.manual_seed(5)
    model = MicroTransformer(**variant).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qk_gain.uniform_(0.5, 2.0)
        model.lm_head.weight.normal_(0.0, 0.05)  # the untied head, away from its zero start
    assert aot.package_key(model, 3, "fp32") != aot.package_key(_model(1), 3, "fp32")
    tied = MicroTransformer(**{**variant, "head": "tied"})
    assert aot.package_key(model, 3, "fp32") != aot.package_key(tied, 3, "fp32")
    prompt, mask = _prompt(3, True)
    n_new = SMALL["max_seq_len"] - prompt.size(1)
    ref = model.generate(prompt, max_new_tokens=n_new, do_sample=False, attention_mask=mask)
    got = model.generate(prompt, max_new_tokens=n_new, do_sample=False, attention_mask=mask,
                         decoder=AOTDecoder(AOTDecodeStep(model, 3)))
    assert torch.equal(got, ref)
