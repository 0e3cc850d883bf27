"""Compiling the engine's bucket steps in a background thread, so serving never waits for one.

The engine runs each (rows, columns) bucket's eager step at once; once a bucket has served
`after` decode steps it is queued here, and one background thread builds the bucket's compiled
step (`build(bucket)`, seconds each: torch.compile + inductor's C++ build) and hands it to
`publish(bucket, step)`, which swaps it in (the engine thread picks it up at its next step of
that bucket). Buckets compile one at a time, in the order they reached `after` steps. A build
that raises is logged and the bucket stays eager. Nothing here knows torch: the build and the
swap are the runner's (`runner.ModelRunner`), so the queue is tested with a fake build.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

Bucket = Hashable


class BucketCompiler:
    """A background thread that builds compiled steps for buckets, one at a time.

    Args:
        build: bucket -> its compiled step (runs in the compiler thread; may take seconds).
        publish: (bucket, step) -> None, called in the compiler thread when a step is built.
        log: where progress lines go (bucket compiled in N s, or why it failed); None: nowhere.
        after: a bucket is queued once `count(bucket)` has been called this many times (its
            decode steps; 1: on first use).
    """

    def __init__(self, build: Callable[[Bucket], Any], publish: Callable[[Bucket, Any], None],
                 *, log: Callable[[str], None] | None = None, after: int = 1) -> None:
        if after < 1:
            raise ValueError(f"after={after} must be >= 1")
        self.build, self.publish, self.log, self.after = build, publish, log, after
        self.uses: dict[Bucket, int] = {}
        self.seconds: dict[Bucket, float] = {}  # compiled buckets -> their compile time
        self.failed: dict[Bucket, str] = {}
        self._queue: queue.Queue[Bucket | None] = queue.Queue()
        self._pending = 0  # queued or compiling
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    def count(self, bucket: Bucket) -> None:
        """One decode step ran over `bucket` (eagerly); queue it at its `after`-th step."""
        uses = self.uses.get(bucket, 0) + 1
        self.uses[bucket] = uses
        if uses == self.after:
            self.request(bucket)

    def request(self, bucket: Bucket) -> None:
        """Queue `bucket` for compiling now (once; ignored after `close`)."""
        with self._lock:
            if self._closed:
                return
            self.uses[bucket] = max(self.uses.get(bucket, 0), self.after)
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="serve-compiler",
                                                daemon=True)
                self._thread.start()
        self._queue.put(bucket)

    @property
    def pending(self) -> int:
        """Buckets queued or compiling."""
        with self._lock:
            return self._pending

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or compiling; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = 120.0) -> None:
        """Drop the queued buckets and wait (up to `timeout` s) for a compile in progress to
        end, so no compile runs while the process exits."""
        with self._lock:
            self._closed = True
            thread = self._thread
        while True:  # the queued buckets will not be built
            try:
                if self._queue.get_nowait() is not None:
                    self._done()
            except queue.Empty:
                break
        self._queue.put(None)
        if thread is not None:
            thread.join(timeout)

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _run(self) -> None:
        while True:
            bucket = self._queue.get()
            if bucket is None:
                return
            try:
                if self._closed:
                    continue
                start = time.perf_counter()
                try:
                    step = self.build(bucket)
                except Exception as exc:  # the bucket stays eager
                    self.failed[bucket] = f"{type(exc).__name__}: {exc}"
                    if self.log is not None:
                        self.log(f"compiling bucket {bucket} failed, it stays eager "
                                 f"({self.failed[bucket]})")
                    continue
                seconds = time.perf_counter() - start
                self.seconds[bucket] = seconds
                self.publish(bucket, step)
                if self.log is not None:
                    self.log(f"compiled bucket {bucket} in {seconds:.1f} s "
                             f"({len(self.seconds)} compiled, {self.pending - 1} queued; "
                             f"{sum(self.seconds.values()):.1f} s in all)")
            finally:
                self._done()
