"""The scheduler: which choices run, in which rows, and over which bucket of the cache.

Pure bookkeeping (no torch, no threads, no model), so it is tested on its own
(`tests/microtransformer/serve/test_scheduler.py`). The engine calls it under its lock.

- Admission: choices wait in a bounded FIFO queue (`submit` takes all of a request's choices
  or none: QueueFullError); `admit` moves waiting ones into free slots, cancelled ones are
  dropped.
- Packing: busy slots are rows 0..running-1. `free` releases a row and moves the last busy
  choice into it, and returns that move (the engine copies the row's KV cache and sampler
  state along).
- Buckets: a step runs over the smallest bucket of rows that holds the busy ones (1, 2, 4, ...
  up to max_batch) and the smallest bucket of columns that holds every busy row's column
  (64, 128, ... up to the context), so few requests cost a small batch's step and short
  sequences do not attend over the whole context.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from microtransformer.serve.choice import Choice

MIN_COLUMNS = 64  # the smallest column bucket of a step


class QueueFullError(RuntimeError):
    """The waiting queue cannot take the request's choices."""


def buckets(limit: int) -> list[int]:
    """Bucket sizes: the powers of two below `limit`, then `limit` (ascending)."""
    sizes = [1 << i for i in range(limit.bit_length()) if 1 << i < limit]
    return [*sizes, limit]


@dataclass(frozen=True)
class Batch:
    """One decode step: the busy choices (rows 0..len-1) and the (rows, columns) bucket."""

    choices: list[Choice]
    rows: int
    columns: int


class Scheduler:
    """Slots for up to `max_batch` running choices and a queue of up to `max_queue` waiting
    ones, over a cache of `context` columns."""

    def __init__(self, max_batch: int, max_queue: int, context: int) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} "
                             ">= 0")
        self.max_batch, self.max_queue, self.context = max_batch, max_queue, context
        self.row_buckets = buckets(max_batch)
        self.col_buckets = [c for c in buckets(context) if c >= min(MIN_COLUMNS, context)]
        self.waiting: collections.deque[Choice] = collections.deque()
        self.slots: list[Choice | None] = [None] * max_batch
        self.running = 0

    @property
    def queue_depth(self) -> int:
        """Choices waiting for a slot."""
        return len(self.waiting)

    def submit(self, choices: list[Choice]) -> None:
        """Queue all of `choices` (one request's) or none: QueueFullError if no room."""
        if len(self.waiting) + len(choices) > self.max_queue:
            raise QueueFullError(f"the queue holds {len(self.waiting)} of at most "
                                 f"{self.max_queue} waiting sequences")
        self.waiting.extend(choices)

    def cancel(self, choices: Iterable[Choice]) -> None:
        """Mark choices cancelled; waiting ones leave the queue now, running ones are freed by
        the engine at its next step."""
        for choice in choices:
            choice.cancel()
            if not choice.done:
                with contextlib.suppress(ValueError):
                    self.waiting.remove(choice)

    def admit(self) -> list[Choice]:
        """Move waiting choices (in order, cancelled ones dropped) into the free slots after
        the busy ones; each gets its `row`."""
        admitted = []
        while self.running < self.max_batch and self.waiting:
            choice = self.waiting.popleft()
            if choice.cancelled:
                continue
            choice.row = self.running
            self.slots[choice.row] = choice
            self.running += 1
            admitted.append(choice)
        return admitted

    def busy(self) -> list[Choice]:
        """The running choices, by row."""
        return self.slots[:self.running]  # type: ignore[return-value]

    def free(self, choice: Choice) -> tuple[int, int] | None:
        """Release the slot of `choice` (marked done); the last busy choice moves into it so
        rows stay packed. Returns that move as (from row, to row), or None when nothing moved
        (or the choice held no slot)."""
        row, last = choice.row, self.running - 1
        if row < 0:  # not in a slot (already freed)
            return None
        choice.done, choice.row = True, -1
        move = None
        if row != last:
            moved = self.slots[last]
            moved.row = row
            self.slots[row] = moved
            move = (last, row)
        self.slots[last] = None
        self.running -= 1
        return move

    def batch(self) -> Batch:
        """The busy choices and the smallest (rows, columns) bucket that holds them: every
        busy row's column (where its next token goes) must be inside the column bucket."""
        busy = self.busy()
        if not busy:
            raise ValueError("no choice is running")
        rows = next(b for b in self.row_buckets if b >= len(busy))
        width = max(c.col for c in busy) + 1
        columns = next(c for c in self.col_buckets if c >= width)
        return Batch(busy, rows, columns)
