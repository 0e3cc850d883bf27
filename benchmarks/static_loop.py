"""The whole sampling loop as one replayed fixed-shape step: a benchmark's decoder.

`StaticLoopGenerator` generates a fixed number of tokens for a fixed batch and total length
with sampling inside the step (top-k and temperature by the exponential race, `race_sample`,
no data-dependent host work), so the step can be recorded once as a CUDA graph on a GPU, or
compiled on CPU. It measures how fast the network can decode (benchmarks/run.py,
benchmarks/train_gpu.py); `microtransformer generate` and the server decode through
`microtransformer.decoding` instead, which keeps `MicroTransformer.generate`'s sampling
(repetition penalty, nucleus, EOS, the caller's generator).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from microtransformer.decoding.step import COMPILE_OPTIONS, CompiledOrEager
from model.attention import KVCache
from model.generation import decode_step
from model.transformer import MicroTransformer

# compile="max-autotune": also time inductor's C++ GEMM templates against MKL per linear
# (a longer compile for a faster step; docs/PERFORMANCE.md, "Compiled CPU decode")
AUTOTUNE_OPTIONS: dict[str, object] = {"max_autotune": True,
                                       "max_autotune_gemm_backends": "CPP,ATEN"}


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


class StaticLoopGenerator:
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
        self._compiled = (CompiledOrEager(self._step, options, "StaticLoopGenerator")
                          if compile else None)
        # inductor fuses explicit attention better than the CPU flash kernel for 1 query
        self._math_attention = bool(compile)

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
        logits = decode_step(
            self.model, self.tok, self.position, self.cache, self.col.expand(self.batch_size),
            visible[:, None, None, :], explicit_attention=self._math_attention,
        ).float()  # (B, V)
        nxt = logits.argmax(-1) if greedy else race_sample(logits, self.inv_temperature, top_k)
        self.out.index_copy_(1, self.col + 1, nxt[:, None])
        self.tok.copy_(nxt)
        self.position.add_(1)
        self.col.add_(1)

    def _runner(self, top_k: int, greedy: bool) -> Callable[[], None]:
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

    def _loop(self, run: Callable[[], None], ids: torch.Tensor, positions: torch.Tensor,
              max_new_tokens: int) -> None:
        for t in range(ids.size(1)):  # prefill: one step per prompt token (prompts are short)
            self.tok.copy_(ids[:, t])
            self.position.copy_(positions[:, t])
            run()
        for _ in range(max_new_tokens - 1):  # each replay feeds back the token it sampled
            run()
