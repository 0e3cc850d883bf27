"""Hugging Face / ONNX export and GPT-2 import, checked through transformers and onnxruntime."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from microtransformer import export, export_onnx
from microtransformer.checkpoint import load_run, save_weights
from microtransformer.cli import main
from microtransformer.errors import UserError
from microtransformer.tokenizer import Tokenizer, train_tokenizer
from model import MicroTransformer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TEXT = ["the quick brown fox jumps over the lazy dog. ", "pack my box with five dozen jugs! ",
        "how vexingly quick daft zebras jump; sphinx of black quartz, judge my vow. "]
ATOL = 1e-4


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    return train_tokenizer(TEXT * 20, kind="bpe", vocab_size=300)


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return train_tokenizer(TEXT, kind="char", vocab_size=64)


def make_model(vocab_size: int, seed: int = 0, dropout: float = 0.1) -> MicroTransformer:
    """Tiny model with every parameter perturbed (LayerNorms, biases), so a mapping slip shows."""
    torch.manual_seed(seed)
    m = MicroTransformer(vocab_size=vocab_size, max_seq_len=32, embed_dim=32, num_heads=2,
                         num_layers=2, ff_dim=48, dropout=dropout)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def make_run(path: Path, tok: Tokenizer, seed: int = 0) -> tuple[Path, MicroTransformer,
                                                                 MicroTransformer]:
    """A training-run directory (full nested config, last + best weights, tokenizer)."""
    last, best = make_model(tok.vocab_size, seed), make_model(tok.vocab_size, seed + 100)
    path.mkdir(parents=True)
    cfg = {"model": last.config.to_dict(), "train": {}, "data": {}}
    (path / "config.json").write_text(json.dumps(cfg))
    save_weights(last, path / "model.safetensors", step=2)
    save_weights(best, path / "best.safetensors", step=1)
    tok.save(path / "tokenizer.json")
    return path, last, best


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory: pytest.TempPathFactory, bpe_tok: Tokenizer
              ) -> tuple[Path, MicroTransformer]:
    out = tmp_path_factory.mktemp("hf") / "gpt2"
    model = make_model(bpe_tok.vocab_size)
    export.export_hf(model, out, bpe_tok)
    return out, model


@pytest.fixture(scope="module")
def hf_model(hf_export: tuple[Path, MicroTransformer]) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(hf_export[0]).eval()


def random_batch(vocab: int, B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and a left-padded mask (row b has b * 3 padding tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, : min(3 * b, T - 1)] = 0
    return ids, mask


# ============================================================================ Hugging Face
def test_hf_directory_loads_without_custom_code(hf_export, hf_model) -> None:
    out, model = hf_export
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json"} <= names
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    c = hf_model.config
    assert (c.model_type, c.activation_function, c.n_inner, c.layer_norm_epsilon) == \
        ("gpt2", "gelu", 48, 1e-5)
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.1, 0.1, 0.1)
    assert c.tie_word_embeddings is False
    # untied: the head keeps the unscaled table, wte the scaled one
    emb = model.token_embedding.embedding.weight
    assert torch.equal(hf_model.lm_head.weight, emb)
    assert torch.allclose(hf_model.transformer.wte.weight, emb * math.sqrt(32))
    assert hf_model.lm_head.weight.data_ptr() != hf_model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize(("B", "T"), [(1, 7), (3, 32)])
def test_hf_logits_match(hf_export, hf_model, B: int, T: int) -> None:
    _, model = hf_export
    ids, _ = random_batch(model.vocab_size, B, T, seed=T)
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert (ours - theirs).abs().max().item() <= ATOL


def test_hf_logits_match_left_padded(hf_export, hf_model) -> None:
    _, model = hf_export
    ids, mask = random_batch(model.vocab_size, 4, 20, seed=1)
    pos = MicroTransformer.positions_from_mask(mask)
    with torch.no_grad():
        ours = model(ids, mask, position_ids=pos)
        theirs = hf_model(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()  # padding positions' outputs are meaningless in both
    assert (ours - theirs)[real].abs().max().item() <= ATOL
    # the padded rows' real tokens also equal the unpadded computation
    with torch.no_grad():
        alone = model(ids[3:, 9:])
    assert (ours[3, 9:] - alone[0]).abs().max().item() <= ATOL


def test_hf_greedy_generation_identical(hf_export, hf_model, bpe_tok: Tokenizer) -> None:
    _, model = hf_export
    eos = bpe_tok.eos_token_id
    prompts = ["the quick", "pack my box with five", "sphinx"]
    batch = bpe_tok.encode_batch(prompts, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=12, temperature=0,
                          eos_token_id=eos)
    theirs = hf_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               eos_token_id=eos, pad_token_id=eos)  # both pad finished rows
    assert ours.tolist() == theirs.tolist()
    one = bpe_tok.encode("the quick", return_tensors="pt")
    ours1 = model.generate(one, max_new_tokens=12, temperature=0, eos_token_id=eos)
    theirs1 = hf_model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=12,
                                do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert ours1.tolist() == theirs1.tolist()
    assert ours1.shape[1] > one.shape[1]  # something was generated


def test_hf_tokenizer_loads_with_special_tokens(hf_export, bpe_tok: Tokenizer) -> None:
    out, _ = hf_export
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == \
        ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (bpe_tok.eos_token_id, bpe_tok.pad_token_id)
    assert tok.padding_side == "left"
    text = "the lazy zebra <|endoftext|> judges quartz"
    assert tok(text)["input_ids"] == bpe_tok.encode(text)  # no BOS added, same ids
    assert tok.decode(bpe_tok.encode(text)) == text
    batch = tok(["the", "quick brown fox"], padding=True, return_tensors="pt")
    ours = bpe_tok.encode_batch(["the", "quick brown fox"])
    assert torch.equal(batch["input_ids"], ours["input_ids"])
    assert torch.equal(batch["attention_mask"], ours["attention_mask"])


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_project_tokenizer_loads_in_pretrained_tokenizer_fast(
    tmp_path: Path, kind: str, bpe_tok: Tokenizer, char_tok: Tokenizer
) -> None:
    ours = bpe_tok if kind == "bpe" else char_tok
    path = ours.save(tmp_path / "tokenizer.json")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|pad|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (ours.eos_token_id, ours.pad_token_id)
    text = "judge my vow, quick fox<|endoftext|>"
    assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.decode(ours.encode(text), skip_special_tokens=True) == ours.decode(
        ours.encode(text))


def test_char_tokenizer_export_has_unk(tmp_path: Path, char_tok: Tokenizer) -> None:
    out = export.export_hf(make_model(char_tok.vocab_size), tmp_path / "hf", char_tok)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.unk_token == "\ufffd"
    assert tok("ß")["input_ids"] == char_tok.encode("ß") == [tok.unk_token_id]


def test_hf_pipeline_runs(hf_export) -> None:
    out, _ = hf_export
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    text = pipe("the quick", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("the quick")


# ---------------------------------------------------------------------------- import
def test_round_trip_export_import_is_exact(hf_export, bpe_tok: Tokenizer) -> None:
    out, model = hf_export
    back, tok = export.import_hf(out)
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # GPT-2 configs carry no init scheme; an import records "gpt2" (matters only for retraining)
    assert dataclasses.replace(back.config, init=model.config.init) == model.config
    assert tok == bpe_tok
    assert back.lm_head.weight is back.token_embedding.embedding.weight


def test_import_transformers_written_gpt2(tmp_path: Path) -> None:
    """A directory written by transformers itself (n_inner None -> 4 * n_embd), with its head set
    to wte / sqrt(d): imported logits equal GPT-2's."""
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                  activation_function="gelu", tie_word_embeddings=False,
                                  n_inner=None)
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in gpt2.parameters():
            p.add_(0.05 * torch.randn_like(p))
        gpt2.lm_head.weight.copy_(gpt2.transformer.wte.weight / math.sqrt(32))
    gpt2.save_pretrained(tmp_path / "src")
    model, tok = export.import_hf(tmp_path / "src")
    assert tok is None
    assert model.config.ff_dim == 128
    ids = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        assert (model(ids) - gpt2(ids).logits).abs().max().item() <= ATOL


def write_hf(path: Path, model: MicroTransformer, **overrides: object) -> Path:
    export.export_hf(model, path, force=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(overrides)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(("override", "message"), [
    ({"activation_function": "gelu_new"}, "tanh approximation"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"model_type": "llama"}, "model_type"),
])
def test_import_rejects_what_cannot_be_expressed(tmp_path: Path, override: dict,
                                                 message: str) -> None:
    src = write_hf(tmp_path / "src", make_model(50), **override)
    with pytest.raises(UserError, match=message):
        export.import_hf(src)


def test_import_of_gpt2s_own_tie_gives_an_untied_model(tmp_path: Path) -> None:
    """A GPT-2 whose head is wte itself (its own tie, stored or by tie_word_embeddings) is not
    our tied head (the table times sqrt(d)); it imports as head='untied' with GPT-2's logits."""
    torch.manual_seed(4)
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                  activation_function="gelu", tie_word_embeddings=True)
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in gpt2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gpt2.save_pretrained(tmp_path / "src")
    model, _ = export.import_hf(tmp_path / "src")
    assert model.config.head == "untied"
    ids = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        assert (model(ids) - gpt2(ids).logits).abs().max().item() <= ATOL


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_untied_head_exports_and_imports(tmp_path: Path, position: str) -> None:
    """head='untied' goes out as GPT-2 or GPT-NeoX with its own lm_head / embed_out (the same
    logits in transformers) and comes back untied with the same logits."""
    torch.manual_seed(6)
    model = MicroTransformer(vocab_size=50, max_seq_len=16, embed_dim=32, num_heads=4,
                             num_layers=1, ff_dim=48, position=position, head="untied").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export.export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    back, _ = export.import_hf(out)
    assert dataclasses.replace(back.config, init=model.config.init) == model.config  # no init in HF
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= ATOL
        assert (back(ids) - model(ids)).abs().max().item() <= ATOL
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


def test_import_refuses_pickle_only(tmp_path: Path) -> None:
    src = write_hf(tmp_path / "src", make_model(50))
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        export.import_hf(src)


# ============================================================================ CLI
def test_cli_export_hf_best_then_import(tmp_path: Path, bpe_tok: Tokenizer,
                                        capsys: pytest.CaptureFixture) -> None:
    run, _, best = make_run(tmp_path / "run", bpe_tok)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"),
                 "--best"]) == 0
    assert "best" in capsys.readouterr().out
    # the output exists now: refused without --force, one clear line, exit 2
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    model, tok, _ = load_run(tmp_path / "back")  # a usable run directory
    assert tok == bpe_tok
    for a, b in zip(best.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("argv", "message"), [
    (["--format", "tflite"], "unknown --format 'tflite'"),
    (["--format", "hf", "--opset", "17"], "--opset only applies to --format onnx"),
    (["--format", "onnx", "--opset", "9"], "opset >= 14"),
])
def test_cli_export_errors(tmp_path: Path, bpe_tok: Tokenizer, capsys: pytest.CaptureFixture,
                           argv: list[str], message: str) -> None:
    run, _, _ = make_run(tmp_path / "run", bpe_tok)
    assert main(["export", str(run), *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_formats_match_module() -> None:
    from microtransformer.commands import export as cmd

    assert cmd.FORMATS == export.FORMATS
    assert cmd.DEFAULT_OPSET == export_onnx.DEFAULT_OPSET


# ============================================================================ ONNX
def onnx_max_diff(path: Path, model: MicroTransformer, B: int, T: int, with_mask: bool,
                  seed: int) -> float:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = random_batch(model.vocab_size, B, T, seed)
    feeds = {"input_ids": ids.numpy()}
    if with_mask:
        feeds["attention_mask"] = mask.numpy()
    (logits,) = sess.run(["logits"], feeds)
    with torch.no_grad():
        ref = model(ids, mask if with_mask else None).numpy()
    assert logits.shape == (B, T, model.vocab_size)
    real = mask.bool().numpy() if with_mask else np.ones((B, T), dtype=bool)
    return float(np.abs(logits - ref)[real].max())


def test_cli_onnx_export_parity(tmp_path: Path, bpe_tok: Tokenizer) -> None:
    run, last, _ = make_run(tmp_path / "run", bpe_tok)
    out = tmp_path / "model.onnx"
    ort = pytest.importorskip("onnxruntime")
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert sess.get_inputs()[0].shape == ["batch", "sequence"]
    for B, T, seed in ((1, 5, 0), (4, 32, 1)):  # two sizes, the second left-padded
        assert onnx_max_diff(out, last, B, T, True, seed) <= ATOL
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 2  # exists
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--force"]) == 0


def test_onnx_without_mask(tmp_path: Path) -> None:
    model = make_model(70)
    out = export_onnx.export_onnx(model, tmp_path / "m.onnx", with_attention_mask=False, opset=14)
    for B, T, seed in ((2, 1, 0), (3, 19, 1)):
        assert onnx_max_diff(out, model, B, T, False, seed) <= ATOL
    assert model.training is False


@pytest.mark.slow
def test_onnx_dynamo_exporter(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    model = make_model(70)
    out = export_onnx.export_onnx(model, tmp_path / "m.onnx", dynamo=True)
    for B, T, seed in ((1, 3, 0), (3, 24, 1)):
        assert onnx_max_diff(out, model, B, T, True, seed) <= ATOL


def test_attention_dropout_maps_to_attn_pdrop_and_back() -> None:
    cfg = make_model(50, dropout=0.1).config
    apart = dataclasses.replace(cfg, attn_dropout=0.0)
    hf = export.hf_config(apart)
    assert (hf["resid_pdrop"], hf["embd_pdrop"], hf["attn_pdrop"]) == (0.1, 0.1, 0.0)
    back = export.model_config_from_hf(hf)
    assert (back.dropout, back.attn_dropout, back.attention_dropout) == (0.1, 0.0, 0.0)
    same = export.model_config_from_hf(export.hf_config(cfg))  # one dropout everywhere
    assert (same.dropout, same.attn_dropout) == (0.1, None)


def test_architecture_variants_go_to_onnx_and_hf_and_gguf_refuse_what_they_cannot_hold(
        tmp_path: Path, bpe_tok: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    """Rotary positions, squared ReLU and QK-norm: ONNX holds them (same logits, padded rows
    included; the web page's step too, tests/microtransformer/test_export_web.py); Hugging
    Face holds rotary positions (GPT-NeoX) and squared ReLU but not QK-norm, GGUF rotary
    positions (gptneox) and with them squared ReLU (nemotron) but not QK-norm; each refusal
    is one line naming what it cannot hold and the options that train without it, and writes
    nothing."""
    torch.manual_seed(3)
    model = MicroTransformer(vocab_size=bpe_tok.vocab_size, max_seq_len=32, embed_dim=32,
                             num_heads=2, num_layers=2, ff_dim=48, dropout=0.0,
                             position="rotary", activation="relu2", qk_norm=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": model.config.to_dict(), "train": {},
                                                 "data": {}}))
    save_weights(model, run / "model.safetensors", step=1)
    bpe_tok.save(run / "tokenizer.json")
    for fmt, refused, fix in (("hf", "qk_norm=True", "--model.qk_norm false"),
                              ("gguf", "qk_norm=True", "--model.qk_norm false")):
        out = tmp_path / "out_hf" if fmt == "hf" else tmp_path / "m.gguf"
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert f"this model's {refused} (" in err and fix in err, err
        assert "--format onnx or --format web" in err
        assert not out.exists()
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(onnx_path)]) == 0
    for B, T, seed in ((1, 5, 0), (3, 24, 1)):
        assert onnx_max_diff(onnx_path, model, B, T, True, seed) <= ATOL


@pytest.mark.parametrize("variant, arch", [
    ({"position": "rotary"}, "GPTNeoXForCausalLM"),
    ({"position": "rotary", "activation": "relu2"}, "GPTNeoXForCausalLM"),
    ({"activation": "relu2"}, "GPT2LMHeadModel"),
])
def test_rotary_and_relu2_models_export_with_our_logits(tmp_path: Path, bpe_tok: Tokenizer,
                                                        variant: dict, arch: str) -> None:
    """position='rotary' becomes a GPTNeoXForCausalLM (sequential residual, rows reordered for
    its rotation), squared ReLU transformers' 'relu2' activation: the same logits, left-padded
    rows included, and the same greedy tokens; each imports back to the same model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    model = MicroTransformer(vocab_size=bpe_tok.vocab_size, max_seq_len=32, embed_dim=32,
                             num_heads=4, num_layers=2, ff_dim=48, dropout=0.0,
                             **variant).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = export.export_hf(model, tmp_path / "hf", bpe_tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    ids = torch.randint(0, model.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        assert float((hf(ids).logits - model(ids)).abs().max()) <= ATOL
        pos = MicroTransformer.positions_from_mask(mask)  # as we count them (GPT-2 needs it)
        padded = (hf(ids, attention_mask=mask, position_ids=pos).logits
                  - model(ids, attention_mask=mask))
        assert float(padded[mask.bool()].abs().max()) <= ATOL
        greedy = hf.generate(ids[1:, :5], max_new_tokens=20, do_sample=False,
                             pad_token_id=bpe_tok.pad_token_id)
    assert torch.equal(greedy, model.generate(ids[1:, :5], max_new_tokens=20, do_sample=False))
    back, _ = export.import_hf(out)  # and back: GPT-2 or GPT-NeoX, to the same model
    assert dataclasses.replace(back.config, init=model.config.init) == model.config  # init: n/a
    with torch.no_grad():
        assert float((back(ids) - model(ids)).abs().max()) <= ATOL
        assert float((back(ids, attention_mask=mask) - model(ids, attention_mask=mask)
                      )[mask.bool()].abs().max()) <= ATOL


def test_gpt_neox_import_refuses_what_our_block_cannot_express(tmp_path: Path,
                                                               bpe_tok: Tokenizer) -> None:
    """A GPT-NeoX directory that is not our block (parallel residual, partial rotary, another
    rotary base or activation) is refused, naming the option; NeoX's own tie imports untied."""
    torch.manual_seed(5)
    model = MicroTransformer(vocab_size=bpe_tok.vocab_size, max_seq_len=32, embed_dim=32,
                             num_heads=4, num_layers=1, ff_dim=48, position="rotary").eval()
    out = export.export_hf(model, tmp_path / "hf", bpe_tok)
    good = json.loads((out / "config.json").read_text())
    for change, message in (({"use_parallel_residual": True}, "use_parallel_residual"),
                            ({"rope_parameters": {**good["rope_parameters"],
                                                  "partial_rotary_factor": 0.25}}, "0.25 of each"),
                            ({"rope_parameters": {**good["rope_parameters"],
                                                  "rope_theta": 500.0}}, "rotary base 500"),
                            ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new'")):
        (out / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(UserError, match=message):
            export.import_hf(out)
    (out / "config.json").write_text(json.dumps({**good, "tie_word_embeddings": True}))
    from safetensors.torch import load_file, save_file
    sd = load_file(out / "model.safetensors")
    del sd["embed_out.weight"]  # NeoX's own tie: the head is embed_in, which we can express
    save_file(sd, out / "model.safetensors")
    back, _ = export.import_hf(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, bpe_tok.vocab_size, (2, 16))
    with torch.no_grad():
        assert back.config.head == "untied"
        assert (back(ids) - hf(ids).logits).abs().max().item() <= ATOL
