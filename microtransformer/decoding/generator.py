"""`microtransformer generate`'s generator: `MicroTransformer.generate` on the decode path the
rule picks for each request.

The sampling loop stays `MicroTransformer.generate` (repetition penalty, `sample_next_token`
with the caller's generator, EOS, streaming); only the decoder under it changes: the eager
`model.generation.EagerDecoder`, or an `AOTDecoder` on the ahead-of-time compiled step
(`decoding.aot`: one package per model shape, batch and precision, cached on disk) when
`choose_decode_path` (a pure function of the request and measured costs) says so: always
once the package is on disk, and for the first request of a shape that is long enough, the
compile being spread over the later runs that load the package. Optional bf16 or int8
precision (`microtransformer.device`). `FixedShapeDecoder` runs `generate` on a
`DecodeStep` (the serve engine's step), for measurements.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from microtransformer.decoding.aot import AOTCompileError, AOTDecoder, AOTDecodeStep, is_cached
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
    docs/PERFORMANCE.md, "Decode as fast as llama.cpp").

    A step of batch B costs `*_step_base + B * *_step_per_row` ("compiled": the packaged
    step); compiling the package costs `compile_cold` once per model shape, batch and
    precision, loading it from disk `compile_cached`. A package on disk serves every later
    run of its shape, so the rule spreads a cold compile over `package_reuse` runs like
    this one (1: the compile must repay itself within this request).
    """

    eager_step_base: float = 0.90e-3
    eager_step_per_row: float = 0.15e-3
    compiled_step_base: float = 0.06e-3
    compiled_step_per_row: float = 0.15e-3
    compile_cold: float = 20.0
    compile_cached: float = 0.02
    package_reuse: int = 1


CPU_COSTS = DecodeCosts(package_reuse=1000)


def choose_decode_path(n_steps: int, batch_size: int, *, device_type: str = "cpu",
                       allow_compile: bool = True, compile_cached: bool = False,
                       fits_cache: bool = True, costs: DecodeCosts = CPU_COSTS) -> str:
    """"compiled" when the packaged step repays its compile or load, else "eager" (a pure
    function of the request).

    compiled iff allowed, on CPU, the whole sequence fits the context (no sliding window)
    and n_steps x (eager step - compiled step) > the load time (package on disk), or
    > compile_cold / package_reuse (first run of this shape).
    """
    if not allow_compile or device_type != "cpu" or not fits_cache or n_steps < 1:
        return "eager"
    saved = n_steps * ((costs.eager_step_base - costs.compiled_step_base)
                       + batch_size * (costs.eager_step_per_row - costs.compiled_step_per_row))
    cost = (costs.compile_cached if compile_cached
            else costs.compile_cold / max(1, costs.package_reuse))
    return "compiled" if saved > cost else "eager"


# ---------------------------------------------------------------------------- the generator
class AutoPathGenerator:
    """`model.generate` through the fastest exact path for each request.

    The same sampling loop (`MicroTransformer.generate`: repetition penalty, then
    `sample_next_token` with the caller's generator, EOS, streaming) runs on either the eager
    cached decode or, when `choose_decode_path` says so, the ahead-of-time compiled step
    (`decoding.aot.AOTDecodeStep`, fp32, bf16 or int8wo; compiled once per model shape, batch size
    and precision and cached on disk, a one-line note on stderr while it compiles). Greedy
    tokens are those of `model.generate`; sampled ones too unless float rounding between
    the two steps flips a draw. Sequences longer than the context (sliding window),
    `use_cache=False`, int8 and non-CPU devices take the eager path; a failed compile warns
    and falls back to eager. `expected_calls`: how many requests of this shape will
    follow (e.g. `--num-samples`); the rule weighs the compile against all of their steps.
    `threads`: torch intra-op threads while generating on CPU (default None: 1 on the
    compiled path, torch's setting on the eager one). `quiet`: no stderr note. After a call:
    `last_path`, `compile_seconds` (compile or load time of the packages this generator set
    up).
    """

    def __init__(self, model: MicroTransformer, *, precision: str = "fp32",
                 compile: bool = True, costs: DecodeCosts = CPU_COSTS,
                 threads: int | None = None, expected_calls: int = 1,
                 quiet: bool = False) -> None:
        self.device = next(model.parameters()).device
        self.threads = threads if self.device.type == "cpu" else None
        check_precision(precision, self.device)
        self.precision = precision
        self.model = prepare_model(model, precision)
        # dynamo cannot trace the quantized linear's packed weights, so int8 stays eager
        self.allow_compile = compile and precision != "int8"
        self.costs = costs
        self.expected_calls = max(1, expected_calls)
        self.quiet = quiet
        self.last_path: str | None = None
        self.compile_seconds = 0.0
        self._decoders: dict[int, AOTDecoder] = {}
        self._failed: dict[int, str] = {}

    def plan(self, batch_size: int, prompt_len: int, n_new: int,
             use_cache: bool = True) -> str:
        """The path for a request: "compiled" or "eager"."""
        fits = use_cache and prompt_len + n_new <= self.model.max_seq_len
        if batch_size in self._failed:
            return "eager"
        cached = batch_size in self._decoders or (
            self.allow_compile and self.device.type == "cpu"
            and is_cached(self.model, batch_size, self.precision))
        steps = n_new * self.expected_calls  # the compiled step is reused by later calls
        return choose_decode_path(steps, batch_size, device_type=self.device.type,
                                  allow_compile=self.allow_compile, compile_cached=cached,
                                  fits_cache=fits, costs=self.costs)

    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int,
                 **kwargs: Any) -> torch.Tensor:
        """`model.generate(input_ids, max_new_tokens=..., **kwargs)` on the chosen path."""
        B, T0 = input_ids.shape
        path = self.plan(B, T0, max_new_tokens, kwargs.get("use_cache", True))
        # the packaged step runs on 1 intra-op thread unless told otherwise: its kernels are
        # microseconds each, and an OpenMP fork/join per kernel costs more than it saves
        # (up to 100x slower on a busy 2-core machine; docs/PERFORMANCE.md)
        threads = self.threads
        if threads is None and path == "compiled" and self.device.type == "cpu":
            threads = 1
        with intra_op_threads(threads):
            return self._generate(input_ids, max_new_tokens, path, kwargs)

    def decoder(self, batch_size: int) -> AOTDecoder | None:
        """The packaged decoder for `batch_size` rows (compiled or loaded on first use), or
        None after a failed compile (warned once)."""
        if batch_size in self._failed:
            return None
        dec = self._decoders.get(batch_size)
        if dec is not None:
            return dec
        cold = not is_cached(self.model, batch_size, self.precision)
        if cold and not self.quiet:
            print(f"note: compiling the decode step for this model shape (batch {batch_size}, "
                  f"{self.precision}) once; later runs load it from disk", file=sys.stderr,
                  flush=True)
        try:
            step = AOTDecodeStep(self.model, batch_size, precision=self.precision)
        except AOTCompileError as exc:
            self._failed[batch_size] = str(exc)
            warnings.warn(f"AutoPathGenerator: compiling the decode step failed, decoding "
                          f"eagerly ({exc})", RuntimeWarning, stacklevel=3)
            return None
        self.compile_seconds += step.seconds
        if cold and not self.quiet:
            print(f"note: compiled in {step.seconds:.1f} s ({step.path})", file=sys.stderr,
                  flush=True)
        dec = self._decoders[batch_size] = AOTDecoder(step)
        return dec

    def _generate(self, input_ids: torch.Tensor, max_new_tokens: int, path: str,
                  kwargs: dict[str, Any]) -> torch.Tensor:
        dec = self.decoder(input_ids.size(0)) if path == "compiled" else None
        if dec is None:
            self.last_path = "eager (compile failed)" if path == "compiled" else "eager"
            return self.model.generate(input_ids, max_new_tokens=max_new_tokens, **kwargs)
        self.last_path = "compiled"
        return self.model.generate(input_ids, max_new_tokens=max_new_tokens, decoder=dec,
                                   **kwargs)
