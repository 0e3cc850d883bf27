"""`microtransformer serve` as a process: SIGTERM drains the requests in flight (the socket stays
open: /health and new requests get 503), then the process exits 0; --drain-grace keeps answering
503 after the signal even with nothing in flight; bad options are one line and exit 2."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from microtransformer.cli import main
from tests.conftest import REPO_ROOT
from tests.microtransformer.serve.conftest import write_run


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "microtransformer", "serve", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=_env(), cwd=REPO_ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        match = re.search(r"serving on (http://\S+)", line)
        if match:
            return proc, match.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stderr.read()}")


def _in_flight(url: str) -> int:
    """The server's count of API requests in flight (from /metrics)."""
    text = httpx.get(url + "/metrics").text
    return int(float(re.search(r"^microtransformer_requests_in_flight (\S+)$", text,
                               re.MULTILINE).group(1)))


def test_sigterm_drains_then_exits_zero(tmp_path):
    """A request is in flight when SIGTERM comes (held there by the test, not by timing: its
    chunked body is sent in two parts, the second only after the checks): meanwhile every new
    connection is answered, /health and new requests with 503; then the request generates and
    streams all its choices, and the process exits 0."""
    run = write_run(tmp_path / "long", max_seq_len=128)
    proc, url = _start([str(run), "--port", "0", "--max-batch", "1"])
    try:
        lines: list[str] = []
        release = threading.Event()

        def body():  # a chunked body whose end waits for the test
            yield b'{"prompt": "the", "max_tokens": 40, "n": 6, "stream": true, '
            assert release.wait(60)
            yield b'"ignore_eos": true}'

        def stream() -> None:
            with httpx.stream("POST", url + "/v1/completions", content=body(), timeout=120,
                              headers={"content-type": "application/json"}) as r:
                assert r.status_code == 200
                lines.extend(line for line in r.iter_lines() if line)

        reader = threading.Thread(target=stream)
        reader.start()
        deadline = time.monotonic() + 30
        while _in_flight(url) != 1:
            assert time.monotonic() < deadline, "the request never reached the server"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        while (health := httpx.get(url + "/health")).status_code != 503:
            assert time.monotonic() < deadline, "never started draining"
            time.sleep(0.01)
        for _ in range(10):  # each a new connection: answered, not refused
            _check_draining(health)
            health = httpx.get(url + "/health")
        refused = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert proc.poll() is None and not lines  # the request is still in flight
        release.set()
        reader.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        chunks = [json.loads(x[len("data: "):]) for x in lines[:-1]]
        assert lines[-1] == "data: [DONE]"
        finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
        assert sorted(finished) == list(range(6))  # every choice of the request completed
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _check_draining(r: httpx.Response) -> None:
    """/health while draining: 503 with the OpenAI error shape and status "draining"."""
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "draining" and body["error"]["type"] == "service_unavailable"


def test_drain_grace_answers_503_until_the_second_signal(tmp_path):
    """With --drain-grace and nothing in flight the port stays open after SIGTERM: every new
    connection is answered 503 (none refused) until the grace ends; a second signal stops at
    once, still with exit 0."""
    run = write_run(tmp_path / "idle")
    proc, url = _start([str(run), "--port", "0", "--drain-grace", "600"])
    try:
        assert httpx.get(url + "/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (health := httpx.get(url + "/health")).status_code != 503:
            assert time.monotonic() < deadline, "never started draining"
            time.sleep(0.01)
        _check_draining(health)
        for _ in range(20):  # each a new connection, all answered
            _check_draining(httpx.get(url + "/health"))
        r = httpx.post(url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert proc.poll() is None  # nothing in flight, but the grace holds the drain open
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_bad_options_are_one_line(tmp_path, capsys):
    for args, needle in ((["nope-dir"], "does not exist"),
                         ([str(tmp_path), "--max-batch", "0"], "--max-batch=0"),
                         ([str(tmp_path), "--max-body-bytes", "0"], "--max-body-bytes=0"),
                         ([str(tmp_path), "--drain-grace", "-1"], "--drain-grace=-1.0"),
                         ([str(tmp_path), "--drain-grace", "nan"], "--drain-grace=nan"),
                         ([str(tmp_path), str(tmp_path), "--model-name", "a"], "--model-name")):
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
