"""The step that runs the model: one KV cache of `max_batch` rows x the context, prefill of a
prompt into a row, and one batched decode step over a (rows, columns) bucket of it.

One `decoding.step.DecodeStep` per bucket, each over a view of the first rows and columns of
the one shared cache, so a step over few short rows runs a small fixed-shape step. Each row is
at its own column (position == column: prompts are not padded).

With `compile=True` each bucket also gets a fast step, built in the background by
`compiler.BucketCompiler` once the bucket has served `compile_after` eager steps, and swapped
in when ready: serving never waits for a compile.

- On the CPU in fp32, bf16 or int8wo the fast step is `generate`'s ahead-of-time package
  (`decoding.aot`): one package per row count, compiled once and then loaded from disk in
  milliseconds by every later server and `generate` of that model shape, run by its C++
  wrapper (no Python or dynamo guards per step) over the first rows of the shared cache, and
  attending over the filled columns only (up to the longest row's, not the bucket's width).
  The shared cache has one column more than the context for it (the package's layout).
- Elsewhere (CUDA, `int8`), or if packaging fails, it is the bucket's step under
  torch.compile (inductor): built over a scratch cache of the same shape and strides (its
  compiling call writes into the cache it runs on, and the engine thread keeps using the real
  one meanwhile), then pointed at the real cache's view: same shapes, strides, dtypes and
  aliasing, so torch.compile's guards still hold and nothing recompiles.

docs/SERVING.md has the timings of both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from microtransformer.decoding import aot
from microtransformer.decoding.step import DecodeStep, prepare_for_decoding, row_key_mask
from microtransformer.serve.compiler import BucketCompiler
from model.attention import KVCache
from model.generation import prefill

Bucket = tuple[int, int]  # (rows, columns)


class ModelRunner:
    """Runs `model` over a cache of `max_batch` rows for the given row and column buckets
    (both ascending, ending with max_batch and the model's context).

    Args:
        dtype: a torch dtype, or a precision name ("fp32", "bf16", "int8", "int8wo": see
            `DecodeStep`; a copy of the model when it differs from the model's).
        compile: build compiled bucket steps in the background (see the module docstring).
        compile_after: eager steps a bucket serves before it is queued for compiling.
        build_step: bucket -> its fast step, run in the compiler thread (default:
            `compiled_step`); a seam for tests. The step must have `step(tokens, positions,
            cols)` and write into this runner's cache (`self.cache.view(rows, cols)`).
        log: where compile progress lines go (None: nowhere).
    """

    def __init__(self, model: torch.nn.Module, max_batch: int, row_buckets: list[int],
                 col_buckets: list[int], *, dtype: torch.dtype | str | None = None,
                 compile: bool = False, compile_after: int = 1,
                 build_step: Callable[[Bucket], Any] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        context = model.max_seq_len
        self.model, cache_dtype = prepare_for_decoding(model, dtype)
        self.device = next(self.model.parameters()).device
        cfg = self.model.config
        # one column more than the context: the packaged steps' layout (decoding.aot)
        self.cache = KVCache(cfg.num_layers, max_batch, cfg.num_heads, context + 1,
                             cfg.head_dim, dtype=cache_dtype, device=self.device)
        self.decoder = DecodeStep(self.model, max_batch, context,
                                  cache=self.cache.view(max_batch, context))
        self.max_batch, self.context = max_batch, context
        self.precision = aot.packaged_precision(self.model)  # None: no packaged steps
        self._packages: dict[int, PackagedStep] = {}  # row count -> its packaged step
        self._on_disk: dict[int, bool] = {}  # row count -> its package was on disk at first use
        self.log = log
        self.steps: dict[Bucket, DecodeStep] = {}
        for rows in row_buckets:
            for cols in col_buckets:
                if (rows, cols) == (max_batch, context):
                    self.steps[rows, cols] = self.decoder
                else:
                    self.steps[rows, cols] = DecodeStep(
                        self.model, rows, cols, cache=self.cache.view(rows, cols))
        self.fast: dict[Bucket, Any] = {}  # compiled steps, swapped in by the compiler thread
        self._scratch: KVCache | None = None
        self._scratch_lock = threading.Lock()
        self.compiler: BucketCompiler | None = None
        if compile:
            self.compiler = BucketCompiler(build_step or self.compiled_step, self._publish,
                                           log=log, after=compile_after)

    def prefill(self, row: int, prompt_ids: list[int]) -> torch.Tensor:
        """Write the prompt into row `row` (columns 0..T-1); the last position's logits (V,)."""
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)  # (T,)
        return self.decoder.prefill(row, prompt)

    def prefill_rows(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Write prompts of one length into rows `rows` (columns 0..T-1) with one forward
        over all of them -> the last position's logits (n, V) fp32. One prompt is
        `prefill`; several run as one (n, T) batch over a scratch cache whose columns are
        then copied into their rows (the same values up to float rounding: one GEMM of
        n x T rows instead of n of T)."""
        if len(prompts) == 1:
            return self.prefill(rows[0], prompts[0])[None]
        T = len(prompts[0])
        if any(len(p) != T for p in prompts):
            raise ValueError("prefill_rows needs prompts of one length")
        if not 1 <= T <= self.context:
            raise ValueError(f"prompt of {T} tokens must be in [1, {self.context}]")
        big = self.decoder.cache
        scratch = KVCache(big.k.size(0), len(rows), big.k.size(2), T, big.k.size(4),
                          dtype=big.k.dtype, device=big.k.device)
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)  # (n, T)
        with torch.inference_mode():
            logits = prefill(self.model, ids, scratch).float()  # (n, V)
            index = torch.tensor(rows, device=self.device)
            big.k[:, :, :, :T].index_copy_(1, index, scratch.k)  # (L, B, nh, T, hs)
            big.v[:, :, :, :T].index_copy_(1, index, scratch.v)
        return logits

    def step(self, rows: int, columns: int, tokens: list[int], cols: list[int]
             ) -> torch.Tensor:
        """Feed tokens[i] at column cols[i] of row i (len <= rows; the other rows of the
        bucket are idle and write column 0) -> fp32 logits (len(tokens), V)."""
        idle = rows - len(tokens)
        fast = self.fast.get((rows, columns))
        if fast is None:
            if self.compiler is not None:
                self._queue((rows, columns))
            step: Any = self.steps[rows, columns]
        else:
            step = fast
        # outside inference mode: the compiled step's guards were made on normal tensors (an
        # inference tensor would fail them and recompile in this thread)
        with torch.inference_mode(False):
            tokens_t = torch.tensor([*tokens, *[0] * idle], dtype=torch.long,
                                    device=self.device)  # (rows,)
            cols_t = torch.tensor([*cols, *[0] * idle], dtype=torch.long, device=self.device)
            return step.step(tokens_t, cols_t, cols_t)[:len(tokens)]

    def _queue(self, bucket: Bucket) -> None:
        """An eager step ran over `bucket`: count it towards `compile_after`, or, when its row
        count's package is already built or on disk (loaded in milliseconds), queue it now."""
        rows = bucket[0]
        if rows not in self._on_disk:
            self._on_disk[rows] = self.precision is not None and aot.is_cached(
                self.model, rows, self.precision)
        assert self.compiler is not None
        packaged = self.precision is not None  # (None once packaging failed: torch.compile)
        if (packaged and (self._on_disk[rows] or rows in self._packages)
                and self.compiler.uses.get(bucket, 0) < self.compiler.after):
            self.compiler.request(bucket)  # (request counts it as queued: once)
        else:
            self.compiler.count(bucket)

    def compiled_step(self, bucket: Bucket) -> PackagedStep | DecodeStep:
        """Build the fast step of `bucket` (in the compiler thread): its row count's packaged
        step where the model can be packaged (compiled or loaded once per row count, shared
        by every column bucket), else the bucket's torch.compile step. Raises RuntimeError
        when no fast step could be built (the bucket stays eager)."""
        rows = bucket[0]
        if self.precision is not None:
            if rows not in self._packages:
                try:
                    self._packages[rows] = PackagedStep(self.model, self.cache, rows,
                                                        self.precision)
                except aot.AOTCompileError as exc:  # torch.compile's step instead
                    self.precision = None
                    if self.log is not None:
                        self.log(f"packaging the step failed, buckets compile with "
                                 f"torch.compile instead ({exc})")
                    return self._torch_compiled_step(bucket)
            return self._packages[rows]
        return self._torch_compiled_step(bucket)

    def _torch_compiled_step(self, bucket: Bucket) -> DecodeStep:
        """The bucket's step under torch.compile: compiled over a scratch cache of the real
        cache's shape, then pointed at the real cache's view. RuntimeError if it failed."""
        rows, cols = bucket
        # deferred: only compiling needs dynamo's config. Every bucket's DecodeStep compiles
        # the same `_step` code, and dynamo counts each as a recompile of it: past its limit
        # (8 by default) the compile fails, so the limit must hold every bucket
        import torch._dynamo.config as dynamo_config

        needed = len(self.steps) + 8
        if dynamo_config.recompile_limit < needed:
            dynamo_config.recompile_limit = needed
        with self._scratch_lock:
            if self._scratch is None:
                big = self.cache
                self._scratch = KVCache(big.k.size(0), big.k.size(1), big.k.size(2),
                                        big.max_len, big.k.size(4), dtype=big.k.dtype,
                                        device=big.k.device)
            scratch = self._scratch
        step = DecodeStep(self.model, rows, cols, compile=True, cache=scratch.view(rows, cols))
        tokens = torch.zeros(rows, dtype=torch.long, device=self.device)  # (rows,)
        cols_t = torch.zeros(rows, dtype=torch.long, device=self.device)  # (rows,)
        # the compiling call, with `step`'s aliasing (positions is cols): a guard checks it
        step.step(tokens, cols_t, cols_t)
        if not step.compiled:
            raise RuntimeError(step.compile_error or "the step did not compile")
        step.cache = self.cache.view(rows, cols)
        return step

    def _publish(self, bucket: Bucket, step: Any) -> None:
        self.fast[bucket] = step  # one dict store: the engine thread sees old or new
        if self.compiler is not None and self.compiler.pending <= 1:
            with self._scratch_lock:  # nothing else queued: free the scratch cache
                self._scratch = None

    def close(self) -> None:
        """Stop compiling (waits for a compile in progress)."""
        if self.compiler is not None:
            self.compiler.close()

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` of the cache into row `dst` (the scheduler packed the rows)."""
        cache = self.decoder.cache
        cache.k[:, dst].copy_(cache.k[:, src])  # (L, nh, S, hs)
        cache.v[:, dst].copy_(cache.v[:, src])

    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits of every prompt position (T, V) fp32, one full forward (echo logprobs)."""
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        return self.model(prompt)[0].float()


class PackagedStep:
    """The ahead-of-time packaged decode step (`decoding.aot.AOTDecodeStep`) of `rows` rows
    over the first rows of the runner's cache (max_seq_len + 1 columns), called like a
    bucket's `DecodeStep`: each step attends over columns 0..max(cols) only, whatever the
    bucket's width. Raises `aot.AOTCompileError` if the package cannot be built or loaded."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, rows: int,
                 precision: str) -> None:
        self.aot = aot.AOTDecodeStep(model, rows, precision=precision,
                                     cache=cache.rows(0, rows))
        self.columns = torch.arange(cache.max_len - 1)  # (context,)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cols: torch.Tensor
             ) -> torch.Tensor:
        """Feed tokens (rows,) at positions (rows,) into columns cols (rows,) -> fp32 logits
        (rows, V)."""
        filled = int(cols.max()) + 1
        mask = row_key_mask(cols, self.columns[:filled])  # (rows, 1, 1, filled)
        return self.aot.step(tokens, positions, cols, mask)
