"""Bounded loopback load: many concurrent streaming clients, a share hanging up mid-stream.
Every request is answered (or refused with 429), no slot leaks, memory stays flat."""

from __future__ import annotations

import collections
import itertools
import threading
import time

import httpx
import pytest

from tests.microtransformer.serve.conftest import start_server

RSS_GROWTH_LIMIT_MB = 40.0


def rss_mb() -> float:
    """Resident memory of this process (server and clients both live here)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_load(url: str, total: int, clients: int, *, cancel_every: int = 5,
             time_limit_s: float = 120.0) -> collections.Counter:
    """`total` streaming requests from `clients` threads; every `cancel_every`-th one hangs up
    after its first chunk. Returns the outcomes: ok / cancelled / 429 / anything else."""
    counter = itertools.count()
    outcomes: collections.Counter = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit_s

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < deadline:
                i = next(counter)
                if i >= total:
                    return
                body = {"prompt": "the cat" if i % 2 else "a dog", "max_tokens": 4 + i % 16,
                        "stream": True, "ignore_eos": True, "seed": i, "logprobs": i % 3}
                try:
                    with http.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            outcome = str(r.status_code)
                        elif i % cancel_every == 0:
                            next(r.iter_lines())
                            outcome = "cancelled"
                        else:
                            lines = [x for x in r.iter_lines() if x]
                            outcome = "ok" if lines[-1] == "data: [DONE]" else "truncated"
                except httpx.HTTPError as exc:
                    outcome = f"error {type(exc).__name__}"
                with lock:
                    outcomes[outcome] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=time_limit_s + 30)
    return outcomes


def _load_and_check(tiny_run, total: int, clients: int, time_limit_s: float) -> None:
    live = start_server([tiny_run], max_batch=8, max_queue=16)
    try:
        run_load(live.url, 48, clients, time_limit_s=time_limit_s)  # warm-up: allocators, pools
        assert live.wait_idle()
        before = rss_mb()
        outcomes = run_load(live.url, total, clients, time_limit_s=time_limit_s)
        assert sum(outcomes.values()) == total, f"not all answered in time: {outcomes}"
        assert set(outcomes) <= {"ok", "cancelled", "429"}, outcomes
        assert outcomes["ok"] > 0 and outcomes["cancelled"] > 0
        assert live.wait_idle(), "requests still in flight after the load"
        engine = live.engine()
        assert engine.queue_depth == 0 and engine.running == 0  # no slot leaked
        growth = rss_mb() - before
        assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.1f} MB under load"
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        live.stop()


def test_bounded_load_with_cancellations(tiny_run):
    _load_and_check(tiny_run, total=200, clients=32, time_limit_s=120)


@pytest.mark.slow
def test_long_load_with_cancellations(tiny_run):
    _load_and_check(tiny_run, total=2000, clients=32, time_limit_s=900)
