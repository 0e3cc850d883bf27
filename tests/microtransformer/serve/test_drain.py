"""`microtransformer serve` as a process: SIGTERM drains the requests in flight (new ones get
503), then the process exits 0; bad options are one line and exit 2."""

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


def test_sigterm_drains_then_exits_zero(tmp_path):
    run = write_run(tmp_path / "long", max_seq_len=128)
    proc, url = _start([str(run), "--port", "0", "--max-batch", "1"])
    try:
        lines: list[str] = []
        first = threading.Event()

        def stream() -> None:  # 6 choices one after another through one slot: ~700 steps
            body = {"prompt": "the", "max_tokens": 120, "n": 6, "stream": True,
                    "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 503:
            assert time.monotonic() < deadline, "never started draining"
            time.sleep(0.01)
        refused = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "service_unavailable"
        reader.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        chunks = [json.loads(x[len("data: "):]) for x in lines[:-1]]
        assert lines[-1] == "data: [DONE]"
        finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
        assert sorted(finished) == list(range(6))  # every choice of the request completed
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_bad_options_are_one_line(tmp_path, capsys):
    from microtransformer.cli import main

    for args, needle in ((["nope-dir"], "does not exist"),
                         ([str(tmp_path), "--max-batch", "0"], "--max-batch=0"),
                         ([str(tmp_path), str(tmp_path), "--model-name", "a"], "--model-name")):
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
