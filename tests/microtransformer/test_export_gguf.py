"""GGUF export (`export --format gguf`), checked in real llama.cpp (node-llama-cpp), with
`gguf.GGUFReader` and with transformers' GGUF loader."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from microtransformer.cli import main
from microtransformer.tokenizer import train_tokenizer
from model import MicroTransformer
from tests.microtransformer.interop_helpers import (
    CORPUS,
    PROMPTS,
    greedy_ours,
    run_llama,
    train_tiny,
    write_run,
)

gguf = pytest.importorskip("gguf", reason="pip install 'gguf>=0.19,<0.20'")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY_TOKENS = 48


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """(run dir, model, tokenizer) of a small trained byte-level BPE model."""
    torch.set_num_threads(1)
    model, tok = train_tiny()
    run = write_run(tmp_path_factory.mktemp("gguf") / "run", model, tok)
    return run, model, tok


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run exported through the CLI in each --quant."""
    run = trained[0]
    out = tmp_path_factory.mktemp("gguf-out")
    paths = {}
    for quant in ("f32", "f16", "q8_0"):
        paths[quant] = out / f"model-{quant}.gguf"
        assert main(["export", str(run), "--format", "gguf", "--quant", quant,
                     "--out", str(paths[quant])]) == 0
    return paths


# ============================================================================ the file itself
def test_reads_back_with_gguf_reader(trained, files) -> None:
    _, model, tok = trained
    reader = gguf.GGUFReader(str(files["f32"]))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    cfg = model.config
    assert fields["general.architecture"] == "gpt2"
    assert fields["gpt2.context_length"] == cfg.max_seq_len
    assert fields["gpt2.embedding_length"] == cfg.embed_dim
    assert fields["gpt2.feed_forward_length"] == cfg.ff_dim
    assert fields["gpt2.block_count"] == cfg.num_layers
    assert fields["gpt2.attention.head_count"] == cfg.num_heads
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size
    assert all(tokens[i] == t for t, i in vocab.items())
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert len(fields["tokenizer.ggml.merges"]) > 0

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 12 * cfg.num_layers + 3
    emb = model.token_embedding.embedding.weight.detach().numpy()

    def values(name: str) -> np.ndarray:  # back in PyTorch (out, in) order
        t = tensors[name]
        return np.asarray(t.data).reshape(tuple(int(x) for x in reversed(t.shape)))

    assert np.array_equal(values("token_embd.weight"), emb * np.float32(math.sqrt(cfg.embed_dim)))
    assert np.array_equal(values("output.weight"), emb)  # the head, its own tensor
    qkv = model.blocks[1].attn.qkv
    assert np.array_equal(values("blk.1.attn_qkv.weight"), qkv.weight.detach().numpy())
    assert np.array_equal(values("blk.1.ffn_down.bias"),
                          model.blocks[1].ff.proj.bias.detach().numpy())
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    for quant, qtype in (("f16", "F16"), ("q8_0", "Q8_0")):
        r = gguf.GGUFReader(str(files[quant]))
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["blk.0.ffn_up.weight"] == qtype and types["output.weight"] == qtype
        assert types["blk.0.ffn_up.bias"] == "F32" and types["output_norm.weight"] == "F32"
    sizes = {q: p.stat().st_size for q, p in files.items()}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


# ============================================================================ refusals
def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1
    return err


def test_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tok = train_tokenizer(CORPUS * 5, kind="bpe", vocab_size=300)
    odd = MicroTransformer(vocab_size=tok.vocab_size, max_seq_len=16, embed_dim=32,
                           num_heads=2, num_layers=1, ff_dim=48)
    run = write_run(tmp_path / "odd", odd, tok)
    out = str(tmp_path / "o.gguf")
    _one_line_error(capsys, ["export", str(run), "--format", "gguf", "--quant", "q8_0",
                             "--out", out], "ff_dim=48")
    assert not Path(out).exists()
    _one_line_error(capsys, ["export", str(run), "--format", "gguf", "--quant", "q4",
                             "--out", out], "unknown --quant 'q4'")
    _one_line_error(capsys, ["export", str(run), "--format", "hf", "--quant", "f16",
                             "--out", out], "--quant only applies to --format gguf")
    assert main(["export", str(run), "--format", "gguf", "--quant", "f16", "--out", out]) == 0
    _one_line_error(capsys, ["export", str(run), "--format", "gguf", "--out", out],
                    "already exists")
    before = Path(out).read_bytes()
    _one_line_error(capsys, ["export", str(run), "--format", "gguf", "--quant", "q8_0",
                             "--force", "--out", out], "ff_dim=48")
    assert Path(out).read_bytes() == before  # a refused overwrite leaves the file as it was
    assert main(["export", str(run), "--format", "gguf", "--force", "--out", out]) == 0
    assert Path(out).read_bytes() != before  # f32 now
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # a word-level tokenizer that is not one-token-per-character has no llama.cpp form
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from microtransformer.tokenizer import Tokenizer

    words = HFTokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "?": 2}, unk_token="?"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    word_model = MicroTransformer(vocab_size=3, max_seq_len=16, embed_dim=32, num_heads=2,
                                  num_layers=1, ff_dim=64)
    word_run = write_run(tmp_path / "words", word_model, Tokenizer(words))
    _one_line_error(capsys, ["export", str(word_run), "--format", "gguf", "--out",
                             str(tmp_path / "w.gguf")], "only the character-level")


def test_byte_alphabet_is_the_byte_level_one() -> None:
    from tokenizers import pre_tokenizers

    from microtransformer.export_gguf import byte_alphabet

    text = bytes(range(256)).decode("latin-1")  # each byte once, as one code point <= 255
    spelled = "".join(byte_alphabet()[b] for b in text.encode("utf-8"))
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    assert pieces.pre_tokenize_str(text)[0][0] == spelled


# ============================================================================ llama.cpp
def test_llama_cpp_f32_tokens_and_greedy_equal_ours(trained, files, tmp_path: Path) -> None:
    _, model, tok = trained
    res = run_llama({"model": str(files["f32"]), "prompts": PROMPTS,
                     "max_tokens": GREEDY_TOKENS, "threads": 1}, tmp_path)
    for prompt, ids, plain, got in zip(PROMPTS, res["tokens"], res["tokens_plain"],
                                       res["greedy"], strict=True):
        ours = tok.encode(prompt)
        assert ids == ours, prompt  # special-token strings parsed, as our tokenizer does
        if "<|endoftext|>" not in prompt:
            assert plain == ours, prompt
        assert got == greedy_ours(model, ours, GREEDY_TOKENS), prompt


def test_llama_cpp_q8_0_and_f16_agreement(trained, files, tmp_path: Path) -> None:
    """f16 and q8_0 round the weights, so greedy decoding may part from ours at some point;
    this measures how many of the first tokens agree (printed; see docs/INTEROP.md)."""
    _, model, tok = trained
    for quant in ("f16", "q8_0"):
        res = run_llama({"model": str(files[quant]), "prompts": PROMPTS,
                         "max_tokens": GREEDY_TOKENS, "threads": 1}, tmp_path)
        same_prefix, same_tokens = [], 0
        for prompt, ids, got in zip(PROMPTS, res["tokens"], res["greedy"], strict=True):
            assert ids == tok.encode(prompt)  # the tokenizer is not quantized
            ours = greedy_ours(model, ids, GREEDY_TOKENS)
            pairs = list(zip(got, ours, strict=False))  # either may end at end-of-text
            prefix = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
            same_prefix.append(prefix)
            same_tokens += sum(a == b for a, b in pairs)
        total = GREEDY_TOKENS * len(PROMPTS)
        print(f"{quant}: identical greedy prefix {same_prefix} of at most {GREEDY_TOKENS} "
              f"tokens; {same_tokens}/{total} positions equal")
        assert all(p >= 1 for p in same_prefix), (quant, same_prefix)  # first token agrees


# ============================================================================ transformers
def test_transformers_loads_gguf(trained, files) -> None:
    """transformers' GGUF loader builds a GPT2LMHeadModel from the file. Its gpt2 mapping
    reads neither `feed_forward_length` (it would assume 4 x width) nor `context_length` as the
    position table's size (it keeps 1024), so the test passes the config with `n_inner` and
    `n_positions` set; with the exact GELU the logits match ours to float precision, with
    transformers' default for GGUF gpt2 (tanh GELU, as in llama.cpp) they are close."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads GGUF only with accelerate")
    _, model, tok = trained
    path = files["f32"]
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert config.model_type == "gpt2" and config.tie_word_embeddings is False
    config.n_inner = model.config.ff_dim
    config.n_positions = model.config.max_seq_len
    ids = torch.tensor([tok.encode(PROMPTS[0] + " " + PROMPTS[1])])  # (1, T)
    with torch.no_grad():
        ours = model(ids)
    diffs = {}
    for act in ("gelu", config.activation_function):
        config.activation_function = act
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config).eval()
        with torch.no_grad():
            diffs[act] = float((hf(ids).logits - ours).abs().max())
    print(f"max |logit diff| vs transformers (GGUF f32): {diffs}")
    assert diffs["gelu"] <= 1e-4
    assert max(diffs.values()) <= 0.05


def test_char_run_in_llama_cpp(tmp_path: Path) -> None:
    """A character-level run: known characters (multi-byte ones included) get our ids, and
    greedy decoding equals ours; an unknown character is dropped by llama.cpp (ours gives
    U+FFFD), as the export warns."""
    model, tok = train_tiny(kind="char")
    run = write_run(tmp_path / "char", model, tok)
    out = tmp_path / "char.gguf"
    with pytest.warns(UserWarning, match="drops characters outside the vocabulary"):
        assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 0
    known = ["Once upon a time", "The bear said: \"Hello", "It's fun\n at 5 o'clock",
             "the end<|endoftext|>One day", "«au revoir» café — 世界 🎉"]
    unknown = "a ~ zebra Ü"
    res = run_llama({"model": str(out), "prompts": [*known, unknown],
                     "max_tokens": GREEDY_TOKENS, "threads": 1}, tmp_path)
    for prompt, ids, got in zip(known, res["tokens"], res["greedy"], strict=False):
        assert ids == tok.encode(prompt), prompt
        assert got == greedy_ours(model, ids, GREEDY_TOKENS), prompt
    unk = tok.backend.token_to_id("\ufffd")
    ours = tok.encode(unknown)
    assert ours.count(unk) == 3  # "~", "z" and "Ü" are not in the corpus
    assert res["tokens"][-1] == [i for i in ours if i != unk]


@pytest.mark.parametrize("variant, arch, attention", [
    ({"position": "rotary"}, "gptneox", "attn_qkv"),
    ({"position": "rotary", "activation": "relu2", "head": "untied"}, "nemotron", "attn_q"),
])
def test_rotary_runs_go_in_as_gptneox_or_nemotron_and_llama_cpp_decodes_them_as_we_do(
        variant: dict[str, str], arch: str, attention: str, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    """position='rotary' is written as llama.cpp's gptneox, and with squared ReLU as its
    nemotron (Q, K and V as three tensors; here with an untied head, the cpu_char preset's
    block): no position table, query and key rows reordered for llama.cpp's rotation pairs;
    tokens and greedy decoding equal ours."""
    model, tok = train_tiny(**variant)
    run = write_run(tmp_path / "rotary", model, tok)
    out = tmp_path / "rotary.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 0
    assert f"llama.cpp architecture {arch}" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    names = {t.name for t in reader.tensors}
    assert "position_embd.weight" not in names and f"blk.0.{attention}.weight" in names
    res = run_llama({"model": str(out), "prompts": PROMPTS, "max_tokens": GREEDY_TOKENS,
                     "threads": 1}, tmp_path)
    for prompt, ids, got in zip(PROMPTS, res["tokens"], res["greedy"], strict=True):
        assert ids == tok.encode(prompt), prompt
        assert got == greedy_ours(model, ids, GREEDY_TOKENS), prompt


def test_variants_without_a_llama_cpp_graph_are_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Squared ReLU with learned positions and QK-norm have no llama.cpp graph here: one line
    naming the variant and a fix, nothing written."""
    tok = train_tokenizer(CORPUS * 5, kind="bpe", vocab_size=300)
    for variant, message, fix in (
            ({"activation": "relu2"}, "activation='relu2' only with rotary positions",
             "--model.position rotary"),
            ({"position": "rotary", "activation": "relu2", "qk_norm": True}, "qk_norm=True",
             "--model.qk_norm false")):
        other = MicroTransformer(vocab_size=tok.vocab_size, max_seq_len=16, embed_dim=32,
                                 num_heads=2, num_layers=1, ff_dim=64, **variant)
        bad = write_run(tmp_path / f"bad{len(variant)}", other, tok)
        target = tmp_path / "bad.gguf"
        err = _one_line_error(capsys, ["export", str(bad), "--format", "gguf", "--out",
                                       str(target)], message)
        assert fix in err, err
        assert not target.exists()
