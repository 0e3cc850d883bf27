"""Fast decoding paths over `MicroTransformer.decode_step`, the one one-token step.

- `FastGenerator`: what `microtransformer generate` uses. The sampling loop stays
  `MicroTransformer.generate` (repetition penalty, `sample_next_token` with the caller's
  generator, EOS, streaming); only the decoder under it changes: the eager `KVDecoder`, or a
  `StaticKVDecoder` on a compiled fixed-shape `DecodeStep` when `choose_decode_path` (a pure
  function of the request and measured costs) says the compile repays itself. Optional bf16 or
  int8 precision (`prepare_model`, `check_precision`).
- `DecodeStep`: a fixed-shape cache with per-row columns and the one-token step over it (the
  serve engine's continuous batching); `compile=True` compiles the step, `dtype=` picks the
  precision.
- `StaticDecoder`: the whole fixed-length sampling loop on fixed buffers, with sampling inside
  the step (exponential race), recorded once as a CUDA graph on a GPU, or compiled on CPU.

Every path calls `MicroTransformer.decode_step` in its static mode (per-row cache columns,
attention over the whole buffer with a boolean key mask, so shapes never change); for
torch.compile it asks for `explicit_attention` (matmuls + masked softmax, which inductor fuses
better than the CPU flash kernel for one query). Compiling uses inductor's C++ backend with
`cpp_wrapper` and weight `freezing`; a compile error falls back to the eager step with a
warning (`compile_error`). Compiled graphs land in inductor's on-disk caches, so a later
process compiling the same step is faster.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.attention import KVCache
from model.transformer import MicroTransformer

# inductor settings for the compiled CPU step (read only while compiling)
COMPILE_OPTIONS: dict[str, object] = {"cpp_wrapper": True, "freezing": True}
# compile="max-autotune": also time inductor's C++ GEMM templates against MKL per linear
# (about 4x the compile time; measured ~15% faster at batch 1 on the 2-core CPU VM)
AUTOTUNE_OPTIONS: dict[str, object] = {"max_autotune": True,
                                       "max_autotune_gemm_backends": "CPP,ATEN"}
MATH_ATTENTION = True


def race_sample(logits: torch.Tensor, inv_temperature: torch.Tensor | float,
                top_k: int = 0) -> torch.Tensor:
    """Draw one token per row from softmax(logits * inv_temperature) restricted to the top k.

    logits (B, V) -> ids (B,). argmax(z_i - log E_i) with E_i ~ Exp(1) i.i.d. picks i with
    probability softmax(z)_i (the exponential race), so this equals softmax + multinomial in
    distribution, with no data-dependent host work (safe inside a CUDA graph).
    top_k 0 or >= V samples from the whole vocabulary.
    """
    if 0 < top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)  # (B, k)
    else:
        values, indices = logits, None
    race = torch.empty_like(values).exponential_().log_()  # log E, E ~ Exp(1)
    choice = (values * inv_temperature - race).argmax(-1, keepdim=True)  # (B, 1)
    return (indices.gather(-1, choice) if indices is not None else choice).squeeze(-1)



class CompiledStep:
    """`torch.compile(fn, fullgraph=True, dynamic=False)`, compiled on the first call per
    key (the non-tensor arguments) under inductor's CPU `options`; if compiling fails it
    warns once, records why in `error` and runs `fn` eagerly from then on.

    inductor's FX-graph and AOT-autograd caches (on by default, on disk under
    `TORCHINDUCTOR_CACHE_DIR`, else the system temp folder) make a later process's compile
    of the same step much cheaper (see docs/PERFORMANCE.md for measured times).
    """

    def __init__(self, fn: Callable[..., Any], options: dict[str, object], owner: str) -> None:
        self.eager = fn
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        self.options = options
        self.owner = owner
        self.error: str | None = None
        self.seconds = 0.0  # total time of the compiling calls
        self._keys: set[tuple[Any, ...]] = set()

    def __call__(self, *args: Any) -> Any:
        if self.error is not None:
            return self.eager(*args)
        key = tuple(a for a in args if not isinstance(a, torch.Tensor))
        if key in self._keys:
            return self.compiled(*args)
        import torch._inductor.config as inductor_config

        start = time.perf_counter()
        try:
            # C++ wrapper: no Python per kernel; freezing: weights become constants
            # (pre-packed for the CPU GEMMs). Only read while compiling.
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


# ---------------------------------------------------------------------------- precision
PRECISIONS = ("fp32", "bf16", "int8")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU flags list AVX-512 BF16 or AMX BF16 (Linux /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_precision(precision: str, device: torch.device,
                    cpuinfo: str | None = None) -> None:
    """Raise ValueError naming the precision, what this machine lacks and the fix."""
    if precision not in PRECISIONS:
        raise ValueError(f"dtype={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16(cpuinfo):
        raise ValueError("dtype='bf16' needs a CPU with native bf16 (avx512_bf16 or amx_bf16 "
                         "in /proc/cpuinfo) or a CUDA device; this CPU has neither: use fp32 "
                         "or int8")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"dtype='int8' (dynamic quantization of the linear layers) runs on "
                         f"the CPU only, not on {device.type}: use --device cpu, or bf16")


def prepare_model(model: MicroTransformer, precision: str) -> MicroTransformer:
    """An eval-mode model for inference in `precision`: the model itself for fp32, a bf16
    copy, or a copy whose linear layers (the tied head included) are int8 dynamically
    quantized (`torch.ao.quantization.quantize_dynamic`: int8 weights, activations quantized
    per call; embeddings and LayerNorms stay fp32)."""
    if precision == "fp32":
        return model.eval()
    if precision == "bf16":
        out = copy.deepcopy(model).to(torch.bfloat16).eval()
    elif precision == "int8":
        from torch.ao.quantization import quantize_dynamic

        # The eager quantization API warns it will move to torchao; it stays because torchao's
        # int8 linear is about 5x slower eagerly on CPU (docs/PERFORMANCE.md, "Precision").
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear},
                                   dtype=torch.qint8)
    else:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    out.requires_grad_(False)
    return out


# ---------------------------------------------------------------------------- path rule
@dataclass(frozen=True)
class DecodeCosts:
    """Measured CPU costs behind `choose_decode_path` (seconds; see docs/PERFORMANCE.md).

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
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "microtransformer"


def compile_key(model: MicroTransformer, batch_size: int, max_len: int, precision: str) -> str:
    """Name of a compiled step in inductor's cache: model shape, batch, cache length,
    precision and torch version (frozen weights are part of inductor's own key)."""
    import hashlib
    import json

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


class StaticDecoder:
    """Generate `n_new` tokens for a fixed batch size and total length with a replayed step.

    Args:
        model: the model to decode with; a private copy in `dtype` is kept (eval mode).
        batch_size: rows per call (prompts must have exactly this many rows).
        max_len: prompt length + new tokens, at most `model.max_seq_len`.
        dtype: weights/cache dtype (default: the model's), e.g. torch.bfloat16 on a GPU.
        cuda_graph: capture the step as a CUDA graph (default: True on CUDA, False otherwise).
        compile: compile the step with torch.compile (inductor C++ on CPU; not combined with
            a CUDA graph). Compiling happens on the first `generate` per (top_k, greedy); an
            error falls back to the eager step (see `compile_error`). "max-autotune" also
            autotunes the GEMMs (slower compile, faster step).
    """

    def __init__(
        self,
        model: MicroTransformer,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        cuda_graph: bool | None = None,
        compile: bool | str = False,  # shadows the builtin, mirrors torch.compile
    ) -> None:
        if not 1 <= max_len <= model.max_seq_len:
            raise ValueError(
                f"max_len={max_len} must be in [1, max_seq_len={model.max_seq_len}]; "
                "generate fewer tokens or use model.generate (it slides the window)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        ref = next(model.parameters())
        self.device = ref.device
        self.dtype = dtype or ref.dtype
        self.model = copy.deepcopy(model).to(self.dtype).eval()
        self.model.requires_grad_(False)
        cfg = self.model.config
        self.batch_size, self.max_len = batch_size, max_len
        dev = self.device
        self.cache = KVCache(cfg.num_layers, batch_size, cfg.num_heads, max_len, cfg.head_dim,
                             dtype=self.dtype, device=dev)
        # static inputs/outputs of the step; their addresses never change
        self.tok = torch.zeros(batch_size, dtype=torch.long, device=dev)  # (B,) token fed in
        self.position = torch.zeros(batch_size, dtype=torch.long, device=dev)  # (B,) its position
        self.col = torch.zeros(1, dtype=torch.long, device=dev)  # cache column being written
        self.key_real = torch.ones(batch_size, max_len, dtype=torch.bool, device=dev)  # (B, S)
        self.out = torch.zeros(batch_size, max_len + 1, dtype=torch.long, device=dev)
        self.inv_temperature = torch.ones((), dtype=torch.float32, device=dev)
        self.columns = torch.arange(max_len, device=dev)  # (S,)
        self.use_graph = (dev.type == "cuda") if cuda_graph is None else cuda_graph
        if self.use_graph and dev.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        if compile not in (False, True, "max-autotune"):
            raise ValueError(f"compile={compile!r}: expected a bool or 'max-autotune'")
        if compile and self.use_graph:
            raise ValueError("compile=True and cuda_graph=True are exclusive")
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.compile = bool(compile)
        options = COMPILE_OPTIONS | (AUTOTUNE_OPTIONS if compile == "max-autotune" else {})
        self._compiled = CompiledStep(self._step, options, "StaticDecoder") if compile else None
        # inductor fuses explicit attention better than the CPU flash kernel for 1 query
        self._math_attention = bool(compile) and MATH_ATTENTION

    @property
    def compile_error(self) -> str | None:
        """Why compiling fell back to the eager step, if it did."""
        return self._compiled.error if self._compiled is not None else None

    @property
    def compile_seconds(self) -> float:
        """Total one-off compile time so far (the first step of each (top_k, greedy))."""
        return self._compiled.seconds if self._compiled is not None else 0.0

    # ------------------------------------------------------------------ the step
    def _step(self, top_k: int, greedy: bool) -> None:
        """Feed `tok` at `col`, sample the next token into `tok` and `out[:, col + 1]`."""
        # key s is visible if s <= col and real; a query always sees itself (no empty rows)
        visible = (self.columns <= self.col) & (self.key_real | (self.columns == self.col))
        logits = self.model.decode_step(
            self.tok, self.position, self.cache, self.col.expand(self.batch_size),
            visible[:, None, None, :], explicit_attention=self._math_attention,
        ).float()  # (B, V)
        nxt = logits.argmax(-1) if greedy else race_sample(logits, self.inv_temperature, top_k)
        self.out.index_copy_(1, self.col + 1, nxt[:, None])
        self.tok.copy_(nxt)
        self.position.add_(1)
        self.col.add_(1)

    def _runner(self, top_k: int, greedy: bool):
        """A zero-argument callable running one step: a graph replay, or the eager step."""
        if self._compiled is not None:
            compiled = self._compiled
            return lambda: compiled(top_k, greedy)
        if not self.use_graph:
            return lambda: self._step(top_k, greedy)
        key = (top_k, greedy)
        if key not in self._graphs:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):  # warm up kernels / workspaces outside the capture
                    self.col.zero_()
                    self._step(top_k, greedy)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.col.zero_()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(top_k, greedy)
            self._graphs[key] = graph
        return self._graphs[key].replay

    # ------------------------------------------------------------------ public
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt (B, T0) -> (B, T0 + max_new_tokens); left-padded prompts need the mask.

        Sampling is top-k (None/0: whole vocabulary) at `temperature`; 0 means greedy.
        """
        # the compiled step runs under no_grad: inference tensors trip inductor's freezing
        with torch.no_grad() if self.compile else torch.inference_mode():
            return self._generate(input_ids, max_new_tokens, temperature=temperature,
                                  top_k=top_k, attention_mask=attention_mask)

    def _generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float,
                  top_k: int | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, T0 = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"prompt has {B} rows but this decoder was built for "
                             f"batch_size={self.batch_size}")
        if max_new_tokens < 1 or T0 + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {T0} + max_new_tokens {max_new_tokens} must be in "
                             f"[{T0 + 1}, max_len={self.max_len}]")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
        greedy = temperature == 0
        run = self._runner(int(top_k or 0), greedy)
        ids = input_ids.to(self.device)
        real = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(self.device).bool())
        positions = MicroTransformer.positions_from_mask(real)  # (B, T0)
        self.key_real.fill_(True)
        self.key_real[:, :T0] = real
        self.inv_temperature.fill_(1.0 if greedy else 1.0 / temperature)
        self.col.zero_()
        self._loop(run, ids, positions, max_new_tokens)
        result = self.out[:, : T0 + max_new_tokens].clone()
        result[:, :T0] = ids
        return result

    def _loop(self, run, ids: torch.Tensor, positions: torch.Tensor,
              max_new_tokens: int) -> None:
        for t in range(ids.size(1)):  # prefill: one step per prompt token (prompts are short)
            self.tok.copy_(ids[:, t])
            self.position.copy_(positions[:, t])
            run()
        for _ in range(max_new_tokens - 1):  # each replay feeds back the token it sampled
            run()


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(threads)` (None: unchanged), then restore."""
    if threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class DecodeStep:
    """A fixed-shape KV cache of `batch_size` rows x `max_len` columns and the one-token step
    over it, for decoders whose rows are at different lengths (continuous batching slots).

    Every row has its own column: `prefill(row, ids)` fills row `row` with a prompt, then each
    call `step(tokens, positions, cols, key_mask)` feeds one token per row at column cols[b]
    and returns float32 logits (B, V). Rows that are not in use can be fed anything; their
    logits are ignored. The step is `MicroTransformer.decode_step` in its static mode (per-row
    columns, attention over the whole buffer with `key_mask`), so shapes never change.

    Options: `dtype` a torch dtype for weights and cache (a copy of the model when it differs),
    or a precision name: "fp32", "bf16" (bf16 weights, activations and cache; CPUs with native
    bf16 or CUDA) or "int8" (linear layers int8 dynamically quantized, CPU). `compile=True`
    compiles the step with torch.compile on its first call (inductor C++ on CPU, frozen
    weights, explicit attention; one compile per DecodeStep, cached on disk across processes;
    an error falls back to the eager step, see `compile_error`). Compiling pays off for a
    long-lived decoder such as a server's (see `choose_decode_path`). `cache`: decode over an
    existing cache of exactly this shape and dtype (e.g. a `KVCache.view` of a larger one)
    instead of allocating one.
    """

    def __init__(self, model: MicroTransformer, batch_size: int, max_len: int, *,
                 dtype: torch.dtype | str | None = None, compile: bool = False,
                 cache: KVCache | None = None) -> None:
        if not 1 <= max_len <= model.max_seq_len:
            raise ValueError(f"max_len={max_len} must be in [1, max_seq_len={model.max_seq_len}]")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        ref = next(model.parameters())
        self.device = ref.device
        if isinstance(dtype, str):
            check_precision(dtype, self.device)
            self.model = prepare_model(model, dtype)
            self.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        else:
            self.dtype = dtype or ref.dtype
            self.model = model if self.dtype == ref.dtype else copy.deepcopy(model).to(self.dtype)
        self.model.eval()
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
        self._compiled = (CompiledStep(self._step, COMPILE_OPTIONS, "DecodeStep")
                          if compile else None)

    @property
    def compile_error(self) -> str | None:
        """Why the step runs eagerly although `compile=True` was asked, if it does."""
        return self._compiled.error if self._compiled is not None else self._not_compiled

    @property
    def compiled(self) -> bool:
        """True once the step runs compiled (compiled and no fallback)."""
        return (self._compiled is not None and self._compiled.error is None
                and bool(self._compiled._keys))

    @torch.inference_mode()
    def prefill(self, row: int, ids: torch.Tensor) -> torch.Tensor:
        """Write the prompt `ids` (T,) into row `row`, columns 0..T-1; last logits (V,) fp32."""
        if not 1 <= ids.numel() <= self.max_len:
            raise ValueError(f"prompt of {ids.numel()} tokens must be in [1, {self.max_len}]")
        logits = self.model.prefill(ids.to(self.device)[None], self.cache.rows(row, row + 1))
        return logits[0].float()

    def key_mask(self, cols: torch.Tensor) -> torch.Tensor:
        """(B,) current columns -> boolean (B, 1, 1, S): each row sees columns 0..cols[b]."""
        return (self.columns[None, :] <= cols[:, None])[:, None, None, :]

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
        return self.model.decode_step(tokens, positions, self.cache, cols, mask,
                                      explicit_attention=self._compiled is not None).float()


class StaticKVDecoder:
    """`MicroTransformer.generate(decoder=...)` on a `DecodeStep`: the prompt is prefilled
    into all rows at once, then every token goes through the fixed-shape (optionally
    compiled) step with all rows at the same column. Same interface as `KVDecoder`."""

    def __init__(self, step: DecodeStep) -> None:
        self.decode = step
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
        return self.decode.model.prefill(input_ids, self.decode.cache,
                                         attention_mask=attention_mask)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, col: int,
             key_mask: torch.Tensor | None) -> torch.Tensor:
        """Feed tokens (B,) at positions (B,) into column `col`; logits (B, V) fp32.
        `key_mask` is implied by the prefill's padding (new columns are real)."""
        self.mask[:, 0, 0, col] = True
        self.cols.fill_(col)
        return self.decode.step(tokens, positions, self.cols, self.mask)


class FastGenerator:
    """`model.generate` through the fastest exact path for each request.

    The same sampling loop (`MicroTransformer.generate`: repetition penalty, then
    `sample_next_token` with the caller's generator, EOS, streaming) runs on either the eager
    cached decode or, when `choose_decode_path` says compiling repays itself, the compiled
    fixed-shape `DecodeStep` (cache length rounded up by `cache_length`, so few shapes
    compile). Greedy tokens are those of `model.generate`; sampled ones too unless float
    rounding between the two steps flips a draw. Sequences longer than the context (sliding
    window) and `use_cache=False` always take the eager path. Decoders are kept per
    (batch, cache length) for later calls. `threads`: torch intra-op threads while generating
    on CPU (default None: torch's setting, which was fastest on an idle machine; 1 is faster
    only when another process holds a core: see docs/PERFORMANCE.md).
    `expected_calls`: how many requests of this shape will follow (e.g. `--num-samples`); the
    rule weighs the compile against all of their steps.
    """

    def __init__(self, model: MicroTransformer, *, precision: str = "fp32",
                 compile: bool = True, costs: DecodeCosts = CPU_COSTS,
                 threads: int | None = None, expected_calls: int = 1) -> None:
        self.device = next(model.parameters()).device
        # one-token steps are ~60 tiny ops: 1 thread wins when a core is busy elsewhere (each op
        # waits for the slow thread), 2 threads win on an idle 2-core machine (PERFORMANCE.md)
        self.threads = threads if self.device.type == "cpu" else None
        check_precision(precision, self.device)
        self.precision = precision
        self.model = prepare_model(model, precision)
        # dynamo cannot trace the quantized linear's packed weights, so int8 stays eager
        self.allow_compile = compile and precision != "int8"
        self.costs = costs
        self.expected_calls = max(1, expected_calls)
        self.last_path: str | None = None
        self._decoders: dict[tuple[int, int], StaticKVDecoder] = {}

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
            decoder = StaticKVDecoder(DecodeStep(self.model, B, length, compile=True))
            self._decoders[(B, length)] = decoder
        out = self.model.generate(input_ids, max_new_tokens=max_new_tokens, decoder=decoder,
                                  **kwargs)
        if decoder.decode.compiled:
            mark_compiled(compile_key(self.model, B, length, self.precision))
        else:
            self.last_path = "eager (compile failed)"
        return out
