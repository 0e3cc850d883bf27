"""`BatchFeeder`: batches drawn ahead in a background thread, copied to the GPU on a side stream.

The training step asks for a batch and gets one already on the device: a producer thread calls
the wrapped loader's `next_batch()` (window sampling, int64 conversion, optional per-rank
sharding), pins the tensors, and queues them; the consumer (the training loop) copies the next
batch host -> device with `non_blocking=True` on a side CUDA stream while the current step's
kernels run, and makes the compute stream wait for that copy (`wait_event`) before handing the
batch out. The device tensors were allocated on the side stream, so each is marked with
`record_stream(compute stream)`: the caching allocator then does not reuse its memory before the
compute stream is done with it.

Resume is exact: the producer snapshots the loader's `state_dict()` right after each draw and
queues it with the batch; `state_dict()` returns the snapshot of the last batch handed out (not
of the batches still queued), so a checkpoint resumes with the first batch the step has not
seen. `load_state_dict()` drops everything prefetched and restarts the producer there.

On a CPU device the same thread prefetches (no pinning, no streams), so the logic is testable
without a GPU.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch

Batch = dict[str, torch.Tensor]


class Loader(Protocol):
    """What the feeder needs from `microtransformer.data.BatchLoader`."""

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


_STOP_POLL_S = 0.1


def _map_shared(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """Apply fn to each distinct tensor once (labels is input_ids stays one tensor)."""
    done: dict[int, torch.Tensor] = {}
    out: Batch = {}
    for key, value in batch.items():
        if id(value) not in done:
            done[id(value)] = fn(value)
        out[key] = done[id(value)]
    return out


class BatchFeeder:
    """Prefetching wrapper around a loader with `next_batch()` and `state_dict()`.

    Args:
        loader: draws host (CPU) batches; only the producer thread touches it while running.
        device: where batches are delivered.
        depth: host batches queued ahead (>= 1).
        transform: applied to each host batch in the producer thread (e.g. keep this rank's
            rows); must return CPU tensors.
        pin: pin host batches (default: True when `device` is CUDA).

    The producer is a daemon thread holding a reference to the feeder: call `close()` (or use
    `with BatchFeeder(...) as feeder:`) when done.
    """

    def __init__(self, loader: Loader, device: torch.device | str, *, depth: int = 2,
                 transform: Callable[[Batch], Batch] | None = None,
                 pin: bool | None = None) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self.loader = loader
        self.device = torch.device(device)
        self.depth = depth
        self.transform = transform
        self.cuda = self.device.type == "cuda"
        self.pin = self.cuda if pin is None else pin
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.batches_consumed = 0
        self._consumed_state = copy.deepcopy(loader.state_dict())
        self._staged: tuple[Batch, dict[str, Any], Any] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._start()

    # ------------------------------------------------------------------ producer
    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="batch-feeder", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[str, Any, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_STOP_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.loader.next_batch()
                state = copy.deepcopy(self.loader.state_dict())  # after this draw
                if self.transform is not None:
                    batch = self.transform(batch)
                if self.pin:
                    batch = _map_shared(batch, lambda t: t.pin_memory())
                if not self._put(("batch", batch, state)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(("error", exc, None))

    def _stop_producer(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
        self._thread = None

    # ------------------------------------------------------------------ consumer
    def _take(self, block: bool) -> tuple[Batch, dict[str, Any]] | None:
        if self._error is not None:  # the producer failed after the batches handed out
            raise self._error
        while True:
            try:
                kind, payload, state = self._queue.get(timeout=_STOP_POLL_S if block else 0)
                break
            except queue.Empty:
                if not block:
                    return None
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the batch feeder's producer thread stopped") from None
        if kind == "error":
            if not block:  # keep it for the call that needs the batch
                self._error = payload
                return None
            raise payload
        return payload, state

    def _stage(self, host: Batch, state: dict[str, Any]) -> tuple[Batch, dict[str, Any], Any]:
        """Start the host -> device copy (side stream on CUDA)."""
        if not self.cuda:
            return _map_shared(host, lambda t: t.to(self.device)), state, None
        assert self._stream is not None
        # No wait on the compute stream: the destinations are fresh allocations from the side
        # stream's pool, and memory of earlier batches is only reused once the compute stream
        # is past them (record_stream in next_batch), so the copy may overlap the current step.
        with torch.cuda.stream(self._stream):
            dev = _map_shared(host, lambda t: t.to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self._stream)
        return dev, state, done

    def next_batch(self) -> Batch:
        """The next batch on `device`, in the wrapped loader's order."""
        if self._thread is None:
            raise RuntimeError("the batch feeder is closed")
        if self._staged is None:
            self._staged = self._stage(*self._take(block=True))
        batch, state, done = self._staged
        self._staged = None
        ahead = self._take(block=False)  # copy the next one while this step computes
        if ahead is not None:
            self._staged = self._stage(*ahead)
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for t in {id(v): v for v in batch.values()}.values():
                t.record_stream(compute)
        self._consumed_state = state
        self.batches_consumed += 1
        return batch

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The loader state after the last batch handed out (prefetched ones excluded)."""
        return copy.deepcopy(self._consumed_state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Drop prefetched batches and continue from `state` (a loader or feeder state)."""
        self._stop_producer()
        self._staged, self._error = None, None
        self.loader.load_state_dict(state)
        self._consumed_state = copy.deepcopy(state)
        self._start()

    def close(self) -> None:
        """Stop the producer thread (idempotent)."""
        self._stop_producer()
        self._staged = None

    def __enter__(self) -> BatchFeeder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
