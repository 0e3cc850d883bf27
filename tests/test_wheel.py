"""The package as a user installs it: build the wheel, install it into a fresh virtual
environment, and from a directory outside the repository list the presets, train a short run
from a preset and serve it for one request. Nothing may be read from the source tree."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT

# what a build needs from the checkout: sources, never local venvs, runs, data or caches
_IGNORE_ANYWHERE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                          "__pycache__", "node_modules", ".pytest_cache",
                                          ".ruff_cache", ".hypothesis")


def _ignore(directory: str, names: list[str]) -> set[str]:
    top = {"runs", "data", "out"} if Path(directory) == REPO_ROOT else set()
    return set(_IGNORE_ANYWHERE(directory, names)) | (top & set(names))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (dependencies reached through the test's own
    site-packages, added as a plain path so no editable install of the repo comes along).
    Returns the venv's bin directory."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO_ROOT, src, ignore=_ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(root / "dist"), str(src)],
                   check=True, cwd=root, capture_output=True)
    (wheel,) = (root / "dist").glob("micro_transformer-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], check=True, capture_output=True,
                             text=True).stdout.strip()
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    shutil.rmtree(src)  # the installed copy must not lean on the source tree
    return venv / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(bin_dir / "microtransformer"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_wheel_lists_presets_trains_and_serves(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(installed / "python"), "-c",
                            "import microtransformer, model; print(microtransformer.__file__); "
                            "print(model.__file__)"], cwd=tmp_path, capture_output=True,
                           text=True, check=True).stdout
    assert str(REPO_ROOT) not in where and "site-packages" in where, where

    listing = _run(installed, tmp_path, "configs", "--presets")
    for preset in ("wide_shallow", "narrow_deep", "balanced"):
        assert preset in listing, listing

    (tmp_path / "corpus.txt").write_text("the cat sat on the mat and looked at the hat.\n" * 60)
    _run(installed, tmp_path, "prepare", "corpus.txt", "--out", "data", "--tokenizer", "char")
    out = _run(installed, tmp_path, "train", "--data", "data", "--out", "run", "--preset",
               "balanced", "--train.max_steps", "2", "--train.batch_size", "2",
               "--train.eval_steps", "1", "--train.cpu_threads", "1", "--no-progress")
    assert "note: train.warmup_steps: 100 (preset 'balanced') -> 1" in out, out

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([str(installed / "microtransformer"), "serve", "run", "--port", "0"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        url = None
        deadline = time.monotonic() + 90
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if match := re.search(r"serving on (http://\S+)", line):
                url = match.group(1)
            elif not line and proc.poll() is not None:
                break
        assert url, proc.stderr.read()
        page = httpx.get(url + "/", timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()  # static files shipped
        reply = httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 5},
                           timeout=60)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        choice, used = body["choices"][0], body["usage"]["completion_tokens"]
        # A 2-step model may sample the end-of-text token before the limit ("stop"); else it runs
        # to the 5-token limit ("length") and those tokens decode to text.
        assert choice["finish_reason"] in ("stop", "length") and 1 <= used <= 5, body
        if choice["finish_reason"] == "length":
            assert used == 5 and choice["text"] != "", body
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
