"""`microtransformer generate`'s generator: `MicroTransformer.generate` on the decode path the
rule picks for each request.

The sampling loop stays `MicroTransformer.generate` (repetition penalty, `sample_next_token`
with the caller's generator, EOS, streaming); only the decoder under it changes: the eager
`model.generation.EagerDecoder`, or a `FixedShapeDecoder` on a compiled `DecodeStep` when
`choose_decode_path` (a pure function of the request and measured costs) says the compile
repays itself. Optional bf16 or int8 precision (`microtransformer.device`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from microtransformer.decoding.step import DecodeStep
from microtransformer.device import check_precision, intra_op_threads, prepare_model
from model.generation import prefill
from model.transformer import MicroTransformer


class FixedShapeDecoder:
    """A `model.generation.Decoder` on a `DecodeStep`: `generate` prefills the prompt into all
    rows at once, then every token goes through the fixed-shape (optionally compiled) step
    with all rows at the same column."""

    def __init__(self, step: DecodeStep) -> None:
        self.fixed_step = step
        self.max_len = step.max_len
        B, dev = step.batch_size, step.device
        self.cols = torch.zeros(B, dtype=torch.long, device=dev)  # (B,) all equal
        self.mask = torch.zeros(B, 1, 1, step.max_len, dtype=torch.bool, device=dev)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                ) -> torch.Tensor:
        """Prompt (B, T), left-padded with its mask or None -> last logits (B, V)."""
        T = input_ids.size(1)
        self.mask.zero_()
        self.mask[:, 0, 0, :T] = True if attention_mask is None else attention_mask.bool()
        return prefill(self.fixed_step.model, input_ids, self.fixed_step.cache,
                       attention_mask=attention_mask)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, col: int,
             key_mask: torch.Tensor | None) -> torch.Tensor:
        """Feed tokens (B,) at positions (B,) into column `col`; logits (B, V) fp32.
        `key_mask` is implied by the prefill's padding (new columns are real)."""
        self.mask[:, 0, 0, col] = True
        self.cols.fill_(col)
        return self.fixed_step.step(tokens, positions, self.cols, self.mask)


# ---------------------------------------------------------------------------- path rule
@dataclass(frozen=True)
class DecodeCosts:
    """Measured CPU costs behind `choose_decode_path`, in seconds (where they come from:
    docs/PERFORMANCE.md, `benchmarks/decode_costs.py`).

    A step of batch B costs `*_step_base + B * *_step_per_row`; compiling costs
    `compile_cold` the first time and `compile_cached` once inductor's on-disk caches hold
    the step (a later process, same model shape, batch and cache length).
    """

    eager_step_base: float = 1.07e-3
    eager_step_per_row: float = 0.47e-3
    compiled_step_base: float = 0.62e-3
    compiled_step_per_row: float = 0.42e-3
    compile_cold: float = 30.0
    compile_cached: float = 15.0


CPU_COSTS = DecodeCosts()


def choose_decode_path(n_steps: int, batch_size: int, *, device_type: str = "cpu",
                       allow_compile: bool = True, compile_cached: bool = False,
                       fits_cache: bool = True, costs: DecodeCosts = CPU_COSTS) -> str:
    """"compiled" when compiling the fixed-shape step repays itself within this request,
    else "eager" (a pure function of the request).

    compiled iff allowed, on CPU, the whole sequence fits the static cache (no sliding
    window) and n_steps x (eager step - compiled step) > the compile time (cold, or cached).
    """
    if not allow_compile or device_type != "cpu" or not fits_cache or n_steps < 1:
        return "eager"
    saved = n_steps * ((costs.eager_step_base - costs.compiled_step_base)
                       + batch_size * (costs.eager_step_per_row - costs.compiled_step_per_row))
    cost = costs.compile_cached if compile_cached else costs.compile_cold
    return "compiled" if saved > cost else "eager"


def cache_length(n_tokens: int, max_seq_len: int) -> int:
    """Static cache length for a sequence of `n_tokens`: the next power of two >= 64 (at most
    max_seq_len), so a few compiled shapes serve every request length."""
    length = 64
    while length < n_tokens:
        length *= 2
    return min(length, max_seq_len)


def _marker_dir() -> Path:
    # deferred: importing torch._inductor at module top would slow every command's start-up
    # (docs/PERFORMANCE.md, "Start-up"); only a request that may compile asks for this folder
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "microtransformer"


def compile_key(model: MicroTransformer, batch_size: int, max_len: int, precision: str) -> str:
    """Name of a compiled step in inductor's cache: model shape, batch, cache length,
    precision and torch version (frozen weights are part of inductor's own key)."""
    spec = {"config": model.config.to_dict(), "batch": batch_size, "max_len": max_len,
            "precision": precision, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def compile_is_cached(key: str) -> bool:
    """True when this process or an earlier one compiled the step named `key`."""
    return (_marker_dir() / key).is_file()


def mark_compiled(key: str) -> None:
    """Record that the step named `key` is in inductor's on-disk caches."""
    try:
        _marker_dir().mkdir(parents=True, exist_ok=True)
        (_marker_dir() / key).touch()
    except OSError:  # a read-only cache folder only costs the next decision its accuracy
        pass


# ---------------------------------------------------------------------------- the generator
class AutoPathGenerator:
    """`model.generate` through the fastest exact path for each request.

    The same sampling loop (`MicroTransformer.generate`: repetition penalty, then
    `sample_next_token` with the caller's generator, EOS, streaming) runs on either the eager
    cached decode or, when `choose_decode_path` says compiling repays itself, the compiled
    fixed-shape `DecodeStep` (cache length rounded up by `cache_length`, so few shapes
    compile). Greedy tokens are those of `model.generate`; sampled ones too unless float
    rounding between the two steps flips a draw. Sequences longer than the context (sliding
    window) and `use_cache=False` always take the eager path. Decoders are kept per
    (batch, cache length) for later calls. `threads`: torch intra-op threads while generating
    on CPU (default None: torch's setting; see docs/PERFORMANCE.md for when 1 is faster).
    `expected_calls`: how many requests of this shape will follow (e.g. `--num-samples`); the
    rule weighs the compile against all of their steps.
    """

    def __init__(self, model: MicroTransformer, *, precision: str = "fp32",
                 compile: bool = True, costs: DecodeCosts = CPU_COSTS,
                 threads: int | None = None, expected_calls: int = 1) -> None:
        self.device = next(model.parameters()).device
        self.threads = threads if self.device.type == "cpu" else None
        check_precision(precision, self.device)
        self.precision = precision
        self.model = prepare_model(model, precision)
        # dynamo cannot trace the quantized linear's packed weights, so int8 stays eager
        self.allow_compile = compile and precision != "int8"
        self.costs = costs
        self.expected_calls = max(1, expected_calls)
        self.last_path: str | None = None
        self._decoders: dict[tuple[int, int], FixedShapeDecoder] = {}

    def plan(self, batch_size: int, prompt_len: int, n_new: int,
             use_cache: bool = True) -> tuple[str, int]:
        """(path, static cache length) for a request; path is "compiled" or "eager"."""
        total = prompt_len + n_new
        fits = use_cache and total <= self.model.max_seq_len
        length = cache_length(total, self.model.max_seq_len)
        cached = (batch_size, length) in self._decoders or compile_is_cached(
            compile_key(self.model, batch_size, length, self.precision))
        steps = n_new * self.expected_calls  # the compiled step is reused by later calls
        path = choose_decode_path(steps, batch_size, device_type=self.device.type,
                                  allow_compile=self.allow_compile, compile_cached=cached,
                                  fits_cache=fits, costs=self.costs)
        return path, length

    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int,
                 **kwargs: Any) -> torch.Tensor:
        """`model.generate(input_ids, max_new_tokens=..., **kwargs)` on the chosen path."""
        with intra_op_threads(self.threads):
            return self._generate(input_ids, max_new_tokens, kwargs)

    def _generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                  kwargs: dict[str, Any]) -> torch.Tensor:
        B, T0 = input_ids.shape
        path, length = self.plan(B, T0, max_new_tokens, kwargs.get("use_cache", True))
        self.last_path = path
        if path == "eager":
            return self.model.generate(input_ids, max_new_tokens=max_new_tokens, **kwargs)
        decoder = self._decoders.get((B, length))
        if decoder is None:
            decoder = FixedShapeDecoder(DecodeStep(self.model, B, length, compile=True))
            self._decoders[(B, length)] = decoder
        out = self.model.generate(input_ids, max_new_tokens=max_new_tokens, decoder=decoder,
                                  **kwargs)
        if decoder.fixed_step.compiled:
            mark_compiled(compile_key(self.model, B, length, self.precision))
        else:
            self.last_path = "eager (compile failed)"
        return out
