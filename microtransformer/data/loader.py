"""Training and evaluation batches: random windows of a prepared split."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from microtransformer.data.tokens import load_tokens
from microtransformer.errors import UserError


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

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of random windows (see the class docstring)."""
        starts = torch.randint(0, len(self.data) - self.seq_len, (self.batch_size,),
                               generator=self._gen)  # (B,)
        index = (starts[:, None] + self._offsets[None, :]).numpy()  # (B, T)
        ids = torch.from_numpy(self.data[index].astype(np.int64))  # (B, T)
        self.batches_drawn += 1
        if self.device.type == "cuda":
            ids = ids.pin_memory().to(self.device, non_blocking=True)
        else:
            ids = ids.to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

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
