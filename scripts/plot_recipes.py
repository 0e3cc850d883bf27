"""Plot validation loss against training time for several runs (docs/RESULTS.md's figures).

    python scripts/plot_recipes.py OUT.png ["label=RUN_DIR" ...] [--points "label=S:V,..."]
        [--title T] [--ref "label=VALUE"] [--key val_loss|val_bpb] [--ylim LOW,HIGH]
        [--rate label=TOK_S] [--xlabel TEXT]

Reads each run's metrics.jsonl; the x axis is `train_time_s` (the time budget's clock:
optimizer steps only) where the log has it, else `elapsed_s` (older logs: wall time of the
call, evaluation included). `--rate label=TOKENS_PER_S`: that run's x is its tokens seen at a
measured rate instead (for runs that fixed the steps a budget buys and ran on a busy machine,
whose own clock says nothing about the budget).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from microtransformer.metrics import loss_series, read_metrics


def main() -> None:
    """Parse the arguments and write the figure."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="PNG to write")
    p.add_argument("runs", nargs="*", help="label=RUN_DIR")
    p.add_argument("--title", default="")
    p.add_argument("--ylabel", default=None,
                   help="default: val loss (nats/token), or val bits per byte with --key val_bpb")
    p.add_argument("--key", default="val_loss", help="metric to plot (val_loss or val_bpb)")
    p.add_argument("--points", action="append", default=[],
                   help="label=SECONDS:VALUE,...: a curve from a published table")
    p.add_argument("--ref", action="append", default=[],
                   help="label=VALUE: a horizontal reference line (e.g. an earlier result)")
    p.add_argument("--ylim", default=None, help="LOW,HIGH: the y range (e.g. to cut step 0)")
    p.add_argument("--rate", action="append", default=[],
                   help="label=TOKENS_PER_S: plot that run's tokens seen at this rate")
    p.add_argument("--xlabel", default=None, help="default: training time (min)")
    args = p.parse_args()
    if not args.runs and not args.points:
        p.error("give at least one label=RUN_DIR or --points")
    rates = {label: float(v) for label, _, v in (r.partition("=") for r in args.rate)}
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for item in args.runs:
        label, _, run = item.partition("=")
        events = read_metrics(Path(run) / "metrics.jsonl")
        x = "train_time_s" if any("train_time_s" in e for e in events) else "elapsed_s"
        if label in rates:
            points = [(n / rates[label], v)
                      for n, v in loss_series(events, args.key, x="tokens_seen")]
        else:
            points = loss_series(events, args.key, x=x)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot([t / 60 for t in xs], ys, "o-", markersize=3, label=label)
    for item in args.points:
        label, _, pairs = item.partition("=")
        xs, ys = zip(*((float(a) / 60, float(b)) for a, b in
                       (pair.split(":") for pair in pairs.split(","))), strict=True)
        ax.plot(xs, ys, "s--", markersize=3, label=label)
    for item in args.ref:
        label, _, value = item.partition("=")
        ax.axhline(float(value), linestyle="--", color="grey", linewidth=1)
        ax.annotate(label, (0, float(value)), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(4, 3), fontsize=7, color="dimgrey")
    if args.ylim:
        low, high = (float(v) for v in args.ylim.split(","))
        ax.set_ylim(low, high)
    ax.set_xlabel(args.xlabel or "training time (min)"
                  + (", at the measured rate where --rate" if rates else ""))
    ax.set_ylabel(args.ylabel or {"val_bpb": "val bits per byte"}.get(args.key,
                                                                       "val loss (nats/token)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if args.title:
        ax.set_title(args.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
