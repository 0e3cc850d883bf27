"""Training and evaluation batches: random windows of a prepared split.

Plain text: a window starts at any token. Instruction data (a split with a loss mask,
`data.tokens`): a window starts at the first token of a record and runs on through the records
after it (packed, each after the previous one's end-of-text token), so every learned token has
its whole prompt before it in the window; labels are -100 (ignored by the loss) except on the
learned tokens. A record whose learned tokens all lie beyond the window (a prompt longer than
the window) never starts a window; `BatchLoader.records` / `.trainable_records` count them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from microtransformer.data.tokens import LOSS, START, load_mask, load_tokens
from microtransformer.errors import UserError

IGNORE_INDEX = -100  # labels the loss ignores (model.transformer.lm_loss / chunked_lm_loss)


class BatchLoader:
    """Random training windows from a prepared split.

    Each `next_batch()` draws `batch_size` windows of `seq_len` tokens at uniformly random
    offsets and returns {'input_ids', 'attention_mask', 'labels'}: LongTensors (B, T) on `device`,
    with labels == input_ids (the loss shifts them) and an all-ones mask.

    The draws come from a private torch.Generator seeded from `seed`, so a run is reproducible.
    In a distributed run every rank draws the same GLOBAL batch (same seed) and keeps its own
    rows (`distributed.take_shard`), so the data order does not depend on the world size.
    `state_dict()` /
    `load_state_dict()` carry the generator state: a resumed run draws exactly the batches the
    uninterrupted run would have. For evaluation, build a fresh loader with a fixed seed each time
    (or use `iter_eval_batches`) so every evaluation sees the same windows.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int,
                 *, seed: int = 0, device: str | torch.device = "cpu") -> None:
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
        self.data = load_tokens(data_dir, split)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed = seed
        self.device = torch.device(device)
        if len(self.data) < seq_len + 1:
            raise UserError(
                f"the {split} split of {data_dir} has {len(self.data)} tokens: the corpus is "
                f"shorter than one context window (seq_len + 1 = {seq_len + 1}); use a shorter "
                "seq_len or a larger corpus"
            )
        self._gen = torch.Generator().manual_seed(derive_seed(seed, 0))
        self.batches_drawn = 0
        self._offsets = torch.arange(seq_len)
        self.mask = load_mask(data_dir, split)  # None: plain text, every token is learned
        self.records = self.trainable_records = 0
        if self.mask is not None:
            self.starts = window_starts(self.mask, seq_len)  # (N,) record starts
            self.records = int(np.count_nonzero(self.mask & START))
            self.trainable_records = len(self.starts)
            if not self.trainable_records:
                raise UserError(
                    f"no record of the {split} split of {data_dir} has a learned token within "
                    f"the first {seq_len} tokens (its prompt fills the window); use a longer "
                    "--train.seq_len or shorter prompts")

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of random windows (see the class docstring)."""
        if self.mask is not None:
            return self._next_masked_batch()
        starts = torch.randint(0, len(self.data) - self.seq_len, (self.batch_size,),
                               generator=self._gen)  # (B,)
        index = (starts[:, None] + self._offsets[None, :]).numpy()  # (B, T)
        ids = torch.from_numpy(self.data[index].astype(np.int64))  # (B, T)
        self.batches_drawn += 1
        ids = self._to_device(ids)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def _next_masked_batch(self) -> dict[str, torch.Tensor]:
        """Windows starting at records; labels -100 except on learned tokens. A window that
        runs past the end of the split repeats its last token there, with label -100 (causal
        attention: the positions before are unchanged by what follows them)."""
        pick = torch.randint(0, len(self.starts), (self.batch_size,), generator=self._gen)
        starts = torch.from_numpy(self.starts[pick.numpy()])  # (B,)
        positions = starts[:, None] + self._offsets[None, :]  # (B, T)
        index = positions.clamp(max=len(self.data) - 1).numpy()
        ids = torch.from_numpy(self.data[index].astype(np.int64))  # (B, T)
        learned = torch.from_numpy((self.mask[index] & LOSS).astype(bool))  # (B, T)
        learned &= positions < len(self.data)
        self.batches_drawn += 1
        labels = apply_loss_mask(ids, learned)
        return {"input_ids": self._to_device(ids), "attention_mask": torch.ones_like(ids),
                "labels": self._to_device(labels)}

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Generator state and position (tensor + ints, ok for torch.load(weights_only=True))."""
        return {"generator": self._gen.get_state(), "batches_drawn": self.batches_drawn,
                "seed": self.seed, "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`: the next batches are those the saved loader would draw."""
        if state.get("split", self.split) != self.split:
            raise UserError(f"loader state is for split {state['split']!r}, not {self.split!r}")
        self._gen.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


def apply_loss_mask(ids: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """Labels for `ids` (B, T): the id where `learned` (B, T) is True, else -100 (the loss's
    ignore_index: with the loss's shift, position t is then not asked to predict token t + 1)."""
    return torch.where(learned, ids, torch.full_like(ids, IGNORE_INDEX))


def window_starts(mask: np.ndarray, seq_len: int) -> np.ndarray:
    """The record starts (int64 offsets) whose window of `seq_len` tokens holds at least one
    learned token that the window predicts (positions start + 1 .. start + seq_len - 1)."""
    starts = np.flatnonzero(mask & START).astype(np.int64)
    learned = np.concatenate([[0], np.cumsum((mask & LOSS) != 0, dtype=np.int64)])
    ends = np.minimum(starts + seq_len, len(mask))  # exclusive
    return starts[learned[ends] - learned[np.minimum(starts + 1, ends)] > 0]


def derive_seed(seed: int, stream: int) -> int:
    """A 63-bit seed from (seed, stream): independent streams of one seed (the loader uses
    stream 0, the value checkpoints of earlier versions were drawn with)."""
    state = np.random.SeedSequence([int(seed), int(stream)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def iter_eval_batches(data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int,
                      num_batches: int, *, seed: int = 1234,
                      device: str | torch.device = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """The same `num_batches` windows every call (fixed seed), so eval losses are comparable."""
    loader = BatchLoader(data_dir, split, batch_size, seq_len, seed=seed, device=device)
    for _ in range(num_batches):
        yield loader.next_batch()
