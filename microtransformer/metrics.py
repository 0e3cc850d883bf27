"""Training metrics: JSON-lines log, optional TensorBoard mirror and the loss-curve plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from microtransformer.checkpoint import atomic_write_bytes


class MetricsLogger:
    """Append one JSON object per event to `metrics.jsonl` (and to TensorBoard if installed).

    Each line is flushed at once so a crash loses nothing already logged. Non-finite floats are
    written as null (JSON has no NaN).
    """

    def __init__(self, path: str | os.PathLike, *, tensorboard_dir: str | os.PathLike | None = None
                 ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed: the JSONL log is enough
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, event: dict[str, Any]) -> None:
        """Write one event (a flat dict; must contain "step")."""
        clean = {k: _json_safe(v) for k, v in event.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = int(event.get("step", 0))
            for k, v in event.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        """Flush and close the files."""
        self._fh.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All events of a metrics.jsonl (a torn last line, from a crash, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def truncate_metrics(path: str | os.PathLike, step: int, *, drop_val_at_step: bool) -> int:
    """On resume from the checkpoint at `step`: drop the events logged after it (the resumed
    run logs those steps again), and its val event too when `drop_val_at_step` (the loop
    evaluates again there). Rewrites the file atomically; returns the number of events
    dropped (0 leaves the file untouched)."""

    events = read_metrics(path)

    def keep(e: dict[str, Any]) -> bool:
        s = int(e.get("step", 0))
        if s > step:
            return False
        return not (s == step and drop_val_at_step and "val_loss" in e)

    kept = [e for e in events if keep(e)]
    dropped = len(events) - len(kept)
    if dropped or len(kept) != _line_count(path):
        text = "".join(json.dumps(e) + "\n" for e in kept)
        atomic_write_bytes(Path(path), text.encode("utf-8"))
    return dropped


def _line_count(path: str | os.PathLike) -> int:
    p = Path(path)
    if not p.is_file():
        return 0
    return sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip())


def loss_series(events: list[dict[str, Any]], key: str, x: str = "step"
                ) -> list[tuple[float, float]]:
    """(x, value) points of `key` in step order, one per step: when a step was logged twice
    (a log written before resumes cut it), the later event wins, so a curve never doubles
    back."""
    by_step: dict[int, tuple[float, float]] = {}
    for e in events:
        if e.get(key) is not None and e.get(x) is not None:
            by_step[int(e["step"])] = (e[x], e[key])
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(metrics_path: str | os.PathLike, out_path: str | os.PathLike,
                    *, title: str | None = None) -> Path | None:
    """Plot train and val loss against step (bottom axis) and tokens seen (top axis).

    Returns the PNG path, or None when there is nothing to plot. Uses the Agg backend (no display).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_metrics(metrics_path)
    train = loss_series(events, "loss")
    val = loss_series(events, "val_loss")
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    # Tokens seen on a secondary axis, from the step -> tokens relation in the log.
    pairs = [(e["step"], e["tokens_seen"]) for e in events
             if e.get("tokens_seen") and e.get("step")]
    if pairs:
        step, tokens = pairs[-1]
        per_step = tokens / step
        sec = ax.secondary_xaxis("top", functions=(lambda s: s * per_step,
                                                   lambda t: t / per_step))
        sec.set_xlabel("tokens seen")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out)
    plt.close(fig)
    return out
