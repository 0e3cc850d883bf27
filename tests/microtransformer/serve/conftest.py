"""Fixtures for the server tests: a tiny run directory written with the project's own writers
(no training) and a live uvicorn server on a free loopback port, in this process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import uvicorn

from microtransformer.checkpoint import METRICS_FILE, save_weights
from microtransformer.config import RunConfig
from microtransformer.metrics import MetricsLogger
from microtransformer.serve.app import create_app
from microtransformer.serve.loading import load_served_model
from microtransformer.serve.state import ServerState
from microtransformer.tokenizer import train_tokenizer
from model import MicroTransformer, ModelConfig

CORPUS = "the cat sat on the mat. the dog ran to the hill, and the owl flew home!\n" * 20


def write_run(root: Path, *, seed: int = 0, max_seq_len: int = 64) -> Path:
    """A run directory (config.json, tokenizer.json, model.safetensors, metrics.jsonl) holding a
    tiny random model and a char tokenizer; nothing is trained."""
    root.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer([CORPUS], kind="char", vocab_size=64)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=max_seq_len, embed_dim=32,
                      num_heads=4, num_layers=2, ff_dim=64, dropout=0.0)
    model = MicroTransformer.from_config(cfg)
    RunConfig(model=cfg).save_json(root / "config.json")
    tok.save(root / "tokenizer.json")
    save_weights(model, root / "model.safetensors", step=1)
    with MetricsLogger(root / METRICS_FILE) as log:
        log.log({"step": 1, "val_loss": 3.5, "val_bpb": 5.0})
        log.log({"step": 2, "val_loss": 3.25, "val_bpb": 4.75})
    return root


class LiveServer:
    """The app under uvicorn in a background thread, on 127.0.0.1 and a free port."""

    def __init__(self, app) -> None:
        self.app = app
        self.state: ServerState = app.state.serve
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def engine(self, name: str | None = None):
        models = self.state.models
        return (models[name] if name else next(iter(models.values()))).engine

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once no request is in flight and nothing is queued or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state.idle:
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(run_dirs: list[Path], *, names: list[str] | None = None, max_batch: int = 4,
                 max_queue: int = 64, process: bool = False, precision: str = "fp32",
                 **app_options) -> LiveServer:
    """Load the runs and serve them (options as for `create_app`; `process`: each engine in
    a child process, as `microtransformer serve` runs it)."""
    names = names or [None] * len(run_dirs)
    models = [load_served_model(d, name=n, max_batch=max_batch, max_queue=max_queue,
                                process=process, precision=precision)
              for d, n in zip(run_dirs, names, strict=True)]
    return LiveServer(create_app(models, **app_options))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny random run directory named "tiny"."""
    return write_run(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="session")
def server(tiny_run: Path) -> Iterator[LiveServer]:
    """One live server for the session: model "tiny", 4 slots, no API key."""
    live = start_server([tiny_run], max_batch=4)
    yield live
    live.stop()


@pytest.fixture
def client(server: LiveServer):
    """The official openai client pointed at the live server."""
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                       timeout=30) as c:
        yield c
