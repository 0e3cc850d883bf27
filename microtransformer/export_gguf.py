"""GGUF export: one file with the architecture, hyper-parameters, weights and tokenizer, for
llama.cpp and everything built on it (node-llama-cpp, Ollama, LM Studio, transformers'
`gguf_file=`).

The file declares llama.cpp's `gpt2` architecture, whose graph is ours block for block (pre-LN,
fused QKV as [q | k | v], learned positions, biases everywhere), with three differences handled
here or stated:

1. Our input multiplies the token table by sqrt(embed_dim). The file's `token_embd` holds the
   scaled table and the head is written as its own tensor `output` (the unscaled table): left
   tied, llama.cpp would multiply the logits by sqrt(d).
2. `feed_forward_length` is written from `ff_dim` (llama.cpp's own converter assumes 4 x width;
   we write the file directly, with the `gguf` package).
3. llama.cpp's GPT-2 graph uses the tanh approximation of GELU where we use the exact (erf) one:
   logits differ slightly (greedy decoding agreed in our tests; see docs/INTEROP.md).

A model with rotary positions (`model.position = "rotary"`) goes in as llama.cpp's `gptneox`
architecture instead: the same blocks with rotary queries and keys and no position table. Its
rotation pairs each dimension i < d/2 of a head with i + d/2, ours pairs 2i with 2i + 1; the
export reorders the query and key rows of each head (evens, then odds), which gives the same
attention scores. Rotary positions with squared ReLU (`cpu_char`'s model) go in as llama.cpp's
`nemotron`: the same blocks again (LayerNorm with bias, rotary in the same pairing as gptneox,
an up / squared-ReLU / down feed-forward, optional biases), with the query, key and value
projections as three tensors; its activation is ours exactly, so no GELU caveat applies.
Squared ReLU with learned positions and QK-norm have no llama.cpp form here and are refused.

The tokenizer goes in as llama.cpp's `gpt2` BPE vocabulary with the `gpt-2` pre-tokenizer,
which is exactly our byte-level BPE (GPT-2's split regex, no prefix space). A character-level
tokenizer goes in as the same kind of vocabulary: each character is one token written in the
byte-level alphabet, and the merges only join the UTF-8 bytes of one character, so llama.cpp
gives one id per known character. A character outside the vocabulary is where the two differ:
ours gives the U+FFFD unknown token, llama.cpp drops it (the export warns).

Needs the `gguf` package (`pip install 'micro-transformer[gguf]'` or `pip install gguf`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from microtransformer.errors import UserError
from microtransformer.export import (
    LAYER_NORM_EPS,
    cpu_f32,
    embedding_tables,
    rotary_row_order,
)
from microtransformer.export_checks import check_seed_architecture
from microtransformer.fileio import atomic_write
from microtransformer.hub import unwrap_model
from model import ModelConfig
from model.layers import ROTARY_BASE

QUANTS = ("f32", "f16", "q8_0")
ARCH = "gpt2"  # llama.cpp's architecture name (LLM_ARCH_GPT2)
ROTARY_ARCH = "gptneox"  # for position="rotary" (LLM_ARCH_GPTNEOX, sequential residual)
RELU2_ARCH = "nemotron"  # for rotary + activation="relu2" (LLM_ARCH_NEMOTRON, LLM_FFN_RELU_SQR)
Q8_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values
GGUF_INSTALL = "pip install 'gguf>=0.19,<0.20'"


def _gguf() -> Any:
    """The `gguf` module, or a UserError naming the install command."""
    try:
        import gguf
    except ImportError as exc:
        raise UserError(f"GGUF export needs the gguf package: {GGUF_INSTALL}") from exc
    return gguf


# ============================================================================ checks
def check_quant(config: ModelConfig, quant: str) -> None:
    """Raise UserError (one line) when `quant` is unknown or the model's shapes cannot hold it.

    q8_0 stores each matrix row in blocks of 32 values; every row of our matrices is
    `embed_dim` or `ff_dim` long, so both must be multiples of 32.
    """
    if quant not in QUANTS:
        raise UserError(f"unknown --quant {quant!r}: use one of {', '.join(QUANTS)}")
    if quant == "q8_0":
        bad = [f"{name}={value}" for name, value in (("embed_dim", config.embed_dim),
                                                     ("ff_dim", config.ff_dim))
               if value % Q8_BLOCK]
        if bad:
            raise UserError(
                f"--quant q8_0 needs embed_dim and ff_dim to be multiples of {Q8_BLOCK} (rows "
                f"are quantized in blocks of {Q8_BLOCK}); this model has {', '.join(bad)}: use "
                "--quant f16 or f32"
            )


def check_tokenizer(tokenizer: Any, vocab_size: int, target: str = "GGUF") -> dict[str, Any]:
    """The parsed `tokenizer.json` of a tokenizer that llama.cpp's `gpt2` vocabulary (and the
    web page's tokenizer.js) reproduces, or UserError (one line, naming `target`) saying why not.

    Accepted, with at most `vocab_size` ids: byte-level BPE with GPT-2's split regex, no prefix
    space and no normalizer, and the one-token-per-character WordLevel tokenizers: the two kinds
    this project trains.
    """
    if tokenizer is None:
        raise UserError(f"{target} export needs the run's tokenizer.json (copy the data "
                        "directory's tokenizer.json into the run)")
    spec = json.loads(tokenizer.to_json())
    model_type = spec.get("model", {}).get("type")
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None:
        raise UserError(f"cannot write a tokenizer with a normalizer to {target}: only our "
                        "byte-level BPE and character-level tokenizers are supported")
    if model_type == "WordLevel":
        if not (pre.get("type") == "Split" and pre.get("pattern") == {"Regex": r"[\s\S]"}):
            raise UserError(
                f"cannot write this word-level tokenizer to {target}: only the character-level "
                "tokenizers `microtransformer prepare` trains (one token per character) map "
                "onto a BPE vocabulary"
            )
    elif model_type == "BPE":
        if not (pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space", False)
                and pre.get("use_regex", True)):
            raise UserError(
                f"cannot write this tokenizer to {target}: byte-level BPE needs GPT-2's split "
                "regex and no prefix space (as the tokenizers `microtransformer prepare` trains)"
            )
    else:
        raise UserError(f"cannot write a {model_type} tokenizer to {target}: only byte-level BPE "
                        "and our character-level tokenizer are supported")
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                        f"{vocab_size}; export the tokenizer the model was trained with")
    return spec


# ============================================================================ contents
def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value (index = byte), as byte-level BPE
    vocabularies (ours and llama.cpp's) spell tokens."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def char_vocabulary(vocab: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """A character-level vocabulary as byte-level BPE: each character spelled in the byte
    alphabet, and merges that join the UTF-8 bytes of one character left to right (never
    across characters), so BPE turns every known character into its one token."""
    alphabet = byte_alphabet()
    spelled: dict[str, int] = {}
    merges: dict[str, None] = {}  # ordered set
    for char, idx in vocab.items():
        symbols = [alphabet[b] for b in char.encode("utf-8")]
        spelled["".join(symbols)] = idx
        for i in range(1, len(symbols)):
            merges["".join(symbols[:i]) + " " + symbols[i]] = None
    return spelled, list(merges)


def gguf_vocabulary(spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int],
                                                                    list[str]]:
    """(tokens by id, token types, merges "a b") for a byte-level BPE or character-level
    `tokenizer.json` spec (see `check_tokenizer`).

    Special added tokens are CONTROL (tokenized from text only when llama.cpp is told to parse
    specials), other added tokens USER_DEFINED; ids the tokenizer does not use (the model's
    vocabulary may be larger) are `[PAD{id}]` placeholders marked UNUSED.
    """
    from gguf import TokenType

    vocab = {token: int(idx) for token, idx in spec["model"]["vocab"].items()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if spec["model"]["type"] == "WordLevel":
        added = {t["content"] for t in spec.get("added_tokens", [])}
        vocab, merges = char_vocabulary({t: i for t, i in vocab.items() if t not in added})
    by_id: dict[int, tuple[str, int]] = {}
    for token, idx in vocab.items():
        by_id[idx] = (token, int(TokenType.NORMAL))
    for added in spec.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special", False) else TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], int(kind))
    tokens, types = [], []
    for i in range(vocab_size):
        token, kind = by_id.get(i, (f"[PAD{i}]", int(TokenType.UNUSED)))
        tokens.append(token)
        types.append(kind)
    return tokens, types, merges


def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """llama.cpp `gpt2` (or, rotary, `gptneox`; rotary + squared ReLU, `nemotron`) tensors
    (name -> float32 CPU tensor, PyTorch (out, in) layout) equal to `model`. The token table
    is scaled by sqrt(d) and the head written separately; rotary's query and key rows are
    reordered (`rotary_row_order`); `nemotron` takes Q, K and V as three tensors."""
    m = unwrap_model(model)
    arch = gguf_architecture(m.config)
    scaled, emb = embedding_tables(m)  # (V, C) each
    out: dict[str, torch.Tensor] = {"token_embd.weight": scaled}  # the input scale folded in
    if m.rotary is None:
        out["position_embd.weight"] = cpu_f32(m.position_embedding.embedding.weight)  # (T_max, C)
    order = rotary_row_order(m.config) if m.rotary is not None else None
    for i, block in enumerate(m.blocks):
        p = f"blk.{i}."
        for name, mod in (("attn_norm", block.ln1), ("attn_qkv", block.attn.qkv),
                          ("attn_output", block.attn.proj), ("ffn_norm", block.ln2),
                          ("ffn_up", block.ff.fc), ("ffn_down", block.ff.proj)):
            out[p + name + ".weight"] = cpu_f32(mod.weight)  # Linear (out, in); LayerNorm (C,)
            out[p + name + ".bias"] = cpu_f32(mod.bias)
        if order is not None:  # llama.cpp's rotation pairs (i, i + d/2): rows reordered
            out[p + "attn_qkv.weight"] = out[p + "attn_qkv.weight"][order]  # (3C, C)
            out[p + "attn_qkv.bias"] = out[p + "attn_qkv.bias"][order]  # (3C,)
        if arch == RELU2_ARCH:  # separate projections: [q | k | v] rows -> three (C, C)
            for part in ("weight", "bias"):
                fused = out.pop(f"{p}attn_qkv.{part}")
                for name, rows in zip(("attn_q", "attn_k", "attn_v"), fused.chunk(3), strict=True):
                    out[f"{p}{name}.{part}"] = rows.contiguous()
    out["output_norm.weight"] = cpu_f32(m.ln_f.weight)
    out["output_norm.bias"] = cpu_f32(m.ln_f.bias)
    out["output.weight"] = emb  # (V, C): the head (tied: the unscaled table)
    return out


def gguf_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture the file declares: `nemotron` for rotary positions with
    squared ReLU, `gptneox` for rotary positions with GELU, else `gpt2`."""
    if config.position != "rotary":
        return ARCH
    return RELU2_ARCH if config.activation == "relu2" else ROTARY_ARCH


def check_gguf_architecture(config: ModelConfig) -> str:
    """The architecture `gguf_architecture` picks, or UserError for a variant llama.cpp has no
    graph for here (QK-norm; squared ReLU with learned positions), naming the fix."""
    arch = gguf_architecture(config)
    if config.activation == "relu2" and config.position != "rotary":
        raise UserError(
            "GGUF holds activation='relu2' only with rotary positions (llama.cpp's "
            f"{RELU2_ARCH} architecture); this model has position={config.position!r}: export "
            "it with --format onnx or --format web, or train it with --model.position rotary "
            "or --model.activation gelu")
    check_seed_architecture(dataclasses.replace(config, position="learned", activation="gelu",
                                                head="tied"),
                            f"GGUF (llama.cpp's {arch} architecture)")
    return arch


def _encode_tensor(gguf: Any, array: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """(data, GGMLQuantizationType) for one tensor: matrices in `quant`, vectors in f32."""
    q = gguf.GGMLQuantizationType
    if array.ndim < 2 or quant == "f32":
        return array.astype(np.float32), q.F32
    if quant == "f16":
        return array.astype(np.float16), q.F16
    return gguf.quants.quantize(array.astype(np.float32), q.Q8_0), q.Q8_0  # (rows, 34*C/32)


# ============================================================================ writing
def export_gguf(model: nn.Module, out_path: str | os.PathLike, tokenizer: Any, *,
                quant: str = "f32", force: bool = False, name: str | None = None) -> Path:
    """Write `model` and its tokenizer as one GGUF file (llama.cpp `gpt2`; `gptneox` for
    rotary positions; `nemotron` for rotary positions with squared ReLU).

    `quant`: "f32", "f16" or "q8_0" for the matrices (norms and biases stay f32). Raises
    UserError for an unknown quant, shapes q8_0 cannot hold, a tokenizer llama.cpp cannot
    reproduce, or an existing `out_path` without `force`. The file appears atomically.
    """
    gguf = _gguf()
    m = unwrap_model(model)
    cfg: ModelConfig = m.config
    arch = check_gguf_architecture(cfg)
    check_quant(cfg, quant)
    spec = check_tokenizer(tokenizer, cfg.vocab_size)
    out = Path(out_path)
    if out.is_dir():
        raise UserError(f"output {out} is a directory; --out must be a file path for this "
                        "format, e.g. model.gguf")
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(f"output {out} already exists; pass --force to overwrite it or choose "
                        "another --out")
    out.parent.mkdir(parents=True, exist_ok=True)  # an existing file is replaced atomically
    tokens, types, merges = gguf_vocabulary(spec, cfg.vocab_size)
    if spec["model"]["type"] == "WordLevel":
        warnings.warn("character-level run: llama.cpp drops characters outside the vocabulary "
                      "where our tokenizer gives the U+FFFD unknown token; known characters get "
                      "the same ids", stacklevel=2)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp_dir:
        tmp = Path(tmp_dir) / "model.gguf"
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or out.stem)
        writer.add_description(
            "micro-transformer GPT-style model (squared ReLU, as llama.cpp's nemotron graph)"
            if arch == RELU2_ARCH else "micro-transformer GPT-style model (exact-GELU network; "
            f"llama.cpp's {arch} graph uses the tanh GELU)")
        if arch in (ROTARY_ARCH, RELU2_ARCH):
            writer.add_rope_dimension_count(cfg.head_dim)
            writer.add_rope_freq_base(ROTARY_BASE)
        if arch == ROTARY_ARCH:
            writer.add_parallel_residual(False)  # x + attn(ln1(x)), then + ffn(ln2(x))
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.embed_dim)
        writer.add_feed_forward_length(cfg.ff_dim)
        writer.add_block_count(cfg.num_layers)
        writer.add_head_count(cfg.num_heads)
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
        writer.add_file_type(int(file_type))
        if quant == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex: our ByteLevel(use_regex=True)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(int(tokenizer.eos_token_id))
        writer.add_eos_token_id(int(tokenizer.eos_token_id))
        writer.add_pad_token_id(int(tokenizer.pad_token_id))
        writer.add_add_bos_token(False)  # we never prepend a token
        writer.add_add_eos_token(False)
        for tensor_name, tensor in gguf_tensors(m).items():
            data, qtype = _encode_tensor(gguf, tensor.numpy(), quant)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with tmp.open("rb") as src, atomic_write(out) as dst:
            shutil.copyfileobj(src, dst)
    return out
