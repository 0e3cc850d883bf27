"""Model loading, outside the HTTP layer: a training run -> a `ServedModel` (its engine,
tokenizer and `/v1/models` card)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microtransformer.checkpoint import METRICS_FILE, load_run
from microtransformer.metrics import read_metrics
from microtransformer.serve.engine import Engine
from microtransformer.serve.process import EngineProcess
from model.utils import count_parameters


@dataclass
class ServedModel:
    """One model behind the API: its engine, tokenizer and `/v1/models` entry."""

    name: str
    engine: Engine | EngineProcess
    tokenizer: Any
    card: dict[str, Any] = field(default_factory=dict)

    max_token_chars: int = 0  # the longest token of the vocabulary, in characters (computed)

    def __post_init__(self) -> None:
        if not self.max_token_chars:
            self.max_token_chars = max(
                1, *(len(self.tokenizer.decode([i], skip_special_tokens=False))
                     for i in range(self.tokenizer.vocab_size)))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_prompt_chars(self) -> int:
        """The longest text prompt that can fit the context: every token covers at most
        `max_token_chars` characters of the text, so a prompt of more characters than
        (context - 1) x that has at least a context's worth of tokens, with no room left."""
        return (self.max_model_len - 1) * self.max_token_chars


def stderr_log(name: str) -> Callable[[str], None]:
    """A log function printing `model NAME: line` on stderr (the server's log)."""

    def log(line: str) -> None:
        print(f"model {name}: {line}", file=sys.stderr, flush=True)

    return log


def load_served_model(run_dir: str | Path, *, name: str | None = None, which: str = "last",
                      device: Any = "cpu", max_batch: int = 16, max_queue: int = 256,
                      precision: str = "fp32", compile: bool = False, compile_after: int = 1,
                      log: Callable[[str], None] | None = None, process: bool = False,
                      threads: int | None = None) -> ServedModel:
    """Load a training run (`checkpoint.load_run`) and put an engine on it.

    precision: "fp32", "bf16", "int8" or "int8wo" (`device.check_precision` must allow it; a copy of
    the model in that precision); compile / compile_after: compile the engine's bucket steps
    in the background (`Engine`); log: where the compile progress goes (default: stderr,
    `model NAME: ...`). process: run the engine in a child process (`serve.process`; it
    loads the run itself, with `threads` torch threads, and logs to stderr) instead of a
    thread of this one; this process then keeps only the tokenizer."""
    model, tokenizer, _ = load_run(run_dir, which=which,
                                   device="cpu" if process else device)
    name = name or Path(run_dir).resolve().name
    evals = [e for e in read_metrics(Path(run_dir) / METRICS_FILE)
             if e.get("val_loss") is not None]
    best = min(evals, key=lambda e: e["val_loss"]) if evals else {}
    card = {"id": name, "object": "model", "created": int(time.time()),
            "owned_by": "microtransformer", "max_model_len": model.max_seq_len,
            "parameters": count_parameters(model), "best_val_loss": best.get("val_loss"),
            "bits_per_byte": best.get("val_bpb"), "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "weights": which, "precision": precision}
    if process:
        max_model_len = model.max_seq_len
        del model  # the child loads its own
        spec = {"run_dir": str(run_dir), "which": which, "device": str(device), "name": name,
                "max_batch": max_batch, "max_queue": max_queue, "precision": precision,
                "compile": compile, "compile_after": compile_after, "threads": threads}
        return ServedModel(name, EngineProcess(spec, tokenizer=tokenizer,
                                               max_model_len=max_model_len), tokenizer, card)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                    dtype=precision, compile=compile, compile_after=compile_after,
                    log=log or stderr_log(name))
    return ServedModel(name, engine, tokenizer, card)
