"""Fixed-length sampling with a static KV cache, captured once as a CUDA graph.

`MicroTransformer.generate` is the general path (EOS, penalties, nucleus, sliding window).
On a GPU a 2-3M-parameter model decodes one token in a few microseconds of arithmetic but
launches dozens of kernels, so the launches are the cost. `StaticDecoder` removes them: every
buffer (KV cache, current token, positions, output) has a fixed shape and address, the
one-token step (embedding, all blocks, head, top-k sampling, cache and position updates) is a
pure function of those buffers, and on CUDA it is recorded once as a `torch.cuda.CUDAGraph`
and replayed per token with no host synchronisation until the end.

Attention always runs over the whole static cache with a boolean mask (column <= current
position, padding columns off), which keeps shapes static. Sampling uses the exponential-race
form of a categorical draw (argmax of logit/temperature - log(E), E ~ Exp(1)) among the top-k,
which has the same distribution as softmax + multinomial but needs no host round trip.

On CPU the step runs eagerly by default (useful for testing; `model.generate` is about as
fast there). With `compile=True` (opt-in, CPU) the same fixed-shape step is compiled once per
(top_k, greedy) by `torch.compile` (inductor's C++ backend, `cpp_wrapper` and weight
`freezing` on), which removes the Python/dispatcher cost of the ~55 small ops per token; the
first `generate` call pays the compile (seconds to tens of seconds). If compiling fails the
decoder falls back to the eager step and records why in `compile_error`.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F

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
        self._compile_options = COMPILE_OPTIONS | (
            AUTOTUNE_OPTIONS if compile == "max-autotune" else {})
        self.compile_error: str | None = None  # why compile fell back to eager, if it did
        self.compile_seconds = 0.0  # total one-off compile (warm-up) time so far
        self._compiled_step = (torch.compile(self._step, fullgraph=True, dynamic=False)
                               if compile else None)
        self._compiled_keys: set[tuple[int, bool]] = set()
        # inductor fuses explicit attention better than the CPU flash kernel for 1 query
        self._math_attention = compile and MATH_ATTENTION

    # ------------------------------------------------------------------ the step
    def _step(self, top_k: int, greedy: bool) -> None:
        """Feed `tok` at `col`, sample the next token into `tok` and `out[:, col + 1]`."""
        m = self.model
        B = self.batch_size
        x = F.embedding(self.tok, m.token_embedding.weight) * m.token_embedding.scale
        x = x + F.embedding(self.position, m.position_embedding.weight)  # (B, C)
        # key s is visible if s <= col and real; a query always sees itself (no empty rows)
        visible = (self.columns <= self.col) & (self.key_real | (self.columns == self.col))
        mask = visible[:, None, None, :]  # (B, 1, 1, S)
        for block, (k_buf, v_buf) in zip(m.blocks, self.cache.layers, strict=True):
            attn = block.attn
            nh, hs = attn.num_heads, attn.head_dim
            h = F.layer_norm(x, block.ln1.normalized_shape, block.ln1.weight, block.ln1.bias,
                             block.ln1.eps)
            qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(B, 3, nh, 1, hs)
            k_buf.index_copy_(2, self.col, qkv[:, 1])  # (B, nh, S, hs) <- (B, nh, 1, hs)
            v_buf.index_copy_(2, self.col, qkv[:, 2])
            if self._math_attention:  # one query row: two small GEMMs + a fused softmax
                scores = torch.matmul(qkv[:, 0], k_buf.transpose(-1, -2)) * hs ** -0.5
                y = torch.matmul(scores.masked_fill(~mask, float("-inf")).softmax(-1), v_buf)
            else:
                y = F.scaled_dot_product_attention(qkv[:, 0], k_buf, v_buf, attn_mask=mask)
            x = x + F.linear(y.reshape(B, -1), attn.proj.weight, attn.proj.bias)  # (B, C)
            h = F.layer_norm(x, block.ln2.normalized_shape, block.ln2.weight, block.ln2.bias,
                             block.ln2.eps)
            h = F.gelu(F.linear(h, block.ff.fc.weight, block.ff.fc.bias))
            x = x + F.linear(h, block.ff.proj.weight, block.ff.proj.bias)
        x = F.layer_norm(x, m.ln_f.normalized_shape, m.ln_f.weight, m.ln_f.bias, m.ln_f.eps)
        logits = F.linear(x, m.lm_head.weight).float()  # (B, V)
        nxt = logits.argmax(-1) if greedy else race_sample(logits, self.inv_temperature, top_k)
        self.out.index_copy_(1, self.col + 1, nxt[:, None])
        self.tok.copy_(nxt)
        self.position.add_(1)
        self.col.add_(1)

    def _compiled_runner(self, top_k: int, greedy: bool):
        """The compiled step for this key, compiling it now (one warm-up step) if needed."""
        key = (top_k, greedy)
        step = self._compiled_step
        if key not in self._compiled_keys:
            import time

            import torch._inductor.config as inductor_config

            start = time.perf_counter()
            try:
                # C++ wrapper: no Python per kernel; freezing: weights become constants
                # (pre-packed for the CPU GEMMs). Only read while compiling.
                with inductor_config.patch(**self._compile_options):
                    self.col.zero_()
                    step(top_k, greedy)
            except Exception as exc:  # any compile failure: eager fallback
                self.compile_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"StaticDecoder: torch.compile failed, using the eager step "
                              f"({self.compile_error})", RuntimeWarning, stacklevel=3)
                self._compiled_step = None
                return lambda: self._step(top_k, greedy)
            finally:
                self.compile_seconds += time.perf_counter() - start
            self._compiled_keys.add(key)
        return lambda: step(top_k, greedy)

    def _runner(self, top_k: int, greedy: bool):
        """A zero-argument callable running one step: a graph replay, or the eager step."""
        if self._compiled_step is not None:
            return self._compiled_runner(top_k, greedy)
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


class DecodeStep:
    """A fixed-shape KV cache of `batch_size` rows x `max_len` columns and the one-token step
    over it, for decoders whose rows are at different lengths (continuous batching slots).

    Every row has its own column: `prefill(row, ids)` fills row `row` with a prompt, then each
    call `step(tokens, positions, cols, key_mask)` feeds one token per row at column cols[b]
    and returns float32 logits (B, V). Rows that are not in use can be fed anything; their
    logits are ignored. The step is `MicroTransformer.decode_step` in its static mode (per-row
    columns, attention over the whole buffer with `key_mask`), so shapes never change.
    """

    def __init__(self, model: MicroTransformer, batch_size: int, max_len: int, *,
                 dtype: torch.dtype | None = None) -> None:
        if not 1 <= max_len <= model.max_seq_len:
            raise ValueError(f"max_len={max_len} must be in [1, max_seq_len={model.max_seq_len}]")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        ref = next(model.parameters())
        self.device = ref.device
        self.dtype = dtype or ref.dtype
        self.model = model if self.dtype == ref.dtype else copy.deepcopy(model).to(self.dtype)
        self.model.eval()
        cfg = self.model.config
        self.batch_size, self.max_len = batch_size, max_len
        self.cache = KVCache(cfg.num_layers, batch_size, cfg.num_heads, max_len, cfg.head_dim,
                             dtype=self.dtype, device=self.device)
        self.columns = torch.arange(max_len, device=self.device)  # (S,)

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

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cols: torch.Tensor,
             key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed tokens (B,) at positions (B,) into columns cols (B,); logits (B, V) fp32."""
        mask = self.key_mask(cols) if key_mask is None else key_mask
        return self.model.decode_step(tokens, positions, self.cache, cols, mask).float()
