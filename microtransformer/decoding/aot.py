"""The ahead-of-time compiled decode step: one AOTInductor package per model shape, batch
size and precision, compiled once and cached on disk, serving every model of that shape.

The package holds the one-token step (`model.generation.decode_step` with per-row cache
columns and explicit attention) as a C++ library: no Python, no dynamo guards per token.
Weights are the package's constants but are not stored in it: `load_constants` points them
at the model's own tensors (`user_managed`), so one package serves every set of weights of
its shape (a training run's checkpoints, fine-tunes). The number of attended cache columns
is a dynamic size of the key mask, so a step costs what the filled columns cost, not the
whole buffer. The batch size is static (inductor specialises a dynamic one; measured in
docs/PERFORMANCE.md), so each batch size has its own package.

Packages live in `package_dir()` (`$MICROTRANSFORMER_CACHE_DIR`, else
`$XDG_CACHE_HOME/microtransformer`, else `~/.cache/microtransformer`, then `decode/`), named
by `package_key`: model shape, batch, precision, torch version and CPU instruction set.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microtransformer.device import check_precision, matmul_flags, prepare_model
from microtransformer.quantization import Int8WeightLinear
from model.attention import KVCache
from model.generation import decode_step, prefill
from model.transformer import MicroTransformer

# the fields of ModelConfig that change the compiled graph (dropout and init do not)
SHAPE_FIELDS = ("vocab_size", "max_seq_len", "embed_dim", "num_heads", "num_layers", "ff_dim",
                "position", "activation", "qk_norm")
# int8 (quantize_dynamic's packed linears) cannot be exported; int8wo (int8 weight-only) can
PRECISIONS = ("fp32", "bf16", "int8wo")

REALIZE_OPCOUNT_THRESHOLD = 0  # (inductor's CPU default is 50: see `_inductor_configs`)
compile_count = 0  # packages compiled by this process (tests check that a cached one is reused)


class AOTCompileError(RuntimeError):
    """Exporting, compiling or loading the package failed (callers fall back to eager)."""


def package_dir() -> Path:
    """Folder of the compiled decode-step packages."""
    root = os.environ.get("MICROTRANSFORMER_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "microtransformer")
    return Path(root) / "decode"


def package_key(model: MicroTransformer, batch_size: int, precision: str) -> str:
    """Name of the package for this model shape, batch size and precision, on this torch
    version and CPU instruction set (the weights are not part of it)."""
    cfg = model.config.to_dict()
    shape = {k: cfg[k] for k in SHAPE_FIELDS}
    if cfg["head"] != "tied":  # an untied head is its own constant (tied packages keep their names)
        shape["head"] = cfg["head"]
    spec = {"shape": shape, "batch": batch_size,
            "precision": precision, "torch": torch.__version__, "cpu": matmul_flags(),
            "format": 2}  # 2: int8wo as one reduction at batch 1 (packages built before rebuild)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    return f"step-b{batch_size}-{precision}-{digest}"


def package_path(model: MicroTransformer, batch_size: int, precision: str) -> Path:
    """Where the package for this model shape, batch size and precision is (or will be)."""
    return package_dir() / f"{package_key(model, batch_size, precision)}.pt2"


def is_cached(model: MicroTransformer, batch_size: int, precision: str) -> bool:
    """True when a package for this shape, batch size and precision is on disk."""
    return package_path(model, batch_size, precision).is_file()


class _StepGraph(nn.Module):
    """What is exported: the decode step with the per-layer caches as inputs (mutated in
    place; one tensor per layer, so nothing but the new column is written)."""

    def __init__(self, model: MicroTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cols: torch.Tensor,
                key_mask: torch.Tensor, kv: list[torch.Tensor]) -> torch.Tensor:
        """tokens, positions, cols (B,); key_mask (B, 1, 1, S); kv: k0, v0, k1, v1, ... each
        (B, nh, T_max, hs) -> logits (B, V) fp32."""
        cache = KVCache.__new__(KVCache)
        cache.max_len = kv[0].size(2)
        cache.layers = [(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)]
        return decode_step(self.model, tokens, positions, cache, cols, key_mask,
                           explicit_attention=True).float()


def _example_inputs(model: MicroTransformer, batch_size: int, dtype: torch.dtype
                    ) -> tuple[Any, ...]:
    cache = _new_cache(model, batch_size, dtype)
    zeros = torch.zeros(batch_size, dtype=torch.long)  # (B,)
    mask = torch.ones(batch_size, 1, 1, 2, dtype=torch.bool)  # (B, 1, 1, S), S dynamic
    return zeros, zeros.clone(), zeros.clone(), mask, [t for kv in cache.layers for t in kv]


def _new_cache(model: MicroTransformer, batch_size: int, dtype: torch.dtype) -> KVCache:
    # one column more than the context: the attended length S <= max_seq_len then never
    # equals the buffer's, which export would otherwise specialise on
    cfg = model.config
    return KVCache(cfg.num_layers, batch_size, cfg.num_heads, cfg.max_seq_len + 1,
                   cfg.head_dim, dtype=dtype, device=torch.device("cpu"))


def compile_package(model: MicroTransformer, batch_size: int, path: Path) -> None:
    """Export the decode step of `model` (already in its precision) at `batch_size` and
    compile it into the AOTInductor package `path` (written atomically).

    A copy of the model is exported (weights are not part of the package): tracing swaps the
    traced module's parameters for fake tensors while it runs, and the server compiles in a
    background thread while its engine keeps decoding with the model."""
    global compile_count
    # deferred: importing torch._inductor costs ~0.9 s of start-up (docs/PERFORMANCE.md)
    import torch._inductor

    dtype = model.ln_f.weight.dtype
    graph = _StepGraph(copy.deepcopy(model)).eval()
    keys = torch.export.Dim("keys", min=1, max=model.config.max_seq_len)
    n_kv = 2 * model.config.num_layers
    shapes = (None, None, None, {3: keys}, [None] * n_kv)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices, not the user's
            warnings.simplefilter("ignore", FutureWarning)
            with torch.no_grad():
                exported = torch.export.export(graph, _example_inputs(model, batch_size, dtype),
                                               dynamic_shapes=shapes, strict=False)
            torch._inductor.aoti_compile_and_package(
                exported, package_path=tmp, inductor_configs=_inductor_configs(model))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    compile_count += 1


def _inductor_configs(model: MicroTransformer) -> dict[str, Any]:
    """Inductor settings for the package: constants not stored in it; for int8 weight-only
    linears, every value a later kernel reads more than once (a LayerNorm or GELU output
    broadcast over a linear's output rows) computed once into a buffer instead of being
    recomputed inside the reduction for each output row."""
    configs: dict[str, Any] = {"aot_inductor.package_constants_in_so": False}
    if isinstance(model.lm_head, Int8WeightLinear):
        configs["realize_opcount_threshold"] = REALIZE_OPCOUNT_THRESHOLD
    return configs


class AOTDecodeStep:
    """The decode step of `model` at `batch_size` rows from its AOTInductor package (compiled
    on first use, then loaded from disk), with a KV cache of max_seq_len + 1 columns.

    `precision` "fp32" (exact up to float rounding), "bf16" (bf16 weights, activations and
    cache: a bf16 copy of the model unless it is one already) or "int8wo" (int8 weight-only
    linear layers, fp32 activations and cache: `quantization.Int8WeightLinear`; a quantized
    copy unless the model is one already). `prefill(input_ids,
    attention_mask)` writes a prompt into columns 0..T-1 of every row; `step(tokens,
    positions, cols, key_mask)` feeds one token per row at columns cols (B,) and attends
    over the first key_mask.size(-1) columns.
    `cache`: decode over an existing cache of `batch_size` rows and max_seq_len + 1 columns
    in the model's precision, laid out as a `KVCache` of that shape (e.g. `rows(0, n)` of a
    larger one: the server's buckets share one cache) instead of allocating one.
    After construction: `compiled_now` (this call compiled the package), `seconds` (compile
    or load time), `path`. Raises `AOTCompileError` if exporting, compiling or loading fails,
    ValueError for a cache of another shape.
    """

    def __init__(self, model: MicroTransformer, batch_size: int, *,
                 precision: str = "fp32", cache: KVCache | None = None) -> None:
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise AOTCompileError(f"the AOT decode step is CPU only (model on {device})")
        if precision not in PRECISIONS:
            raise AOTCompileError(f"precision {precision!r} cannot be compiled ahead of time")
        check_precision(precision, device)
        # a model already in this precision is used as it is (its tensors become the constants)
        self.model = (model.eval() if _in_precision(model, precision)
                      else prepare_model(model, precision))
        self.dtype = self.model.ln_f.weight.dtype
        self.batch_size = batch_size
        self.max_len = model.config.max_seq_len
        if cache is not None:
            _check_cache(cache, self.model, batch_size, self.dtype)
        self.path = package_path(self.model, batch_size, precision)
        start = time.perf_counter()
        self.compiled_now = not self.path.is_file()
        try:
            if self.compiled_now:
                compile_package(self.model, batch_size, self.path)
            self._runner = _load(self.path, self.model)
        except Exception as exc:  # any export/compile/load failure: the caller falls back
            raise AOTCompileError(f"{type(exc).__name__}: {exc}") from exc
        self.seconds = time.perf_counter() - start
        self._run = self._runner.boxed_run
        self.cache = cache if cache is not None else _new_cache(self.model, batch_size, self.dtype)
        self._kv = [t for kv in self.cache.layers for t in kv]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                ) -> torch.Tensor:
        """Prompt (B, T), left-padded with its (B, T) mask or None -> last logits (B, V)."""
        return prefill(self.model, input_ids, self.cache, attention_mask=attention_mask).float()

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cols: torch.Tensor,
             key_mask: torch.Tensor) -> torch.Tensor:
        """Feed tokens (B,) at positions (B,) into columns cols (B,), attending over the
        key_mask (B, 1, 1, S) columns (S <= max_seq_len); logits (B, V) fp32."""
        return self._run([tokens, positions, cols, key_mask, *self._kv])[0]


def _check_cache(cache: KVCache, model: MicroTransformer, batch_size: int,
                 dtype: torch.dtype) -> None:
    """The package reads each layer's (B, nh, max_seq_len + 1, hs) keys and values with the
    strides of a contiguous tensor of that shape (the last dimension's are fixed at export)."""
    cfg = model.config
    want = (batch_size, cfg.num_heads, cfg.max_seq_len + 1, cfg.head_dim)
    k = cache.layers[0][0]
    strides = (want[1] * want[2] * want[3], want[2] * want[3], want[3], 1)
    if (len(cache.layers) != cfg.num_layers or tuple(k.shape) != want or k.dtype != dtype
            or k.device.type != "cpu"
            or any(t.stride() != strides for kv in cache.layers for t in kv)):
        raise ValueError(
            f"cache of {len(cache.layers)} layers of {tuple(k.shape)} {k.dtype} (strides "
            f"{k.stride()}) on {k.device}; the packaged step needs {cfg.num_layers} of {want} "
            f"{dtype} with strides {strides} on cpu")


def packaged_precision(model: MicroTransformer) -> str | None:
    """The precision a prepared model (`device.prepare_model`) runs in, when its step can be
    packaged ("fp32", "bf16", "int8wo"); None for other models (quantize_dynamic's int8, an
    fp16 copy) or a model off the CPU."""
    if next(model.parameters()).device.type != "cpu":
        return None
    if isinstance(model.lm_head, Int8WeightLinear):
        return "int8wo"
    if type(model.lm_head) is not nn.Linear:
        return None
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(model.ln_f.weight.dtype)


def _in_precision(model: MicroTransformer, precision: str) -> bool:
    """True when `model` is already prepared for `precision` (`device.prepare_model`)."""
    int8wo = isinstance(model.lm_head, Int8WeightLinear)
    if precision == "int8wo":
        return int8wo
    wanted = torch.bfloat16 if precision == "bf16" else torch.float32
    return not int8wo and model.ln_f.weight.dtype == wanted


def _load(path: Path, model: MicroTransformer) -> Any:
    """Load the package and point its constants at `model`'s tensors (kept alive by the
    caller; a tied head shares the embedding's tensor); returns the package's loader.

    The loader is built directly (`torch._C._aoti.AOTIModelPackageLoader`, what
    `torch._inductor.aoti_load_package` builds too): the public helper first imports
    torch._inductor and the export serialiser, about 2 s of a command's start-up, where the
    loader itself takes milliseconds (docs/PERFORMANCE.md).
    """
    aoti = getattr(torch._C, "_aoti", None)
    if aoti is not None and hasattr(aoti, "AOTIModelPackageLoader"):
        loader = aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    else:  # a torch without the private class: the public (slower to import) helper
        from torch._inductor import aoti_load_package

        loader = aoti_load_package(str(path)).loader
    state = {f"model.{k}": v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    # buffers kept out of the saved weights (rotary's table) are constants of the graph too
    state.update((f"model.{k}", v) for k, v in model.named_buffers() if f"model.{k}" not in state)
    names = loader.get_constant_fqns()
    missing = [n for n in names if n not in state]
    if missing:
        raise AOTCompileError(f"package {path.name} needs constants {missing[:3]} the model "
                              "lacks")
    # (constants, use the inactive buffer, check every constant is given, user-managed:
    # the model's own tensors are used in place, no copy, allow a host-to-device copy)
    loader.load_constants({n: state[n] for n in names}, False, True, True, False)
    return loader


class AOTDecoder:
    """A `model.generation.Decoder` on an `AOTDecodeStep`: prefill the prompt into all rows,
    then one packaged step per token with all rows at the same column, attending over the
    filled columns only."""

    def __init__(self, step: AOTDecodeStep) -> None:
        self.aot_step = step
        self.max_len = step.max_len
        B = step.batch_size
        self.cols = torch.zeros(B, dtype=torch.long)  # (B,) all equal
        self.mask = torch.ones(B, 1, 1, step.max_len, dtype=torch.bool)  # (B, 1, 1, T_max)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                ) -> torch.Tensor:
        """Prompt (B, T), left-padded with its mask or None -> last logits (B, V) fp32."""
        self.mask.fill_(True)  # columns after the prompt are real tokens
        if attention_mask is not None:
            self.mask[:, 0, 0, :input_ids.size(1)] = attention_mask.bool()
        return self.aot_step.prefill(input_ids, attention_mask)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, col: int,
             key_mask: torch.Tensor | None) -> torch.Tensor:
        """Feed tokens (B,) at positions (B,) into column `col`; logits (B, V) fp32.
        `key_mask` is implied by the prefill's padding (new columns are real)."""
        self.cols.fill_(col)
        # the package reads the mask as a contiguous (B, 1, 1, S) tensor (a copy if B > 1)
        mask = self.mask[..., :col + 1].contiguous()
        return self.aot_step.step(tokens.contiguous(), positions, self.cols, mask)
