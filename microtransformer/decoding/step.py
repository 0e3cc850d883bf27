"""The fixed-shape decode step: a KV cache of fixed rows x columns and the one-token step over
it, eager or compiled.

Every row has its own cache column, and attention runs over the whole buffer with a boolean
key mask (`model.generation.decode_step` with per-row columns), so shapes never change: the
step can be compiled once (torch.compile, inductor's C++ backend with `cpp_wrapper` and weight
`freezing`, explicit attention) and serves rows at different lengths (continuous batching).
A compile error falls back to the eager step with a warning (`CompiledOrEager`). Compiled
graphs land in inductor's on-disk caches, so a later process compiling the same step is faster.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from microtransformer.device import check_precision, prepare_model
from model.attention import KVCache
from model.generation import decode_step, prefill
from model.transformer import MicroTransformer

# inductor settings for the compiled CPU step (read only while compiling): C++ wrapper (no
# Python per kernel) and freezing (weights become constants, pre-packed for the CPU GEMMs)
COMPILE_OPTIONS: dict[str, object] = {"cpp_wrapper": True, "freezing": True}


def prepare_for_decoding(model: MicroTransformer, dtype: torch.dtype | str | None
                         ) -> tuple[MicroTransformer, torch.dtype]:
    """(the eval-mode model to decode with, its KV cache's dtype) for `dtype`: a precision
    name ("fp32", "bf16", "int8", "int8wo": `device.prepare_model`, checked against the
    device), a torch dtype (a converted copy unless the model has it), or None (as it is)."""
    ref = next(model.parameters())
    if isinstance(dtype, str):
        check_precision(dtype, ref.device)
        return prepare_model(model, dtype), torch.bfloat16 if dtype == "bf16" else torch.float32
    dtype = dtype or ref.dtype
    out = model if dtype == ref.dtype else copy.deepcopy(model).to(dtype)
    return out.eval(), dtype


def row_key_mask(cols: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(B,) each row's current column, (S,) the attended columns' indices -> boolean
    (B, 1, 1, S): row b sees the columns up to and including cols[b]."""
    return (columns[None, :] <= cols[:, None])[:, None, None, :]


class CompiledOrEager:
    """`fn` under `torch.compile(fullgraph=True, dynamic=False)`, compiled on the first call per
    key (the non-tensor arguments) under inductor's CPU `options`; if compiling fails it warns
    once, records why in `error` and runs `fn` eagerly from then on.

    inductor's FX-graph and AOT-autograd caches (on by default, on disk under
    `TORCHINDUCTOR_CACHE_DIR`, else the system temp folder) make a later process's compile
    of the same step much cheaper (docs/PERFORMANCE.md).
    """

    def __init__(self, fn: Callable[..., Any], options: dict[str, object], owner: str) -> None:
        self.eager = fn
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        self.options = options
        self.owner = owner
        self.error: str | None = None
        self.seconds = 0.0  # total time of the compiling calls
        self._keys: set[tuple[Any, ...]] = set()

    @property
    def ready(self) -> bool:
        """True once a call ran compiled (compiled, no fallback)."""
        return self.error is None and bool(self._keys)

    def __call__(self, *args: Any) -> Any:
        if self.error is not None:
            return self.eager(*args)
        key = tuple(a for a in args if not isinstance(a, torch.Tensor))
        if key in self._keys:
            return self.compiled(*args)
        # deferred: only a compiling call needs inductor, and importing it at module top would
        # slow every command's start-up (measured in docs/PERFORMANCE.md, "Start-up")
        import torch._inductor.config as inductor_config

        start = time.perf_counter()
        try:
            with inductor_config.patch(**self.options):
                result = self.compiled(*args)
        except Exception as exc:  # any compile failure: eager fallback
            self.error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"{self.owner}: torch.compile failed, using the eager step "
                          f"({self.error})", RuntimeWarning, stacklevel=3)
            return self.eager(*args)
        finally:
            self.seconds += time.perf_counter() - start
        self._keys.add(key)
        return result


class DecodeStep:
    """A fixed-shape KV cache of `batch_size` rows x `max_len` columns and the one-token step
    over it, for decoders whose rows are at different lengths (continuous batching slots).

    Every row has its own column: `prefill(row, ids)` fills row `row` with a prompt, then each
    call `step(tokens, positions, cols, key_mask)` feeds one token per row at column cols[b]
    and returns float32 logits (B, V). Rows that are not in use can be fed anything; their
    logits are ignored. The step is `model.generation.decode_step` with per-row columns
    (attention over the whole buffer with `key_mask`), so shapes never change.

    Options: `dtype` a torch dtype for weights and cache (a copy of the model when it differs),
    or a precision name: "fp32", "bf16" (bf16 weights, activations and cache; CPUs with native
    bf16 or CUDA) or "int8" (linear layers int8 dynamically quantized, CPU). `compile=True`
    compiles the step with torch.compile on its first call (inductor C++ on CPU, frozen
    weights, explicit attention; one compile per DecodeStep, cached on disk across processes;
    an error falls back to the eager step, see `compile_error`). Compiling pays off for a
    long-lived decoder such as a server's (see `decoding.generator.choose_decode_path`).
    `cache`: decode over an existing cache of exactly this shape and dtype (e.g. a
    `KVCache.view` of a larger one) instead of allocating one.
    """

    def __init__(self, model: MicroTransformer, batch_size: int, max_len: int, *,
                 dtype: torch.dtype | str | None = None, compile: bool = False,
                 cache: KVCache | None = None) -> None:
        if not 1 <= max_len <= model.max_seq_len:
            raise ValueError(f"max_len={max_len} must be in [1, max_seq_len={model.max_seq_len}]")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.device = next(model.parameters()).device
        self.model, self.dtype = prepare_for_decoding(model, dtype)
        cfg = self.model.config
        self.batch_size, self.max_len = batch_size, max_len
        if cache is None:
            cache = KVCache(cfg.num_layers, batch_size, cfg.num_heads, max_len, cfg.head_dim,
                            dtype=self.dtype, device=self.device)
        elif (cache.k.size(1), cache.max_len, cache.k.dtype) != (batch_size, max_len, self.dtype):
            raise ValueError(
                f"cache has {cache.k.size(1)} rows x {cache.max_len} columns of "
                f"{cache.k.dtype}; this decoder needs {batch_size} x {max_len} of {self.dtype}")
        self.cache = cache
        self.columns = torch.arange(max_len, device=self.device)  # (S,)
        self._not_compiled: str | None = None
        if compile and dtype == "int8":  # packed int8 weights: dynamo cannot trace the op
            self._not_compiled = "int8 dynamically quantized linears cannot be compiled"
            compile = False
        self._compiled = (CompiledOrEager(self._step, COMPILE_OPTIONS, "DecodeStep")
                          if compile else None)

    @property
    def compile_error(self) -> str | None:
        """Why the step runs eagerly although `compile=True` was asked, if it does."""
        return self._compiled.error if self._compiled is not None else self._not_compiled

    @property
    def compiled(self) -> bool:
        """True once the step runs compiled (compiled and no fallback)."""
        return self._compiled is not None and self._compiled.ready

    @torch.inference_mode()
    def prefill(self, row: int, ids: torch.Tensor) -> torch.Tensor:
        """Write the prompt `ids` (T,) into row `row`, columns 0..T-1; last logits (V,) fp32."""
        if not 1 <= ids.numel() <= self.max_len:
            raise ValueError(f"prompt of {ids.numel()} tokens must be in [1, {self.max_len}]")
        logits = prefill(self.model, ids.to(self.device)[None], self.cache.rows(row, row + 1))
        return logits[0].float()

    def key_mask(self, cols: torch.Tensor) -> torch.Tensor:
        """(B,) current columns -> boolean (B, 1, 1, S): each row sees columns 0..cols[b]."""
        return row_key_mask(cols, self.columns)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cols: torch.Tensor,
             key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed tokens (B,) at positions (B,) into columns cols (B,); logits (B, V) fp32."""
        mask = self.key_mask(cols) if key_mask is None else key_mask
        if self._compiled is None:
            with torch.inference_mode():
                return self._step(tokens, positions, cols, mask)
        with torch.no_grad():  # inference tensors trip inductor's freezing
            return self._compiled(tokens, positions, cols, mask)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, cols: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
        return decode_step(self.model, tokens, positions, self.cache, cols, mask,
                           explicit_attention=self._compiled is not None).float()
