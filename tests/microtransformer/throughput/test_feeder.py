"""BatchFeeder: the same batches in the same order as the loader, and exact resume although
the producer thread runs ahead."""

from __future__ import annotations

import time

import pytest
import torch

from microtransformer.data import BatchLoader
from microtransformer.throughput.feeder import BatchFeeder


def loader(data_dir, seed=3, batch=4, seq=16):
    return BatchLoader(data_dir, "train", batch, seq, seed=seed)


def reference(data_dir, n):
    plain = loader(data_dir)
    return [plain.next_batch()["input_ids"] for _ in range(n)]


def wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_same_batches_in_the_same_order(char_data):
    expected = reference(char_data, 12)
    with BatchFeeder(loader(char_data), "cpu", depth=3) as feeder:
        got = [feeder.next_batch() for _ in range(12)]
    for want, batch in zip(expected, got, strict=True):
        assert torch.equal(batch["input_ids"], want)
        assert batch["labels"] is batch["input_ids"]  # shared, as the loader returns them
        assert batch["attention_mask"].shape == want.shape


def test_state_is_that_of_the_consumed_batches_not_the_prefetched(char_data):
    inner = loader(char_data)
    with BatchFeeder(inner, "cpu", depth=4) as feeder:
        for _ in range(5):
            feeder.next_batch()
        assert wait_until(lambda: inner.batches_drawn > 5)  # the producer ran ahead
        state = feeder.state_dict()
    plain = loader(char_data)
    for _ in range(5):
        plain.next_batch()
    want = plain.state_dict()
    assert state["batches_drawn"] == 5
    assert torch.equal(state["generator"], want["generator"])


def state_after(data_dir, n):
    """The feeder's state after handing out n batches."""
    with BatchFeeder(loader(data_dir), "cpu") as feeder:
        for _ in range(n):
            feeder.next_batch()
        return feeder.state_dict()


def test_resume_in_a_new_feeder_continues_exactly(char_data):
    expected = reference(char_data, 10)
    saved = state_after(char_data, 4)
    # a fresh process: new loader (other seed would not matter: the state carries it)
    with BatchFeeder(loader(char_data), "cpu") as second:
        second.load_state_dict(saved)
        rest = [second.next_batch()["input_ids"] for _ in range(6)]
    for want, got in zip(expected[4:], rest, strict=True):
        assert torch.equal(got, want)


def test_feeder_state_loads_into_a_plain_loader(char_data):
    expected = reference(char_data, 6)
    plain = loader(char_data)
    plain.load_state_dict(state_after(char_data, 3))
    assert torch.equal(plain.next_batch()["input_ids"], expected[3])


def test_rewind_the_same_feeder(char_data):
    expected = reference(char_data, 8)
    with BatchFeeder(loader(char_data), "cpu") as feeder:
        start = feeder.state_dict()
        for _ in range(5):
            feeder.next_batch()
        feeder.load_state_dict(start)
        assert torch.equal(feeder.next_batch()["input_ids"], expected[0])
        assert feeder.batches_consumed == 6


def test_transform_runs_on_each_batch(char_data):
    expected = reference(char_data, 3)

    def first_two_rows(batch):
        return {k: v[:2] for k, v in batch.items()}

    with BatchFeeder(loader(char_data), "cpu", transform=first_two_rows) as feeder:
        for want in expected:
            assert torch.equal(feeder.next_batch()["input_ids"], want[:2])


class FailingLoader:
    """Two good batches, then an error."""

    def __init__(self):
        self.n = 0

    def next_batch(self):
        self.n += 1
        if self.n > 2:
            raise OSError("disk gone")
        ids = torch.full((1, 3), self.n)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_producer_errors_reach_the_consumer_after_the_good_batches():
    with BatchFeeder(FailingLoader(), "cpu", depth=1) as feeder:
        assert int(feeder.next_batch()["input_ids"][0, 0]) == 1
        assert int(feeder.next_batch()["input_ids"][0, 0]) == 2
        with pytest.raises(OSError, match="disk gone"):
            feeder.next_batch()
        assert feeder.state_dict() == {"n": 2}


def test_close_is_idempotent_and_final(char_data):
    feeder = BatchFeeder(loader(char_data), "cpu")
    feeder.next_batch()
    feeder.close()
    feeder.close()
    with pytest.raises(RuntimeError, match="closed"):
        feeder.next_batch()


def test_bad_depth():
    with pytest.raises(ValueError, match="depth=0"):
        BatchFeeder(FailingLoader(), "cpu", depth=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_and_survive_busy_compute_stream(char_data):
    """Side-stream copies with a long kernel queue on the compute stream: every batch equals
    the loader's, and reading it on the compute stream sees the copied values."""
    expected = reference(char_data, 20)
    a = torch.randn(2048, 2048, device="cuda")
    with BatchFeeder(loader(char_data), "cuda", depth=2) as feeder:
        for want in expected:
            for _ in range(5):
                a = (a @ a).tanh_()  # keep the compute stream busy
            batch = feeder.next_batch()
            assert batch["input_ids"].is_cuda
            assert torch.equal(batch["input_ids"].cpu(), want)
        torch.cuda.synchronize()
