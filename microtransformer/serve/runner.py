"""The step that runs the model: one KV cache of `max_batch` rows x the context, prefill of a
prompt into a row, and one batched decode step over a (rows, columns) bucket of it.

One `decoding.step.DecodeStep` per bucket, each over a view of the first rows and columns of
the one shared cache (the largest bucket owns it), so a step over few short rows runs a small
fixed-shape step. Each row is at its own column (position == column: prompts are not padded).
"""

from __future__ import annotations

import torch

from microtransformer.decoding.step import DecodeStep


class ModelRunner:
    """Runs `model` over a cache of `max_batch` rows for the given row and column buckets
    (both ascending, ending with max_batch and the model's context)."""

    def __init__(self, model: torch.nn.Module, max_batch: int, row_buckets: list[int],
                 col_buckets: list[int], *, dtype: torch.dtype | None = None) -> None:
        context = model.max_seq_len
        self.decoder = DecodeStep(model, max_batch, context, dtype=dtype)
        self.model = self.decoder.model
        self.device = self.decoder.device
        self.steps: dict[tuple[int, int], DecodeStep] = {}
        for rows in row_buckets:
            for cols in col_buckets:
                if (rows, cols) == (max_batch, context):
                    self.steps[rows, cols] = self.decoder
                else:
                    self.steps[rows, cols] = DecodeStep(
                        self.model, rows, cols, cache=self.decoder.cache.view(rows, cols))

    def prefill(self, row: int, prompt_ids: list[int]) -> torch.Tensor:
        """Write the prompt into row `row` (columns 0..T-1); the last position's logits (V,)."""
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)  # (T,)
        return self.decoder.prefill(row, prompt)

    def step(self, rows: int, columns: int, tokens: list[int], cols: list[int]
             ) -> torch.Tensor:
        """Feed tokens[i] at column cols[i] of row i (len <= rows; the other rows of the
        bucket are idle and write column 0) -> fp32 logits (len(tokens), V)."""
        idle = rows - len(tokens)
        tokens_t = torch.tensor([*tokens, *[0] * idle], dtype=torch.long,
                                device=self.device)  # (rows,)
        cols_t = torch.tensor([*cols, *[0] * idle], dtype=torch.long, device=self.device)
        return self.steps[rows, columns].step(tokens_t, cols_t, cols_t)[:len(tokens)]

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` of the cache into row `dst` (the scheduler packed the rows)."""
        cache = self.decoder.cache
        cache.k[:, dst].copy_(cache.k[:, src])  # (L, nh, S, hs)
        cache.v[:, dst].copy_(cache.v[:, src])

    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits of every prompt position (T, V) fp32, one full forward (echo logprobs)."""
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        return self.model(prompt)[0].float()
