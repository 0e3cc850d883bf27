"""The scheduler alone (no model, no torch, no thread): admission, packing, buckets."""

from __future__ import annotations

import pytest

from microtransformer.serve.choice import Choice, SamplingParams
from microtransformer.serve.scheduler import QueueFullError, Scheduler, buckets

PARAMS = SamplingParams(max_tokens=4)


def choices(n: int, start: int = 0) -> list[Choice]:
    return [Choice(start + i, [1, 2], PARAMS, lambda event: None, seed=i) for i in range(n)]


def test_buckets():
    assert buckets(1) == [1] and buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(12) == [1, 2, 4, 8, 12]


def test_column_buckets_start_at_64_or_the_context():
    assert Scheduler(4, 8, 512).col_buckets == [64, 128, 256, 512]
    assert Scheduler(4, 8, 100).col_buckets == [64, 100]
    assert Scheduler(4, 8, 32).col_buckets == [32]


def test_admission_in_order_into_free_slots():
    s = Scheduler(max_batch=3, max_queue=8, context=64)
    waiting = choices(5)
    s.submit(waiting)
    assert s.queue_depth == 5 and s.running == 0
    admitted = s.admit()
    assert admitted == waiting[:3] and [c.row for c in admitted] == [0, 1, 2]
    assert s.running == 3 and s.queue_depth == 2
    assert s.admit() == []  # no free slot


def test_submit_is_all_or_nothing():
    s = Scheduler(max_batch=1, max_queue=3, context=64)
    s.submit(choices(2))
    with pytest.raises(QueueFullError, match="holds 2 of at most 3"):
        s.submit(choices(2, start=2))
    assert s.queue_depth == 2  # nothing of the refused request was queued
    s.submit(choices(1, start=2))
    assert s.queue_depth == 3


def test_cancel_removes_waiting_and_admit_skips_cancelled():
    s = Scheduler(max_batch=2, max_queue=8, context=64)
    a, b, c, d = choices(4)
    s.submit([a, b, c, d])
    s.cancel([b])
    assert s.queue_depth == 3 and b.cancelled
    c.cancel()  # cancelled directly (the client went away): still queued, skipped at admission
    assert s.admit() == [a, d]
    assert s.queue_depth == 0


def test_free_keeps_rows_packed_and_reports_the_move():
    s = Scheduler(max_batch=4, max_queue=8, context=64)
    a, b, c, d = choices(4)
    s.submit([a, b, c, d])
    s.admit()
    assert s.free(b) == (3, 1)  # the last busy row moves into the freed one
    assert b.done and b.row == -1 and d.row == 1
    assert s.busy() == [a, d, c]
    assert s.free(c) is None  # the last row: nothing moves
    assert s.free(c) is None  # already freed
    assert s.busy() == [a, d] and s.running == 2
    e = choices(1, start=4)[0]
    s.submit([e])
    assert s.admit() == [e] and e.row == 2


def test_batch_picks_the_smallest_buckets():
    s = Scheduler(max_batch=8, max_queue=16, context=512)
    cs = choices(3)
    s.submit(cs)
    s.admit()
    for c, col in zip(cs, (5, 63, 10), strict=True):
        c.col = col
    batch = s.batch()
    assert (batch.rows, batch.columns, batch.choices) == (4, 64, cs)
    cs[0].col = 64  # column 64 needs a bucket of 65+ columns
    assert (s.batch().rows, s.batch().columns) == (4, 128)
    cs[0].col = 511
    assert s.batch().columns == 512
    for c in cs[1:]:
        s.free(c)
    assert s.batch().rows == 1
    s.free(cs[0])
    with pytest.raises(ValueError, match="no choice is running"):
        s.batch()
