"""The engine in its own process (`serve.process`, what `microtransformer serve` runs by
default): the API tests of test_api.py again against a process engine (same tokens for the same
seeds as `model.generate`, streams, logprobs, echo, chat, cancellation, metrics), then what only
a process has: the queue's 429 decided by the child, a clean stop (no child left), a dead
engine answered with 503 (not a hang), and the command's engine never outliving it."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.microtransformer.serve.conftest import start_server
from tests.microtransformer.serve.test_api import (  # noqa: F401 - run here on a process engine
    reference,
    test_batch_composition_moves_logprobs_by_rounding,
    test_chat,
    test_completion_and_stream_agree,
    test_disconnect_frees_the_slot,
    test_echo_prepends_prompt_with_logprobs,
    test_health_and_metrics,
    test_logprobs_are_the_models,
    test_n_choices_use_seed_plus_index,
    test_seeded_requests_in_flight_match_generate,
    test_stop_string_truncates_stream_and_full,
    test_token_id_and_batched_prompts,
)
from tests.microtransformer.serve.test_drain import _env


@pytest.fixture(scope="module")
def server(tiny_run):
    """The imported API tests' server, with its engine in a child process."""
    live = start_server([tiny_run], max_batch=4, process=True)
    yield live
    live.stop()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


def test_engine_runs_in_a_child_process(server):
    engine = server.engine()
    assert engine.process.is_alive() and engine.process.pid != os.getpid()
    assert engine.process in multiprocessing.active_children()


def test_queue_full_is_429_decided_by_the_child(tiny_run):
    live = start_server([tiny_run], max_batch=1, max_queue=2, process=True)
    engine = live.engine()
    url = live.url + "/v1/completions"
    try:
        with engine.admission_paused():
            waiting = threading.Thread(target=httpx.post, args=(url,), kwargs=dict(
                json={"prompt": "a", "n": 2, "max_tokens": 3}, timeout=30))
            waiting.start()
            deadline = time.monotonic() + 30
            while engine.queue_depth < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = httpx.post(url, json={"prompt": "a", "max_tokens": 3})
            assert _error(r, 429)["type"] == "rate_limit_error"
            assert r.headers["retry-after"] == "1"
        waiting.join(timeout=30)
        assert live.wait_idle()
        assert httpx.post(url, json={"prompt": "a", "max_tokens": 3}).status_code == 200
    finally:
        live.stop()


def test_stop_leaves_no_child_process(tiny_run):
    live = start_server([tiny_run], process=True)
    process = live.engine().process
    assert httpx.post(live.url + "/v1/completions",
                      json={"prompt": "a", "max_tokens": 3}).status_code == 200
    live.stop()
    assert not process.is_alive() and process.exitcode == 0
    assert process not in multiprocessing.active_children()


def test_dead_engine_is_503_not_a_hang(tiny_run):
    """The child is killed while a streamed and a non-streamed request wait for a slot: both end
    (the stream with an error event, the other with a 503), and so do new requests and
    /health, each with a message that says what happened."""
    live = start_server([tiny_run], max_batch=1, process=True)
    engine = live.engine()
    url = live.url + "/v1/completions"
    answers: dict[str, object] = {}

    def streamed() -> None:
        with httpx.stream("POST", url, json={"prompt": "a", "max_tokens": 5, "stream": True},
                          timeout=30) as r:
            answers["stream"] = [x for x in r.iter_lines() if x.startswith("data: ")]

    def whole() -> None:
        answers["whole"] = httpx.post(url, json={"prompt": "a", "max_tokens": 5}, timeout=30)

    try:
        with engine.admission_paused():
            threads = [threading.Thread(target=f) for f in (streamed, whole)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while engine.queue_depth < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(engine.process.pid, signal.SIGKILL)
            for t in threads:
                t.join(timeout=30)
                assert not t.is_alive()
        lines = answers["stream"]
        assert lines[-1] == "data: [DONE]"
        assert "engine process" in json.loads(lines[-2][len("data: "):])["error"]["message"]
        assert "engine process" in _error(answers["whole"], 503)["message"]
        r = httpx.post(url, json={"prompt": "a", "max_tokens": 3})
        error = _error(r, 503)
        assert error["type"] == "service_unavailable" and "exited" in error["message"]
        assert httpx.get(live.url + "/health").status_code == 503
    finally:
        live.stop()


def _alive(pid: int) -> bool:
    psutil = pytest.importorskip("psutil")
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start_command(args: list[str]) -> tuple[subprocess.Popen, str, int]:
    """`microtransformer serve ARGS` -> (process, URL, the engine's pid from the banner:
    `engine in a process (pid N)`)."""
    proc = subprocess.Popen([sys.executable, "-m", "microtransformer", "serve", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=_env(), cwd=REPO_ROOT)
    pid, lines = None, []
    while True:
        line = proc.stderr.readline()
        lines.append(line)
        if not line and proc.poll() is not None:
            raise AssertionError("server did not start: " + "".join(lines))
        match = re.search(r"engine in a process \(pid (\d+)\)", line)
        if match:
            pid = int(match.group(1))
        match = re.search(r"serving on (http://\S+)", line)
        if match:
            assert pid is not None, lines
            return proc, match.group(1), pid


def _gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_command_leaves_no_engine_process(tiny_run, how):
    """SIGTERM: the server drains, stops its engine and exits 0; SIGKILL of the server: its
    engine sees the pipe close and exits by itself. Either way no engine process is left."""
    proc, url, pid = _start_command([str(tiny_run), "--port", "0"])
    try:
        assert _alive(pid)
        assert httpx.post(url + "/v1/completions",
                          json={"prompt": "a", "max_tokens": 3}).status_code == 200
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        else:
            proc.kill()
            proc.wait(timeout=60)
        assert _gone(pid), f"engine process {pid} outlived the server ({how})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_thread_engine_option(tiny_run):
    proc = subprocess.run([sys.executable, "-m", "microtransformer", "serve", "--help"],
                          capture_output=True, text=True, env=_env(), timeout=60)
    assert "--engine {process,thread}" in proc.stdout
