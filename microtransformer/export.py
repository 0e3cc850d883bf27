"""Hugging Face (GPT-2, GPT-NeoX) export and import of GPT-2 and GPT-NeoX directories.

MicroTransformer is GPT-2's architecture up to two details, which the conversion handles:

1. The token embedding is multiplied by sqrt(embed_dim) on the way in. GPT-2 has no such scale,
   so the exported `wte` holds the scaled table.
2. The prediction head is tied to the *unscaled* table. The exported model is therefore untied
   (`tie_word_embeddings=False`) and its `lm_head` holds the original table (or, for a model
   with `head="untied"`, the head's own matrix). On import, a head equal to wte / sqrt(d) is
   our tied head; any other, GPT-2's own tie included, gives an untied model.

Everything else maps one to one: pre-LN blocks, exact (erf) GELU (`activation_function="gelu"`),
LayerNorm eps 1e-5, fused QKV laid out as [q | k | v] with heads contiguous (GPT-2's `c_attn`).
GPT-2 stores its projections as `Conv1D` weights of shape (in, out): transposed `nn.Linear` ones.

A model with rotary positions (`model.position = "rotary"`) is exported as Hugging Face's
GPT-NeoX instead (`GPTNeoXForCausalLM`, `use_parallel_residual=False`: the same sequential
pre-LN blocks, with rotary queries and keys and no position table). Its fused QKV holds each
head's [q | k | v] together, and its rotation pairs dimension i of a head with i + d/2 where ours
pairs 2i with 2i + 1: the rows are reordered (`rotary_row_order`). Squared ReLU is transformers'
`relu2` activation in either; QK-norm has no GPT-2 or GPT-NeoX form and is refused. Import reads
GPT-2 and GPT-NeoX directories of our block.

Writing a Hugging Face directory needs no `transformers`; only loading it does. The other
formats have their own modules: `export_onnx.py`, `export_gguf.py`, `export_web.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microtransformer.artifacts import HF, MODEL, check_output, staged_directory
from microtransformer.checkpoint import load_model, load_weights
from microtransformer.errors import UserError
from microtransformer.export_checks import check_seed_architecture
from microtransformer.fileio import atomic_write_json
from microtransformer.hub import save_pretrained, unwrap_model
from microtransformer.tokenizer import EOS_TOKEN, PAD_TOKEN, UNK_CHAR, Tokenizer
from model import MicroTransformer, ModelConfig
from model.io import TOKENIZER_FILE, WEIGHTS_FILE, save_safetensors
from model.layers import ROTARY_BASE

FORMATS = ("hf", "onnx", "gguf", "web")  # the last three: export_onnx.py, _gguf.py, _web.py
LAYER_NORM_EPS = 1e-5
# model.activation -> transformers' activation name (ACT2FN)
HF_ACTIVATIONS = {"gelu": "gelu", "relu2": "relu2"}
_FROM_HF_ACTIVATIONS = {v: k for k, v in HF_ACTIVATIONS.items()}
# How far the exported `wte` may be from lm_head * sqrt(d) (relative to the table's scale).
_TIE_RTOL = 1e-5


# ============================================================================ output paths
def prepare_output(path: str | os.PathLike, *, force: bool, kind: str) -> Path:
    """Check an export destination. `kind` is "dir" or "file".

    An existing destination is an error unless `force`, in which case it is removed (a file) or
    its files are overwritten (a directory). Raises UserError naming the path and the fix.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        is_dir = path.is_dir()
        nonempty = is_dir and any(path.iterdir())
        if ((kind == "dir" and nonempty) or kind == "file") and not force:
            raise UserError(
                f"output {path} already exists; pass --force to overwrite it or choose "
                "another --out"
            )
        if kind == "file" and is_dir:
            raise UserError(f"output {path} is a directory; --out must be a file path for "
                            "this format, e.g. model.onnx")
        if kind == "dir" and not is_dir:
            raise UserError(f"output {path} is a file; --out must be a directory for this "
                            "format")
        if kind == "file":
            path.unlink()
    if kind == "dir":
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ============================================================================ Hugging Face
def hf_config(config: ModelConfig, *, eos_token_id: int | None = None,
              pad_token_id: int | None = None) -> dict[str, Any]:
    """The `config.json` of the GPT-2 model equivalent to `config`."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_seq_len,
        "n_embd": config.embed_dim,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": config.ff_dim,
        # exact erf GELU ("gelu_new" is the tanh approximation), or squared ReLU
        "activation_function": HF_ACTIVATIONS[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.attention_dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        **_hf_common(eos_token_id, pad_token_id),  # lm_head = unscaled table, wte = scaled
    }


def _hf_common(eos_token_id: int | None, pad_token_id: int | None) -> dict[str, Any]:
    """The config.json entries GPT-2 and GPT-NeoX exports share: an untied head (the head is
    the unscaled table, the input embedding the scaled one), the special tokens, fp32."""
    return {"initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True,
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id, "dtype": "float32"}


def cpu_f32(t: torch.Tensor) -> torch.Tensor:
    """`t` as float32 on the CPU, contiguous (what safetensors writes)."""
    return t.detach().to("cpu", torch.float32).contiguous()


def embedding_tables(m: MicroTransformer) -> tuple[torch.Tensor, torch.Tensor]:
    """(the token table scaled by sqrt(embed_dim), as the input uses it; the head's matrix:
    the unscaled table when tied, its own when untied), each (V, C) float32."""
    emb = cpu_f32(m.token_embedding.embedding.weight)  # (V, C)
    return emb * math.sqrt(m.config.embed_dim), cpu_f32(m.lm_head.weight).clone()


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel weights equivalent to `model` (float32, CPU)."""
    m = unwrap_model(model)
    scaled, emb = embedding_tables(m)
    sd: dict[str, torch.Tensor] = {
        "transformer.wte.weight": scaled,  # the input scale folded into the table
        "transformer.wpe.weight": cpu_f32(m.position_embedding.embedding.weight),  # (T_max, C)
        "transformer.ln_f.weight": cpu_f32(m.ln_f.weight),
        "transformer.ln_f.bias": cpu_f32(m.ln_f.bias),
        "lm_head.weight": emb,  # the head (tied: the unscaled table)
    }
    for i, block in enumerate(m.blocks):
        p = f"transformer.h.{i}."
        linears = {
            "attn.c_attn": block.attn.qkv,  # (3C, C) Linear -> (C, 3C) Conv1D
            "attn.c_proj": block.attn.proj,
            "mlp.c_fc": block.ff.fc,
            "mlp.c_proj": block.ff.proj,
        }
        for name, lin in linears.items():
            sd[p + name + ".weight"] = cpu_f32(lin.weight).t().contiguous()
            sd[p + name + ".bias"] = cpu_f32(lin.bias)
        for name, ln in (("ln_1", block.ln1), ("ln_2", block.ln2)):
            sd[p + name + ".weight"] = cpu_f32(ln.weight)
            sd[p + name + ".bias"] = cpu_f32(ln.bias)
    return sd


def rotary_row_order(config: ModelConfig, *, heads_together: bool = False) -> torch.Tensor:
    """Row order (3C,) of the fused QKV projection for a rotation that pairs dimension i of a
    head with i + d/2 (llama.cpp's gptneox, Hugging Face's `rotate_half`) where ours pairs 2i
    with 2i + 1: within each query and key head the even dimensions, then the odd ones (the
    same order for both keeps every attention score); values as they are. `heads_together`:
    each head's [q | k | v] rows side by side (GPT-NeoX's layout) instead of [Q | K | V]."""
    C, d = config.embed_dim, config.head_dim
    rotated = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # (d,)
    starts = torch.arange(0, C, d)[:, None]  # (nh, 1): each head's first row in Q, K and V
    q, k, v = starts + rotated, C + starts + rotated, 2 * C + starts + torch.arange(d)
    if heads_together:
        return torch.cat([q, k, v], dim=1).reshape(-1)  # (nh * 3d,): head by head
    return torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1)])  # (3C,)


def hf_neox_config(config: ModelConfig, *, eos_token_id: int | None = None,
                   pad_token_id: int | None = None) -> dict[str, Any]:
    """The `config.json` of the GPT-NeoX model equivalent to a rotary `config`."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.ff_dim,
        "hidden_act": HF_ACTIVATIONS[config.activation],  # exact erf GELU or squared ReLU
        "hidden_dropout": config.dropout,
        "attention_dropout": config.attention_dropout,
        "layer_norm_eps": LAYER_NORM_EPS,
        "use_parallel_residual": False,  # x + attn(ln1(x)), then + mlp(ln2(x))
        "attention_bias": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROTARY_BASE,
                            "partial_rotary_factor": 1.0},
        "rotary_pct": 1.0,  # the same two, as transformers before 5 reads them
        "rotary_emb_base": ROTARY_BASE,
        **_hf_common(eos_token_id, pad_token_id),  # embed_out unscaled, embed_in scaled
    }


def _neox_layer_modules(block: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    """(GPT-NeoX name, our module) for a block's parts that map one to one (the fused
    query_key_value is reordered, so it is not among them)."""
    return (("attention.dense", block.attn.proj), ("mlp.dense_h_to_4h", block.ff.fc),
            ("mlp.dense_4h_to_h", block.ff.proj), ("input_layernorm", block.ln1),
            ("post_attention_layernorm", block.ln2))


def to_hf_neox_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """GPTNeoXForCausalLM weights equivalent to a rotary `model` (float32, CPU)."""
    m = unwrap_model(model)
    order = rotary_row_order(m.config, heads_together=True)
    scaled, emb = embedding_tables(m)
    sd: dict[str, torch.Tensor] = {
        "gpt_neox.embed_in.weight": scaled,  # the input scale folded into the table
        "gpt_neox.final_layer_norm.weight": cpu_f32(m.ln_f.weight),
        "gpt_neox.final_layer_norm.bias": cpu_f32(m.ln_f.bias),
        "embed_out.weight": emb,  # the head (tied: the unscaled table)
    }
    for i, block in enumerate(m.blocks):
        p = f"gpt_neox.layers.{i}."
        sd[p + "attention.query_key_value.weight"] = cpu_f32(block.attn.qkv.weight)[order]
        sd[p + "attention.query_key_value.bias"] = cpu_f32(block.attn.qkv.bias)[order]
        for name, mod in _neox_layer_modules(block):
            sd[p + name + ".weight"] = cpu_f32(mod.weight)  # nn.Linear (out, in) in both
            sd[p + name + ".bias"] = cpu_f32(mod.bias)
    return sd


def hf_tokenizer_files(tokenizer: Any, max_seq_len: int) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json for a microtransformer Tokenizer, so
    `AutoTokenizer` builds a `PreTrainedTokenizerFast` from its tokenizer.json as is."""

    backend = tokenizer.backend
    special: dict[str, Any] = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN}
    if backend.token_to_id(PAD_TOKEN) is not None:
        special["pad_token"] = PAD_TOKEN
    else:
        special["pad_token"] = EOS_TOKEN  # a foreign tokenizer: pad with EOS, the mask tells
    if tokenizer.kind == "char":
        special["unk_token"] = UNK_CHAR
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_seq_len,
        "padding_side": "left",  # batched generation with a decoder-only model pads left
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def hf_architecture(config: ModelConfig) -> str:
    """The transformers architecture `export_hf` writes `config` as: "GPT-NeoX" for rotary
    positions, else "GPT-2"."""
    return "GPT-NeoX" if config.position == "rotary" else "GPT-2"


def export_hf(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, *,
              force: bool = False) -> Path:
    """Write a Hugging Face GPT-2 directory (config, safetensors weights, tokenizer files);
    GPT-NeoX for a model with rotary positions.

    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` then gives a GPT2LMHeadModel
    with the same logits, and `AutoTokenizer.from_pretrained(out_dir)` the same tokenizer.
    """
    m = unwrap_model(model)
    check_seed_architecture(dataclasses.replace(m.config, position="learned", activation="gelu",
                                                head="tied"),
                            f"a Hugging Face {hf_architecture(m.config)} directory")
    check_output(out_dir, command="export", makes=HF, replace=force)  # whole dir is replaced
    target = prepare_output(out_dir, force=force, kind="dir")
    with staged_directory(target) as out:  # all files appear at once (artifacts.py)
        _write_hf(m, out, tokenizer)
    return target


def _write_hf(m: MicroTransformer, out: Path, tokenizer: Any) -> None:
    """The files of a Hugging Face GPT-2 (rotary: GPT-NeoX) directory, written into `out`."""
    eos = pad = None
    if tokenizer is not None:
        if tokenizer.vocab_size > m.config.vocab_size:
            raise UserError(
                f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                f"{m.config.vocab_size}; export the tokenizer the model was trained with"
            )
        eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    rotary = m.config.position == "rotary"
    weights = to_hf_neox_state_dict(m) if rotary else to_hf_state_dict(m)
    save_safetensors(out / WEIGHTS_FILE, weights, {"format": "pt"})
    gen = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": True}
    atomic_write_json(out / "generation_config.json", {k: v for k, v in gen.items()
                                                       if v is not None})
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER_FILE)
        for name, data in hf_tokenizer_files(tokenizer, m.config.max_seq_len).items():
            atomic_write_json(out / name, data)
    config = hf_neox_config if rotary else hf_config
    atomic_write_json(out / "config.json", config(m.config, eos_token_id=eos, pad_token_id=pad))


# ---------------------------------------------------------------------------- import
def model_config_from_hf(cfg: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """The ModelConfig equivalent to a GPT-2 (or GPT-NeoX) `config.json`, or UserError listing
    every option MicroTransformer cannot express (and what to change)."""
    problems: list[str] = []
    model_type = cfg.get("model_type")
    if model_type == "gpt_neox":
        return _model_config_from_neox(cfg, source=source)
    if model_type != "gpt2":
        raise UserError(
            f"{source}: model_type={model_type!r} is not supported; only GPT-2 directories "
            "(model_type 'gpt2') and GPT-NeoX ones of our block (model_type 'gpt_neox', as "
            "`export --format hf` writes a rotary model) can be imported"
        )
    act = cfg.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS.values():
        why = " (the tanh approximation)" if act in ("gelu_new", "gelu_pytorch_tanh",
                                                     "gelu_fast") else ""
        problems.append(
            f"activation_function={act!r}{why}: MicroTransformer uses exact erf GELU ('gelu') "
            "or squared ReLU ('relu2') only; the logits would differ"
        )
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if not math.isclose(float(eps), LAYER_NORM_EPS, rel_tol=1e-9):
        problems.append(f"layer_norm_epsilon={eps}: MicroTransformer's LayerNorm uses 1e-05")
    if not cfg.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false: attention is always scaled by "
                        "1/sqrt(head_dim)")
    for flag, why in (
        ("scale_attn_by_inverse_layer_idx", "extra 1/(layer+1) attention scale"),
        ("reorder_and_upcast_attn", "upcast attention (set it to false if float32 numerics "
                                    "are what you want)"),
        ("add_cross_attention", "cross-attention layers"),
    ):
        if cfg.get(flag, False):
            problems.append(f"{flag}=true: no {why} in MicroTransformer")
    n_embd, n_head = cfg.get("n_embd", 768), cfg.get("n_head", 12)
    n_inner = cfg.get("n_inner")
    pdrops = {k: float(cfg.get(k, 0.1)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if problems:
        raise UserError(f"cannot import {source}: " + "; ".join(problems))
    if pdrops["embd_pdrop"] != pdrops["resid_pdrop"]:
        warnings.warn(
            f"{source}: dropouts differ ({pdrops}); MicroTransformer has one dropout for "
            f"embeddings and residuals, using resid_pdrop={pdrops['resid_pdrop']} (dropout only "
            "matters for further training)",
            stacklevel=2,
        )
    attn = pdrops["attn_pdrop"]
    try:
        return ModelConfig(
            vocab_size=cfg.get("vocab_size", 50257),
            max_seq_len=cfg.get("n_positions", 1024),
            embed_dim=n_embd,
            num_heads=n_head,
            num_layers=cfg.get("n_layer", 12),
            ff_dim=4 * n_embd if n_inner is None else n_inner,  # GPT-2: None means 4 * n_embd
            dropout=pdrops["resid_pdrop"],
            init="gpt2",
            attn_dropout=None if attn == pdrops["resid_pdrop"] else attn,
            activation=_FROM_HF_ACTIVATIONS.get(act, act),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot import {source}: {exc}") from exc


def _model_config_from_neox(cfg: dict[str, Any], *, source: str) -> ModelConfig:
    """The rotary ModelConfig equivalent to a GPT-NeoX `config.json` of our block (sequential
    residual, rotary over whole heads at base ROTARY_BASE, biases), or UserError
    listing every option it cannot express. transformers' defaults apply to missing keys."""
    problems: list[str] = []
    rope = cfg.get("rope_parameters") or {}
    fraction = float(rope.get("partial_rotary_factor", cfg.get("rotary_pct", 0.25)))
    base = float(rope.get("rope_theta", cfg.get("rotary_emb_base", 10000)))
    act = cfg.get("hidden_act", "gelu")
    for bad, why in (
        (cfg.get("use_parallel_residual", True), "use_parallel_residual=true: MicroTransformer's "
                                                 "blocks add attention, then the feed-forward"),
        (fraction != 1.0, f"rotary over {fraction:g} of each head: ours rotates whole heads"),
        (base != ROTARY_BASE, f"rotary base {base:g}: ours is {ROTARY_BASE:g}"),
        (rope.get("rope_type", "default") != "default",
         f"rope_type={rope.get('rope_type')!r}: ours is the default rotation"),
        (act not in HF_ACTIVATIONS.values(), f"hidden_act={act!r}: MicroTransformer uses exact "
                                             "erf GELU ('gelu') or squared ReLU ('relu2') only"),
        (not math.isclose(float(cfg.get("layer_norm_eps", 1e-5)), LAYER_NORM_EPS, rel_tol=1e-9),
         f"layer_norm_eps={cfg.get('layer_norm_eps')}: MicroTransformer's LayerNorm uses 1e-05"),
        (not cfg.get("attention_bias", True), "attention_bias=false: our projections have biases"),
    ):
        if bad:
            problems.append(why)
    if problems:
        raise UserError(f"cannot import {source}: " + "; ".join(problems))
    dropout = float(cfg.get("hidden_dropout", 0.0))
    attn = float(cfg.get("attention_dropout", 0.0))
    try:
        return ModelConfig(
            vocab_size=cfg.get("vocab_size", 50432),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            embed_dim=cfg.get("hidden_size", 6144),
            num_heads=cfg.get("num_attention_heads", 64),
            num_layers=cfg.get("num_hidden_layers", 44),
            ff_dim=cfg.get("intermediate_size", 24576),
            dropout=dropout,
            attn_dropout=None if attn == dropout else attn,
            position="rotary",
            activation=_FROM_HF_ACTIVATIONS[act],
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot import {source}: {exc}") from exc


def _weight_taker(sd: dict[str, torch.Tensor], expected: str, source: str
                  ) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """`take(name, shape)`: pop weight `name` from `sd` as float32, with one-line errors for a
    missing name (asking whether the file is `expected`) or a shape the config does not give."""

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in sd:
            raise UserError(f"{source}: missing weight {name!r}; is this {expected}?")
        t = sd.pop(name)
        if tuple(t.shape) != shape:
            raise UserError(f"{source}: weight {name!r} has shape {tuple(t.shape)}, the config "
                            f"gives {shape}")
        return t.to(torch.float32)

    return take


def _table_and_head(head: torch.Tensor, scaled: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(our unscaled token table, the head's own matrix or None) from a file's head and input
    table (`scaled`, which our input multiplies back by sqrt(d)). A head equal to
    scaled / sqrt(d) is our tied head (None: an exact round trip of a tied export); any other
    head, a plain tie (head == scaled) included, becomes `head="untied"`."""
    tol = _TIE_RTOL * max(1.0, float(scaled.abs().max()))
    if float((head * math.sqrt(head.shape[1]) - scaled).abs().max()) <= tol:
        return head, None
    return scaled / math.sqrt(head.shape[1]), head


def _with_head(config: ModelConfig, table: torch.Tensor, own_head: torch.Tensor | None
               ) -> MicroTransformer:
    """A MicroTransformer of `config` (untied when `own_head` is given) with its token table
    (and head) set; the caller fills the rest."""
    if own_head is not None:
        config = dataclasses.replace(config, head="untied")
    model = MicroTransformer.from_config(config)
    with torch.no_grad():
        model.token_embedding.embedding.weight.copy_(table)
        if own_head is not None:
            model.lm_head.weight.copy_(own_head)
    return model


def from_hf_neox_state_dict(config: ModelConfig, tensors: dict[str, torch.Tensor], *,
                            tied: bool = False, source: str = WEIGHTS_FILE) -> MicroTransformer:
    """Build a rotary MicroTransformer from GPT-NeoX weights of our block: the inverse of
    `to_hf_neox_state_dict` (query and key rows back in our rotation's order). `tied`: the
    config's tie_word_embeddings (no embed_out stored: the head is embed_in)."""
    sd = dict(tensors)
    C, L, V = config.embed_dim, config.num_layers, config.vocab_size
    take = _weight_taker(sd, f"a GPT-NeoX checkpoint with {L} layers", source)

    scaled = take("gpt_neox.embed_in.weight", (V, C))
    head = take("embed_out.weight", (V, C)) if "embed_out.weight" in sd or not tied else scaled
    model = _with_head(config, *_table_and_head(head, scaled))
    back = torch.argsort(rotary_row_order(config, heads_together=True))  # (3C,): NeoX -> ours
    with torch.no_grad():
        model.ln_f.weight.copy_(take("gpt_neox.final_layer_norm.weight", (C,)))
        model.ln_f.bias.copy_(take("gpt_neox.final_layer_norm.bias", (C,)))
        for i, block in enumerate(model.blocks):
            p = f"gpt_neox.layers.{i}."
            qkv = p + "attention.query_key_value."
            block.attn.qkv.weight.copy_(take(qkv + "weight", (3 * C, C))[back])
            block.attn.qkv.bias.copy_(take(qkv + "bias", (3 * C,))[back])
            for name, mod in _neox_layer_modules(block):
                mod.weight.copy_(take(p + name + ".weight", tuple(mod.weight.shape)))
                mod.bias.copy_(take(p + name + ".bias", tuple(mod.bias.shape)))
    leftover = [k for k in sd if not k.endswith((".attention.bias", ".attention.masked_bias",
                                                 "rotary_emb.inv_freq"))]
    if leftover:
        raise UserError(f"{source}: unexpected weights {sorted(leftover)[:5]}; the config has "
                        f"num_hidden_layers={L} (is it right?)")
    return model.eval()


def from_hf_state_dict(config: ModelConfig, tensors: dict[str, torch.Tensor],
                       tie_word_embeddings: bool = False, *,
                       source: str = WEIGHTS_FILE) -> MicroTransformer:
    """Build a MicroTransformer from GPT-2 weights (with or without the `transformer.` prefix).

    Our input multiplies the table by sqrt(d), so a head equal to `wte / sqrt(d)` is our tied
    head (the table is taken from `lm_head`: exact round trip of an export); any other head,
    GPT-2's own tie (lm_head == wte) included, gives an untied model (`_table_and_head`).
    """
    sd = {(k[len("transformer."):] if k.startswith("transformer.") else k): v
          for k, v in tensors.items()}
    # Old GPT-2 files carry the causal-mask buffers; they are not weights.
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
          or v.dim() == 1}
    C, L = config.embed_dim, config.num_layers
    take = _weight_taker(sd, f"a GPT-2 checkpoint with {L} layers", source)

    V, T = config.vocab_size, config.max_seq_len
    wte = take("wte.weight", (V, C))
    head_key = "lm_head.weight"
    if head_key in sd:
        head = take(head_key, (V, C))
    elif tie_word_embeddings:
        head = wte
    else:
        raise UserError(f"{source}: no lm_head.weight and tie_word_embeddings is false")
    model = _with_head(config, *_table_and_head(head, wte))
    with torch.no_grad():
        model.position_embedding.embedding.weight.copy_(take("wpe.weight", (T, C)))
        model.ln_f.weight.copy_(take("ln_f.weight", (C,)))
        model.ln_f.bias.copy_(take("ln_f.bias", (C,)))
        for i, block in enumerate(model.blocks):
            p = f"h.{i}."
            for name, lin in (("attn.c_attn", block.attn.qkv), ("attn.c_proj", block.attn.proj),
                              ("mlp.c_fc", block.ff.fc), ("mlp.c_proj", block.ff.proj)):
                out_f, in_f = lin.weight.shape
                lin.weight.copy_(take(p + name + ".weight", (in_f, out_f)).t())
                lin.bias.copy_(take(p + name + ".bias", (out_f,)))
            for name, ln in (("ln_1", block.ln1), ("ln_2", block.ln2)):
                ln.weight.copy_(take(p + name + ".weight", (C,)))
                ln.bias.copy_(take(p + name + ".bias", (C,)))
    if sd:
        raise UserError(f"{source}: unexpected weights {sorted(sd)[:5]}; the config has "
                        f"n_layer={L} (is n_layer right?)")
    return model.eval()


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a Hugging Face model directory (one-line errors)."""
    cfg_path = Path(hf_dir) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: pass a Hugging Face model directory")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path} is not valid JSON: {exc}") from exc


def import_hf(hf_dir: str | os.PathLike, *, with_tokenizer: bool = True
              ) -> tuple[MicroTransformer, Any]:
    """Load a GPT-2 (or our block's GPT-NeoX) Hugging Face directory as (MicroTransformer,
    Tokenizer | None).

    Reads config.json and model.safetensors (pickle-based pytorch_model.bin is refused), and,
    with `with_tokenizer`, tokenizer.json when present (it needs an `<|endoftext|>` token).
    """
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    config = model_config_from_hf(cfg, source=str(hf_dir / "config.json"))
    weights = hf_dir / WEIGHTS_FILE
    if not weights.is_file():
        if (hf_dir / "model.safetensors.index.json").is_file():
            raise UserError(f"{hf_dir} holds sharded weights; re-save the model unsharded "
                            "(save_pretrained(..., max_shard_size='10GB'))")
        if (hf_dir / "pytorch_model.bin").is_file():
            raise UserError(f"{hf_dir} has only pytorch_model.bin (pickle, not loaded for "
                            "safety); re-save it with safe_serialization=True")
        raise FileNotFoundError(f"{weights} not found")
    tensors, _ = load_weights(weights)  # safetensors only, never pickle
    if cfg["model_type"] == "gpt_neox":  # model_config_from_hf accepted only it or gpt2
        model = from_hf_neox_state_dict(config, tensors, source=str(weights),
                                        tied=bool(cfg.get("tie_word_embeddings", False)))
    else:
        model = from_hf_state_dict(config, tensors, bool(cfg.get("tie_word_embeddings", True)),
                                   source=str(weights))
    tokenizer = None
    tok_path = hf_dir / TOKENIZER_FILE
    if with_tokenizer and tok_path.is_file():
        tokenizer = Tokenizer.load(tok_path)
        if tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"{tok_path} has {tokenizer.vocab_size} ids but the model only "
                            f"{config.vocab_size}")
    return model, tokenizer


def import_hf_to_run(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     force: bool = False, require_tokenizer: bool = True) -> Path:
    """Convert a GPT-2 or GPT-NeoX Hugging Face directory into a run directory (config.json,
    model.safetensors, tokenizer.json) that `generate`, `eval` and `from_pretrained` read.
    With `require_tokenizer=False` the tokenizer is skipped (weights only)."""
    model, tokenizer = import_hf(hf_dir, with_tokenizer=require_tokenizer)
    if tokenizer is None and require_tokenizer:
        raise UserError(f"{Path(hf_dir) / TOKENIZER_FILE} not found; a run directory needs a "
                        "tokenizer (pass --no-tokenizer to import the weights only)")
    check_output(out_dir, command="import", makes=MODEL, inputs=[hf_dir], replace=force)
    out = prepare_output(out_dir, force=force, kind="dir")
    with staged_directory(out) as stage:  # all files appear at once (artifacts.py)
        save_pretrained(model, stage, tokenizer, metadata={"imported_from": str(hf_dir)})
    return out


# ============================================================================ run directories
def load_for_export(run_dir: str | os.PathLike, *, best: bool = False) -> tuple[MicroTransformer,
                                                                                  Any]:
    """(model, tokenizer or None) from a run directory or a save_pretrained directory."""
    return load_model(run_dir, "best" if best else "last")
