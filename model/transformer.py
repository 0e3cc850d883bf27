"""MicroTransformer: a small GPT-style causal language model (its config, construction and
forward pass; generation is `model.generation`, the losses `model.losses`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from . import generation, io, losses
from .attention import KVCache, MultiHeadAttention
from .layers import (
    LayerNorm,
    PositionEmbedding,
    RotaryTable,
    TokenEmbedding,
    TransformerBlock,
    layer_norm,
)

INIT_SCHEMES = ("kaiming", "gpt2", "zero_out")
POSITIONS = ("learned", "rotary")
ACTIVATIONS = ("gelu", "relu2")
HEADS = ("tied", "untied")


def _is_dropout_probability(value: object) -> bool:
    """True for a real number (not a bool) in [0, 1)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and 0.0 <= value < 1.0)


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of a MicroTransformer; the single source of truth to rebuild one.

    Each field's meaning is its `help` metadata (`dataclasses.fields(ModelConfig)`), which the
    toolkit's `--model.*` options and docs/CONFIG.md show.
    """

    vocab_size: int = field(default=5000, metadata={
        "help": "number of token ids the model reads and predicts"})
    max_seq_len: int = field(default=512, metadata={
        "help": "longest sequence (context window) the position table covers"})
    embed_dim: int = field(default=192, metadata={
        "help": "width of the residual stream; must be divisible by num_heads"})
    num_heads: int = field(default=6, metadata={
        "help": "attention heads per layer (head size = embed_dim // num_heads)"})
    num_layers: int = field(default=4, metadata={"help": "number of transformer blocks"})
    ff_dim: int = field(default=512, metadata={
        "help": "hidden width of each feed-forward network"})
    dropout: float = field(default=0.1, metadata={
        "help": "dropout probability in [0, 1) for embeddings, attention and residual paths"})
    init: str = field(default="kaiming", metadata={
        "help": "weight initialisation, \"kaiming\" (the seed's), \"gpt2\" (normal 0.02, "
                "residual projections scaled by 1/sqrt(2 * num_layers)) or \"zero_out\" "
                "(kaiming, but the attention and feed-forward output projections start at zero, "
                "so every block starts as the identity; it fitted the training text's own val "
                "split better and text of another source worse: docs/RESULTS.md, section 13)"})
    attn_dropout: float | None = field(default=None, metadata={
        "help": "dropout on the attention probabilities alone; None (the default, the seed's "
                "model) uses `dropout`. 0 keeps attention on PyTorch's fused kernel: on a CPU, "
                "attention with dropout falls back to the unfused path and a training step "
                "costs more (docs/RESULTS.md, section 5)"})
    position: str = field(default="learned", metadata={
        "help": "how the model knows token order: \"learned\" (the seed's table of "
                "max_seq_len absolute position vectors) or \"rotary\" (queries and keys "
                "rotated by their position, no table; opt-in: the Hugging Face export writes it "
                "as GPT-NeoX, GGUF as llama.cpp's gptneox)"})
    activation: str = field(default="gelu", metadata={
        "help": "the feed-forward nonlinearity: \"gelu\" (the seed's exact erf GELU) or "
                "\"relu2\" (squared ReLU; opt-in: the Hugging Face export writes transformers' "
                "relu2 activation; GGUF holds it with rotary positions, as llama.cpp's "
                "nemotron)"})
    qk_norm: bool = field(default=False, metadata={
        "help": "RMS-normalise each head's queries and keys (a learned gain per head "
                "dimension) before attention (opt-in, refused by the Hugging Face and GGUF "
                "exports)"})
    head: str = field(default="tied", metadata={
        "help": "the prediction head: \"tied\" (the seed's: it is the token embedding's "
                "table) or \"untied\" (its own vocab_size x embed_dim matrix, starting at zero; "
                "opt-in, every export holds it)"})

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "max_seq_len", "embed_dim", "num_heads", "num_layers", "ff_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive integer")
        if not problems and self.embed_dim % self.num_heads != 0:
            problems.append(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
                f"use a num_heads that divides {self.embed_dim} or an embed_dim that is a "
                f"multiple of {self.num_heads}"
            )
        if not _is_dropout_probability(self.dropout):
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.attn_dropout is not None and not _is_dropout_probability(self.attn_dropout):
            problems.append(
                f"attn_dropout={self.attn_dropout!r} must be in [0, 1), or None to use dropout"
            )
        if self.init not in INIT_SCHEMES:
            problems.append(f"init={self.init!r} must be one of {', '.join(INIT_SCHEMES)}")
        if self.position not in POSITIONS:
            problems.append(f"position={self.position!r} must be one of {', '.join(POSITIONS)}")
        elif self.position == "rotary" and self.head_dim % 2:
            problems.append(f"position='rotary' needs an even head size, got embed_dim "
                            f"{self.embed_dim} / num_heads {self.num_heads} = {self.head_dim}; "
                            "choose num_heads so that the quotient is even")
        if self.activation not in ACTIVATIONS:
            problems.append(
                f"activation={self.activation!r} must be one of {', '.join(ACTIVATIONS)}")
        if not isinstance(self.qk_norm, bool):
            problems.append(f"qk_norm={self.qk_norm!r} must be true or false")
        if self.head not in HEADS:
            problems.append(f"head={self.head!r} must be one of {', '.join(HEADS)}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        """Size of each attention head."""
        return self.embed_dim // self.num_heads

    @property
    def variants(self) -> list[str]:
        """The opt-in architecture variants this config uses (empty for the seed's model),
        e.g. ["position='rotary'"]: what an export that cannot hold them names."""
        seed = ModelConfig()
        return [f"{name}={getattr(self, name)!r}" for name in ("position", "activation", "qk_norm",
                                                                  "head")
                if getattr(self, name) != getattr(seed, name)]

    @property
    def departures(self) -> list[str]:
        """`variants` plus a non-seed `init` (e.g. "init='zero_out'"): every way the model
        differs from the seed's besides its sizes and dropout, for a run's header to name."""
        init = [f"init={self.init!r}"] if self.init != ModelConfig().init else []
        return self.variants + init

    @property
    def attention_dropout(self) -> float:
        """The dropout applied to attention probabilities (attn_dropout, else dropout)."""
        return self.dropout if self.attn_dropout is None else float(self.attn_dropout)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready) of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown model config key(s) {unknown}; known keys are {sorted(known)}"
            )
        return cls(**data)


class MicroTransformer(nn.Module):
    """GPT-style decoder: token + position embeddings, pre-LN blocks, final LN, tied head.

    The prediction head shares its weight with the token embedding and has no bias, so the
    seed's three configurations count exactly 2,443,904 / 2,290,176 / 2,428,640 parameters
    (`head="untied"`, opt-in, gives the head its own matrix).
    """

    def __init__(
        self,
        vocab_size: int = 5000,
        max_seq_len: int = 512,
        embed_dim: int = 192,
        num_heads: int = 6,
        num_layers: int = 4,
        ff_dim: int = 512,
        dropout: float = 0.1,
        init: str = "kaiming",
        attn_dropout: float | None = None,
        position: str = "learned",
        activation: str = "gelu",
        qk_norm: bool = False,
        head: str = "tied",
    ) -> None:
        super().__init__()
        cfg = ModelConfig(
            vocab_size=vocab_size, max_seq_len=max_seq_len, embed_dim=embed_dim,
            num_heads=num_heads, num_layers=num_layers, ff_dim=ff_dim, dropout=dropout,
            init=init, attn_dropout=attn_dropout, position=position, activation=activation,
            qk_norm=qk_norm, head=head,
        )
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.max_seq_len = cfg.max_seq_len
        # Range-check token ids on every forward (a bad id would otherwise be an opaque
        # index error, or a device-side assert on CUDA). Trainers whose data is already
        # checked may turn it off to avoid a host sync per step.
        self.validate_inputs = True

        self.token_embedding = TokenEmbedding(cfg.vocab_size, cfg.embed_dim)
        # learned positions: a table; rotary: no parameters, a (max_seq_len, hs) table of
        # cos | sin per position (a buffer kept out of the saved weights)
        self.position_embedding: PositionEmbedding | None = None
        self.rotary: RotaryTable | None = None
        if cfg.position == "rotary":
            self.rotary = RotaryTable(cfg.max_seq_len, cfg.head_dim)
        else:
            self.position_embedding = PositionEmbedding(cfg.max_seq_len, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.embed_dim, cfg.num_heads, cfg.ff_dim, cfg.dropout,
                             attn_dropout=cfg.attention_dropout, activation=cfg.activation,
                             qk_norm=cfg.qk_norm)
            for _ in range(cfg.num_layers)
        )
        self.ln_f = LayerNorm(cfg.embed_dim)
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        if cfg.head == "tied":
            self.lm_head.weight = self.token_embedding.weight  # one tensor, two uses
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: ModelConfig | dict[str, Any]) -> MicroTransformer:
        """Build a model from a ModelConfig or a dict of its fields."""
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig or dict, got {type(config).__name__}")
        return cls(**config.to_dict())

    def reset_parameters(self) -> None:
        """Initialise weights with the configured scheme (see ModelConfig.init)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head:
                    if self.config.head == "untied":  # uniform logits at the start
                        nn.init.zeros_(module.weight)
                    continue  # else tied: the token embedding's table
                if self.config.init == "gpt2":
                    std = residual_std if name.endswith(("attn.proj", "ff.proj")) else 0.02
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                else:
                    # He init: the feed-forward expansion feeds a GELU (ReLU gain), the
                    # other projections are linear maps (gain 1); fan-in mode.
                    gain = "relu" if name.endswith("ff.fc") else "linear"
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity=gain)
                    if self.config.init == "zero_out" and name.endswith(("attn.proj", "ff.proj")):
                        nn.init.zeros_(module.weight)  # the block starts as the identity
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, MultiHeadAttention) and module.qk_gain is not None:
                nn.init.ones_(module.qk_gain)

    # ------------------------------------------------------------------ checks
    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Raise TypeError/ValueError naming what is wrong with `input_ids` (B, T): type,
        shape, dtype, empty, or (with `validate_inputs`) an id outside the vocabulary."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}; "
                "add a batch dimension with input_ids.unsqueeze(0)"
            )
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.size(1) == 0:
            raise ValueError("input_ids has seq_len 0; pass at least one token")
        if self.validate_inputs and input_ids.numel():
            lo, hi = torch.aminmax(input_ids)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"token id {bad} is outside [0, {self.vocab_size}) (vocab_size="
                    f"{self.vocab_size}); check that the tokenizer matches the model"
                )

    @staticmethod
    def check_attention_mask(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Raise TypeError/ValueError unless `attention_mask` is a 0/1 tensor shaped like
        `input_ids`."""
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; they must match (1 = real token, 0 = padding)"
            )
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            ok = bool(((attention_mask == 0) | (attention_mask == 1)).all())
        else:
            ok = attention_mask.dtype == torch.bool or bool(
                ((attention_mask == 0) | (attention_mask == 1)).all()
            )
        if not ok:
            raise ValueError(
                "attention_mask must contain only 0 (padding) and 1 (real token)"
            )

    def _checked_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The one check of a forward's inputs; returns (position ids, 4-D mask or None)."""
        self.check_input_ids(input_ids)
        T = input_ids.size(1)
        if T > self.max_seq_len:
            raise ValueError(
                f"cannot forward a sequence of length {T}: max_seq_len is {self.max_seq_len}; "
                f"crop the input to its last {self.max_seq_len} tokens or build the model with "
                "a larger max_seq_len"
            )
        attn_mask = None
        if attention_mask is not None:
            self.check_attention_mask(attention_mask, input_ids)
            if not bool(attention_mask.bool().all()):
                attn_mask = self.attention_mask_4d(attention_mask)
            if position_ids is None:
                position_ids = self.positions_from_mask(attention_mask)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)  # (T,)
        elif position_ids.shape[-1] != T or int(position_ids.max()) >= self.max_seq_len:
            raise ValueError(
                f"position_ids must have last dimension {T} and values < max_seq_len="
                f"{self.max_seq_len}"
            )
        return position_ids, attn_mask

    # ------------------------------------------------------------------ forward
    @staticmethod
    def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids that count only real tokens: (B, T) mask -> (B, T) positions.

        Left padding then gives every real token the position it would have unpadded.
        """
        return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)

    @staticmethod
    def attention_mask_4d(attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) padding mask -> boolean (B, 1, T, T): causal AND key is real.

        Every query may always attend to itself, so rows of padding never become all -inf
        (which would give NaN); real rows are unaffected since their diagonal is allowed anyway.
        """
        T = attention_mask.size(-1)
        device = attention_mask.device
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril_()  # (T, T)
        keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        eye = torch.eye(T, dtype=torch.bool, device=device)
        return (causal & keys) | eye  # (B, 1, T, T)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks' input and how they learn positions: (token embeddings plus the learned
        position table, None), or with position='rotary' (token embeddings, the rotary cos |
        sin the attention applies, `RotaryTable.forward`'s shapes).

        input_ids (B, T) with position_ids (T,) or (B, T) (broadcastable to the ids), or
        input_ids (B,) with position_ids (B,), one token per row. The forward of every
        decoder and export (`hidden_states`, the ONNX and web graphs) starts here.
        """
        x = self.token_embedding.forward(input_ids)  # (B, T, C), or (B, C) for one token per row
        if self.rotary is None:
            return x + self.position_embedding.forward(position_ids), None
        return x, self.rotary.forward(position_ids, one_per_row=input_ids.dim() == 1)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_pos: int | torch.Tensor = 0,
        *,
        explicit_attention: bool = False,
    ) -> torch.Tensor:
        """Final hidden states (B, T, C) after `ln_f`, for training, prefill and decoding alike.

        Unchecked (callers check their inputs; `forward` does): input_ids (B, T) and
        position_ids (B, T) or (T,); or input_ids and position_ids (B,), one token per row
        (decoding), giving (B, C). attn_mask boolean, broadcastable to (B, 1, T, S), True =
        may attend (None: causal). With a `cache`, keys/values are written into it at
        `cache_pos` (see `MultiHeadAttention.forward` for its two modes) and attention covers
        the cached columns. `explicit_attention` writes attention as matmuls + softmax (the
        form torch.compile fuses best on CPU); same result up to float rounding.

        The model's parts (embeddings, blocks, and in a block its attention and feed-forward)
        are called through their `forward`, not `nn.Module.__call__`: the model as a whole is
        the one hook point.
        """
        # Why not module calls: a one-token step is bound by per-call overhead, and
        # nn.Module.__call__ on the parts made it measurably slower (docs/PERFORMANCE.md,
        # "One forward for training and decoding").
        x, rope = self.embed(input_ids, position_ids)  # (B, T, C), or (B, C) one per row
        if self.training:
            x = self.dropout(x)
        layers = cache.layers if cache is not None else (None,) * len(self.blocks)
        for block, kv in zip(self.blocks, layers, strict=True):
            x = block.forward(x, attn_mask, kv, cache_pos, explicit_attention=explicit_attention,
                              rope=rope)
        return layer_norm(self.ln_f, x)  # (B, T, C)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits for every position, or the LM loss when `labels` are given.

        Args:
            input_ids: (B, T) token ids in [0, vocab_size), T <= max_seq_len.
            attention_mask: optional (B, T), 1 = real token, 0 = padding (Hugging Face
                convention). Combined with the causal mask; positions count real tokens only.
            position_ids: optional (B, T) explicit positions (default: from the mask, or 0..T-1).
            labels: optional (B, T) targets with the seed's shift (position t predicts
                labels[t + 1]; -100 is ignored). When given, the scalar mean loss is returned,
                equal to `lm_loss(logits, labels)`, computed by `losses.chunked_lm_loss`
                without ever holding the (B, T, V) logits (less memory traffic). It goes
                through `forward`, so DDP and torch.compile wrappers see it.

        Returns:
            logits (B, T, vocab_size), or a scalar loss when `labels` is given.
        """
        position_ids, attn_mask = self._checked_inputs(input_ids, attention_mask, position_ids)
        h = self.hidden_states(input_ids, position_ids, attn_mask)  # (B, T, C)
        if labels is not None:
            return losses.chunked_lm_loss(h, self.lm_head.weight, labels)
        return self.lm_head(h)  # (B, T, V)

    def loss(
        self, input_ids: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 128
    ) -> torch.Tensor:
        """`lm_loss(self(input_ids), labels)` without ever holding the (B, T, V) logits.

        Same value and gradients (up to float rounding) as `forward(input_ids, labels=labels)`,
        with a chosen chunk size; the head and the cross-entropy run in row chunks
        (`losses.chunked_lm_loss`). Unpadded batches only.
        """
        position_ids, _ = self._checked_inputs(input_ids)
        h = self.hidden_states(input_ids, position_ids)  # (B, T, C)
        return losses.chunked_lm_loss(h, self.lm_head.weight, labels, chunk_size=chunk_size)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        input_ids: torch.Tensor,
        max_length: int = 50,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        *,
        max_new_tokens: int | None = None,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | None = None,
        repetition_penalty: float | None = None,
        do_sample: bool = True,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        streamer: Callable[[torch.Tensor], None] | None = None,
        decoder: generation.Decoder | None = None,
    ) -> torch.Tensor:
        """Autoregressively extend `input_ids` (B, T0); returns (B, T0 + generated).

        Hugging Face semantics: `max_length` counts the prompt; `max_new_tokens`, when given,
        overrides it. `temperature=0` or `do_sample=False` is greedy; `top_k` None/0 and
        `top_p` None/1.0 disable those filters. Batched prompts must be left-padded and come
        with `attention_mask`. Rows that emit `eos_token_id` are finished (padded with it);
        generation stops early when all rows are. Past `max_seq_len` the context slides: each
        new token is predicted from the last `max_seq_len` tokens.

        Decoding uses a pre-allocated KV cache (`use_cache=False` recomputes the whole
        window each step; both give the same tokens). `streamer`, if given, is called with
        each new column of tokens, shape (B,). The model is put in eval mode for the call.
        `decoder` replaces the default `generation.EagerDecoder` (prefill + one-token steps)
        with another `generation.Decoder`, e.g. the fixed-shape (compilable) step of
        `microtransformer.decoding`; sampling, penalties and stopping stay in `generate`.
        See `model.generation.generate`.
        """
        return generation.generate(
            self, input_ids, max_length, temperature, top_k, top_p,
            max_new_tokens=max_new_tokens, attention_mask=attention_mask,
            eos_token_id=eos_token_id, repetition_penalty=repetition_penalty,
            do_sample=do_sample, generator=generator, use_cache=use_cache, streamer=streamer,
            decoder=decoder,
        )

    # ------------------------------------------------------------------ sharing
    def save_pretrained(self, save_directory: str, tokenizer: Any = None) -> None:
        """Write config.json + model.safetensors (+ tokenizer.json) to `save_directory`.

        `tokenizer`: any object with `save(path)`. The files are written atomically by
        `model.io.save_pretrained` (safetensors weights with a checksum, tied head stored once).
        """
        io.save_pretrained(self, save_directory, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str,
                        map_location: str | torch.device = "cpu") -> MicroTransformer:
        """Load a model written by `save_pretrained` or a training run directory.

        Returns an instance of `cls` (a subclass gets a subclass) in eval mode, with the
        weights checked against their checksum; see `model.io.load_pretrained`.
        """
        config = io.read_model_config(directory, ModelConfig)
        return io.load_pretrained(directory, cls, config, map_location)
