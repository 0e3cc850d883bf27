"""The study's PNG plots (loss curves, loss by position, init comparison)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from microtransformer.study.measure import smooth_positions

COLORS = {"wide_shallow": "tab:blue", "narrow_deep": "tab:red", "balanced": "tab:green"}
SMOOTH = 9  # logged train losses per moving-average window in the loss plots


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average (the window shrinks at the ends); same length as `values`."""
    half = window // 2
    return [statistics.fmean(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def write_plots(out: Path, groups: dict[tuple[str, str, str, str], list[dict[str, Any]]],
                corpora: Sequence[str], base_init: str,
                sweep: dict[str, dict[int, dict[float, float]]] | None = None) -> list[Path]:
    """study_loss_tokens.png, study_loss_time.png, study_position.png, study_init.png and
    study_lr.png (val loss over the learning-rate sweep), those that have data. Returns their
    paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []

    def panels(title: str) -> tuple[Any, Any]:
        fig, axes = plt.subplots(1, len(corpora), figsize=(4.2 * len(corpora), 3.2), dpi=80,
                                 squeeze=False)
        fig.suptitle(title, fontsize=10)
        return fig, axes[0]

    def style(ax: Any, corpus: str, xlabel: str, ylabel: str = "loss (nats)") -> None:
        ax.set_title(corpus, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(out / name)

    for group, xi, xlabel, name in (("tokens", 1, "training tokens", "study_loss_tokens.png"),
                                    ("time", 2, "training seconds", "study_loss_time.png")):
        if not any(k[0] == group for k in groups):
            continue
        # top: train loss, smoothed, mean over seeds; bottom: val loss at the in-run
        # evaluations (a few batches) and the final one (the fixed val windows), per seed
        fig, grid = plt.subplots(2, len(corpora), figsize=(4.2 * len(corpora), 5.6), dpi=80,
                                 squeeze=False, sharex="col")
        fig.suptitle(f"loss against {xlabel} (equal {'tokens' if group == 'tokens' else 'time'}"
                     "): train loss smoothed, mean over seeds (top); val loss per seed "
                     "(bottom)", fontsize=9)
        for col, corpus in enumerate(corpora):
            top, bottom = grid[0][col], grid[1][col]
            low: list[float] = []
            for (g, c, cfg, init), rs in sorted(groups.items()):
                if g != group or c != corpus or init != base_init:
                    continue
                n = min(len(r["curve"]) for r in rs)
                xs = [statistics.fmean(r["curve"][i][xi] for r in rs) for i in range(n)]
                ys = smooth([statistics.fmean(r["curve"][i][3] for r in rs) for i in range(n)],
                            SMOOTH)
                top.plot(xs, ys, color=COLORS.get(cfg), linewidth=1.2, label=cfg)
                low += ys[n // 10:]
                for j, r in enumerate(rs):
                    vc = r.get("val_curve") or []
                    # in-run evaluations at their x (the curve's entry at that step), then
                    # the final score on the fixed windows at the run's end
                    at = {e[0]: e[xi] for e in r["curve"]}
                    pts = [(at.get(e[0], e[1] if xi == 1 else float("nan")), e[2])
                           for e in vc if e[0] > 0]
                    pts.append((r["curve"][-1][xi], r["val_loss"]))
                    bottom.plot([x for x, _ in pts], [y for _, y in pts], "o-",
                                markersize=3, linewidth=1, alpha=0.85, color=COLORS.get(cfg),
                                label=cfg if j == 0 else None)
            if low:  # leave the first 10% (loss from 8 down) out of the y range
                span = max(low) - min(low)
                top.set_ylim(min(low) - 0.05 * span, max(low) + 0.05 * span)
            style(top, corpus, "", "train loss (nats)")
            style(bottom, corpus, xlabel, "val loss (nats)")
            bottom.set_title("")
        save(fig, name)

    if any(k[0] == "tokens" for k in groups):
        fig, axes = panels("val loss by position, minus wide_shallow's (equal tokens, "
                           "mean over seeds)")
        for ax, corpus in zip(axes, corpora, strict=True):
            ref = groups.get(("tokens", corpus, "wide_shallow", base_init))
            for (g, c, cfg, init), rs in sorted(groups.items()):
                if g != "tokens" or c != corpus or init != base_init:
                    continue
                mean_pos = [statistics.fmean(v) for v in zip(*(r["loss_by_position"]
                                                               for r in rs), strict=True)]
                if ref:
                    ref_pos = [statistics.fmean(v) for v in zip(*(r["loss_by_position"]
                                                                  for r in ref), strict=True)]
                    mean_pos = [a - b for a, b in zip(mean_pos, ref_pos, strict=True)]
                xs, ys = smooth_positions(mean_pos, 16)
                ax.plot(xs, ys, "o-", markersize=2, color=COLORS.get(cfg), label=cfg)
            ax.axhline(0, color="gray", linewidth=0.5)
            style(ax, corpus, "position in context (16-token buckets)",
                  "loss - wide_shallow loss" if ref else "loss")
        save(fig, "study_position.png")

        fig, axes = panels("val loss by position (equal tokens, mean over seeds)")
        for ax, corpus in zip(axes, corpora, strict=True):
            for (g, c, cfg, init), rs in sorted(groups.items()):
                if g != "tokens" or c != corpus or init != base_init:
                    continue
                mean_pos = [statistics.fmean(v) for v in zip(*(r["loss_by_position"]
                                                               for r in rs), strict=True)]
                xs, ys = smooth_positions(mean_pos, 8)
                ax.plot(xs, ys, color=COLORS.get(cfg), label=cfg, linewidth=1)
            ax.set_xscale("log")
            style(ax, corpus, "position in context (log)")
        save(fig, "study_position_abs.png")

    init_keys = [k for k in groups if k[0] == "tokens" and k[3] != base_init]
    if init_keys:
        fig, axes = panels("train loss by init (equal tokens)")
        styles = {"kaiming": "-", "gpt2": "--"}
        for ax, corpus in zip(axes, corpora, strict=True):
            cfgs = {k[2] for k in init_keys if k[1] == corpus}
            for (g, c, cfg, init), rs in sorted(groups.items()):
                if g != "tokens" or c != corpus or cfg not in cfgs:
                    continue
                for j, r in enumerate(rs):
                    ax.plot([e[1] for e in r["curve"]], [e[3] for e in r["curve"]],
                            styles.get(init, ":"), color=COLORS.get(cfg), linewidth=1,
                            label=f"{cfg} {init}" if j == 0 else None)
            style(ax, corpus, "training tokens")
        save(fig, "study_init.png")
    if sweep:
        fig, ax = plt.subplots(figsize=(4.6, 3.2), dpi=80)
        fig.suptitle("learning-rate sweep (equal tokens)", fontsize=10)
        for cfg, by_seed in sorted(sweep.items()):
            for j, (_, losses) in enumerate(sorted(by_seed.items())):
                rates = sorted(losses)
                ax.plot(rates, [losses[x] for x in rates], marker="o", color=COLORS.get(cfg),
                        alpha=0.8, linewidth=1, label=cfg if j == 0 else None)
        ax.set_xscale("log")
        style(ax, corpora[0] if corpora else "", "peak learning rate", "val loss (nats)")
        save(fig, "study_lr.png")
    return paths


