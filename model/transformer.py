"""MicroTransformer: a small GPT-style causal language model."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache, linear
from .layers import LayerNorm, PositionEmbedding, TokenEmbedding, TransformerBlock
from .sampling import apply_repetition_penalty, sample_next_token, validate_sampling_args

INIT_SCHEMES = ("kaiming", "gpt2")


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
        "help": "weight initialisation, \"kaiming\" (the seed's) or \"gpt2\" (normal 0.02, "
                "residual projections scaled by 1/sqrt(2 * num_layers))"})
    attn_dropout: float | None = field(default=None, metadata={
        "help": "dropout on the attention probabilities alone; None (the default, the seed's "
                "model) uses `dropout`. 0 keeps attention on PyTorch's fused kernel: on a CPU, "
                "attention with dropout falls back to the unfused path and a training step "
                "costs more (docs/RESULTS.md, section 5)"})

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
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        """Size of each attention head."""
        return self.embed_dim // self.num_heads

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
    seed's three configurations count exactly 2,443,904 / 2,290,176 / 2,428,640 parameters.
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
    ) -> None:
        super().__init__()
        cfg = ModelConfig(
            vocab_size=vocab_size, max_seq_len=max_seq_len, embed_dim=embed_dim,
            num_heads=num_heads, num_layers=num_layers, ff_dim=ff_dim, dropout=dropout,
            init=init, attn_dropout=attn_dropout,
        )
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.max_seq_len = cfg.max_seq_len
        # Range-check token ids on every forward (a bad id would otherwise be an opaque
        # index error, or a device-side assert on CUDA). Trainers whose data is already
        # checked may turn it off to avoid a host sync per step.
        self.validate_inputs = True

        self.token_embedding = TokenEmbedding(cfg.vocab_size, cfg.embed_dim)
        self.position_embedding = PositionEmbedding(cfg.max_seq_len, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.embed_dim, cfg.num_heads, cfg.ff_dim, cfg.dropout,
                             attn_dropout=cfg.attention_dropout)
            for _ in range(cfg.num_layers)
        )
        self.ln_f = LayerNorm(cfg.embed_dim)
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied: one tensor, two uses
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
                    continue  # tied to the token embedding
                if self.config.init == "gpt2":
                    std = residual_std if name.endswith(("attn.proj", "ff.proj")) else 0.02
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                else:
                    # He init: the feed-forward expansion feeds a GELU (ReLU gain), the
                    # other projections are linear maps (gain 1); fan-in mode.
                    gain = "relu" if name.endswith("ff.fc") else "linear"
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity=gain)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ checks
    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
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
    def _check_mask(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
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

    # ------------------------------------------------------------------ forward
    @staticmethod
    def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids that count only real tokens: (B, T) mask -> (B, T) positions.

        Left padding then gives every real token the position it would have unpadded.
        """
        return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)

    @staticmethod
    def _attention_mask_4d(attention_mask: torch.Tensor) -> torch.Tensor:
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

    def _hidden(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        x = self.token_embedding(input_ids) + self.position_embedding(position_ids)  # (B, T, C)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, cache.layer(i) if cache is not None else None, cache_start)
        return self.ln_f(x)  # (B, T, C)

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
                equal to `lm_loss(logits, labels)`, computed by `chunked_lm_loss` without ever
                holding the (B, T, V) logits (less memory traffic: faster training steps). It
                goes through `forward`, so DDP and torch.compile wrappers see it.

        Returns:
            logits (B, T, vocab_size), or a scalar loss when `labels` is given.
        """
        self._check_input_ids(input_ids)
        T = input_ids.size(1)
        if T > self.max_seq_len:
            raise ValueError(
                f"cannot forward a sequence of length {T}: max_seq_len is {self.max_seq_len}; "
                f"crop the input to its last {self.max_seq_len} tokens or build the model with "
                "a larger max_seq_len"
            )
        attn_mask = None
        if attention_mask is not None:
            self._check_mask(attention_mask, input_ids)
            if not bool(attention_mask.bool().all()):
                attn_mask = self._attention_mask_4d(attention_mask)
            if position_ids is None:
                position_ids = self.positions_from_mask(attention_mask)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)  # (T,)
        elif position_ids.shape[-1] != T or int(position_ids.max()) >= self.max_seq_len:
            raise ValueError(
                f"position_ids must have last dimension {T} and values < max_seq_len="
                f"{self.max_seq_len}"
            )
        h = self._hidden(input_ids, position_ids, attn_mask)  # (B, T, C)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels has shape {tuple(labels.shape)} but input_ids has "
                    f"{tuple(input_ids.shape)}; they must match (the loss shifts them)"
                )
            return chunked_lm_loss(h, self.lm_head.weight, labels)
        return self.lm_head(h)  # (B, T, V)

    def loss(
        self, input_ids: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 128
    ) -> torch.Tensor:
        """`lm_loss(self(input_ids), labels)` without ever holding the (B, T, V) logits.

        Same value and gradients (up to float rounding) as `forward(input_ids, labels=labels)`,
        with a chosen chunk size; the head and the cross-entropy run in row chunks
        (`chunked_lm_loss`). Unpadded batches only.
        """
        self._check_input_ids(input_ids)
        T = input_ids.size(1)
        if T > self.max_seq_len:
            raise ValueError(
                f"cannot forward a sequence of length {T}: max_seq_len is {self.max_seq_len}"
            )
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        h = self._hidden(input_ids, positions, None)  # (B, T, C)
        return chunked_lm_loss(h, self.lm_head.weight, labels, chunk_size=chunk_size)

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
        decoder: KVDecoder | None = None,
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
        `decoder` replaces the default eager `KVDecoder` (prefill + one-token steps) with
        another implementation of its two methods, e.g. the compiled fixed-shape step of
        `microtransformer.fast_generate`; sampling, penalties and stopping stay here.
        """
        self._check_input_ids(input_ids)
        validate_sampling_args(temperature, top_k, top_p, repetition_penalty)
        T0 = input_ids.size(1)
        if max_new_tokens is not None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                    or max_new_tokens < 0:
                raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
            n_new = max_new_tokens
        else:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
                raise ValueError(f"max_length={max_length!r} must be a positive integer")
            if max_length < T0:
                raise ValueError(
                    f"max_length={max_length} is shorter than the prompt ({T0} tokens); "
                    "max_length counts the prompt: raise it or pass max_new_tokens"
                )
            n_new = max_length - T0
        if eos_token_id is not None and not 0 <= int(eos_token_id) < self.vocab_size:
            raise ValueError(f"eos_token_id={eos_token_id} is outside [0, {self.vocab_size})")
        if attention_mask is not None:
            self._check_mask(attention_mask, input_ids)
            if not bool(attention_mask[:, -1].bool().all()):
                raise ValueError(
                    "generate needs left-padded prompts (the last column of attention_mask "
                    "must be all 1); pad on the left (padding_side='left')"
                )
        if n_new == 0:
            return input_ids.clone()

        was_training = self.training
        self.eval()
        try:
            # a compiled decoder needs normal tensors (inference tensors trip its freezing)
            with torch.no_grad() if decoder is not None else torch.inference_mode():
                out = self._generate(
                    input_ids, n_new, attention_mask, temperature=temperature, top_k=top_k,
                    top_p=top_p, eos_token_id=eos_token_id,
                    repetition_penalty=repetition_penalty, do_sample=do_sample,
                    generator=generator, use_cache=use_cache, streamer=streamer,
                    decoder=decoder,
                )
        finally:
            self.train(was_training)
        return out.clone()  # a normal tensor, usable outside inference mode

    def _generate(
        self,
        input_ids: torch.Tensor,
        n_new: int,
        attention_mask: torch.Tensor | None,
        *,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        eos_token_id: int | None,
        repetition_penalty: float | None,
        do_sample: bool,
        generator: torch.Generator | None,
        use_cache: bool,
        streamer: Callable[[torch.Tensor], None] | None,
        decoder: KVDecoder | None = None,
    ) -> torch.Tensor:
        B, T0 = input_ids.shape
        device = input_ids.device
        total = T0 + n_new
        out = torch.empty(B, total, dtype=torch.long, device=device)  # (B, T_total)
        out[:, :T0] = input_ids
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        real = torch.ones(B, total, dtype=torch.bool, device=device)  # (B, T_total)
        if padded:
            real[:, :T0] = attention_mask.bool()
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        max_len = self.max_seq_len

        dec: KVDecoder | None = None
        if use_cache and T0 <= max_len:
            dec = decoder or KVDecoder(self, B, min(total, max_len))
            logits = dec.prefill(out[:, :T0], real[:, :T0] if padded else None)  # (B, V)
            next_pos = self.positions_from_mask(real[:, :T0])[:, -1] + 1  # (B,)

        cur = T0  # tokens in `out` so far
        for _ in range(n_new):
            if dec is None:
                logits = self._window_logits(out[:, :cur], real[:, :cur], padded)  # (B, V)
            if repetition_penalty is not None:
                logits = apply_repetition_penalty(
                    logits, out[:, :cur], repetition_penalty, real[:, :cur] if padded else None
                )
            token = sample_next_token(
                logits, temperature=temperature, top_k=top_k, top_p=top_p,
                do_sample=do_sample, generator=generator,
            )  # (B,)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            out[:, cur] = token
            cur += 1
            if streamer is not None:
                streamer(token)
            if eos_token_id is not None and bool(finished.all()):
                break
            if cur == total:
                break
            if dec is not None:
                if cur <= dec.max_len:  # room in the cache: decode one position
                    key_mask = real[:, None, None, : cur] if padded else None  # (B, 1, 1, S)
                    logits = dec.step(token, next_pos, cur - 1, key_mask)  # (B, V)
                    next_pos += 1
                else:  # context full: positions shift every step, so recompute the window
                    dec = None
        return out[:, :cur]

    def prefill(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the prompt (B, T) through the model, writing its keys/values into cache columns
        0..T-1; returns the last position's next-token logits (B, V). Eval mode only.

        attention_mask (B, T), 1 = real token, for left-padded prompts (positions then count
        real tokens only). Continue with `decode_step` at column T.
        """
        positions = self.positions_from_mask(attention_mask) if attention_mask is not None \
            else torch.arange(input_ids.size(1), device=input_ids.device)  # (B, T) or (T,)
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        mask4d = self._attention_mask_4d(attention_mask) if padded else None
        h = self._hidden(input_ids, positions, mask4d, cache, 0)  # (B, T, C)
        return self.lm_head(h[:, -1])  # (B, V)

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        pos: int | torch.Tensor,
        key_mask: torch.Tensor | None = None,
        *,
        explicit_attention: bool = False,
    ) -> torch.Tensor:
        """Next-token logits (B, V) after feeding `tokens` (B,) at `positions` (B,).

        The one-token step every decoder uses (`generate`, the static decoder, the serving
        engine): same result as `_hidden` on a one-token slice followed by the head, without
        the time axis and module calls. Keys/values go into `cache` at column `pos`: an int
        (every row the same column, attention over columns 0..pos) or a LongTensor (B,) of
        per-row columns with a (B, 1, 1, T_max) `key_mask` (static shapes; see
        `MultiHeadAttention.decode_step`). Eval mode only (no dropout).
        `explicit_attention` writes attention as matmuls + softmax (the form torch.compile
        fuses best on CPU); same result up to float rounding.
        """
        x = F.embedding(tokens, self.token_embedding.weight) * self.token_embedding.scale
        x = x + F.embedding(positions, self.position_embedding.weight)  # (B, C)
        for block, (k_buf, v_buf) in zip(self.blocks, cache.layers, strict=True):
            x = block.decode_step(x, k_buf, v_buf, pos, key_mask,
                                  explicit_attention=explicit_attention)  # (B, C)
        ln = self.ln_f
        x = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        return linear(self.lm_head, x)  # (B, V)

    def _window_logits(
        self, ids: torch.Tensor, real: torch.Tensor, padded: bool
    ) -> torch.Tensor:
        """Last-position logits from the last max_seq_len tokens, without a cache."""
        ids, real = ids[:, -self.max_seq_len:], real[:, -self.max_seq_len:]  # (B, T)
        positions = self.positions_from_mask(real)
        mask4d = self._attention_mask_4d(real) if padded and not bool(real.all()) else None
        h = self._hidden(ids, positions, mask4d)  # (B, T, C)
        return self.lm_head(h[:, -1])  # (B, V)

    # ------------------------------------------------------------------ sharing
    def save_pretrained(self, save_directory: str, tokenizer: Any = None) -> None:
        """Write config.json + model.safetensors (+ tokenizer.json) to `save_directory`.

        `tokenizer`: any object with `save(path)`. The files are written atomically by
        `model.io.save_pretrained` (safetensors weights with a checksum, tied head stored once).
        """
        from . import io  # the network's files (imports nothing from model/ or above)

        io.save_pretrained(self, save_directory, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str,
                        map_location: str | torch.device = "cpu") -> MicroTransformer:
        """Load a model written by `save_pretrained` or a training run directory.

        Returns an instance of `cls` (a subclass gets a subclass) in eval mode, with the
        weights checked against their checksum; see `model.io.load_pretrained`.
        """
        from . import io

        config = io.read_model_config(directory, ModelConfig)
        return io.load_pretrained(directory, cls, config, map_location)


class KVDecoder:
    """The eager cached decoder `generate` uses: a `KVCache` of `batch_size` rows x `max_len`
    columns, `prefill` for the prompt, then one `MicroTransformer.decode_step` per token.

    Another decoder passed to `generate(decoder=...)` provides the same attribute and two
    methods (e.g. a compiled fixed-shape step); `generate` owns sampling and stopping.
    """

    def __init__(self, model: MicroTransformer, batch_size: int, max_len: int) -> None:
        cfg = model.config
        self.model = model
        self.max_len = max_len
        self.cache = KVCache(cfg.num_layers, batch_size, cfg.num_heads, max_len, cfg.head_dim,
                             dtype=model.ln_f.weight.dtype, device=model.ln_f.weight.device)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                ) -> torch.Tensor:
        """Prompt (B, T) (left-padded with its (B, T) mask, or None) -> last logits (B, V)."""
        return self.model.prefill(input_ids, self.cache, attention_mask=attention_mask)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, col: int,
             key_mask: torch.Tensor | None) -> torch.Tensor:
        """Feed tokens (B,) at positions (B,) into cache column `col`; logits (B, V).

        key_mask: None (no padding) or boolean (B, 1, 1, col + 1), True = real key.
        """
        return self.model.decode_step(tokens, positions, self.cache, col, key_mask)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Causal LM loss: position t predicts labels[t + 1] (the seed's shift), mean over tokens.

    The shift moves the labels, not the logits: the targets are labels[:, 1:] with one
    ignored column appended, so the (B, T, V) logits are read in place instead of being
    copied (and their gradient scattered back) through a [:, :-1] slice.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T); last predicts nothing
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index
    )


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of (h @ W^T) against targets, computed chunk by chunk.

    The loss is a scalar at the end of the graph, so its gradients with respect to h and W
    are computed right away in the forward pass, one (chunk, V) block of logits at a time
    (softmax minus one-hot, then two matmuls); backward only scales them. No (N, V) tensor
    is ever materialised.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, chunk_size: int, needs_grad: bool) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            h32, w32 = h.float(), weight.float()  # (N, C), (V, C)
            valid = targets != ignore_index  # (N,)
            safe = targets.masked_fill(~valid, 0)
            scale = 1.0 / valid.sum().clamp(min=1).float()
            weight_rows = valid.float() * scale  # (N,) d loss / d per-row loss
            if needs_grad:
                grad_h = torch.empty_like(h32)
                grad_w = torch.zeros_like(w32)
            total = h32.new_zeros(())
            for s in range(0, h32.size(0), chunk_size):
                e = min(s + chunk_size, h32.size(0))
                logits = h32[s:e] @ w32.t()  # (n, V)
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                picked = logits.gather(1, safe[s:e, None]).squeeze(1)  # (n,)
                total += ((lse - picked) * weight_rows[s:e]).sum()
                if not needs_grad:  # evaluation: the loss alone
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(e - s, device=h.device), safe[s:e]] -= 1.0
                probs.mul_(weight_rows[s:e, None])  # d loss / d logits
                torch.mm(probs, w32, out=grad_h[s:e])
                grad_w.addmm_(probs.t(), h32[s:e])
        if needs_grad:
            ctx.save_for_backward(grad_h.to(h.dtype), grad_w.to(weight.dtype))
        return total  # fp32 whatever the input dtype

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 128,
) -> torch.Tensor:
    """`lm_loss(hidden @ head_weight.T, labels)` computed in row chunks (fp32 inside).

    hidden (B, T, C) final hidden states, head_weight (V, C), labels (B, T) with the same
    shift as `lm_loss`. Supports one backward (no double backward).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1)  # (B*T,)
    h = hidden.reshape(-1, hidden.size(-1))  # (B*T, C)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad)
    return _ChunkedHeadLoss.apply(h, head_weight, targets, ignore_index, chunk_size, needs_grad)
