"""How scores on several texts move with the passes over a small training text (one run).

Two steps. While a run trains with a checkpoint at every evaluation, `watch` copies each new
`model.safetensors` of the run to SNAPSHOTS/step_N.safetensors (N from the weights' metadata);
afterwards `score` scores every snapshot on the run's val split (nats/token: all tokens, and only
the tokens whose k-gram, the token and the k-1 before it, never occurs in the training split)
and on each TEXT (bits per byte), writes one JSON line per snapshot and draws the curves:

    python benchmarks/passes_curve.py watch runs/ts_diag snaps/ &
    microtransformer train --data data/ts --out runs/ts_diag --preset cpu_bpe \
        --train.max_steps 1320 --train.max_time_minutes 6000 --model.dropout 0.1 \
        --model.attn_dropout 0 --train.weight_decay 0.5 \
        --train.eval_interval 35 --train.checkpoint_interval 35
    touch snaps/STOP
    python benchmarks/passes_curve.py score runs/ts_diag data/ts snaps/ --every 70 \
        --text ../shared/data/tinystories/valid.txt \
        --text ../shared/data/gutenberg/huckleberry_finn.txt \
        --text ../shared/data/gutenberg/alice_in_wonderland.txt \
        --out benchmarks/results/passes_curve_ts.jsonl --plot docs/img/passes_curve_ts.png

`average` writes runs whose weights are the mean of the newest K snapshots, for
`microtransformer eval` (the weight averaging of docs/RESULTS.md, section 10):

    python benchmarks/passes_curve.py average runs/shakes snaps/ averaged/ --last 5,10,15

Each text is scored from its first `--max-chars` characters in non-overlapping windows of the
model's context (the same windows for every snapshot, so the curves compare; `microtransformer
eval` gives the figure for a single model). docs/RESULTS.md, section 9.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from microtransformer.checkpoint import (
    load_run,
    load_weights_into,
    read_safetensors_metadata,
    save_weights,
)
from microtransformer.data.tokens import load_tokens
from model import MicroTransformer


def watch(run: Path, out: Path) -> None:
    """Copy each new model.safetensors of `run` to out/step_N.safetensors until out/STOP."""
    out.mkdir(parents=True, exist_ok=True)
    seen = None
    while not (out / "STOP").exists():
        path = run / "model.safetensors"
        try:
            stamp = path.stat().st_mtime_ns
            if stamp != seen:
                time.sleep(0.3)  # the atomic rename is done; let the reader see the whole file
                step = read_safetensors_metadata(path)["step"]
                (out / f"step_{step}.safetensors").write_bytes(path.read_bytes())
                seen = stamp
        except (FileNotFoundError, KeyError, ValueError):
            pass
        time.sleep(1.0)


def novel_kgrams(train: np.ndarray, val: np.ndarray, k: int, vocab: int) -> np.ndarray:
    """(len(val),) bool: the k-gram ending at each val token never occurs in `train`."""

    def hashes(a: np.ndarray) -> np.ndarray:
        h = np.zeros(len(a) - k + 1, dtype=np.int64)
        for i in range(k):
            h = h * vocab + a[i:len(a) - k + 1 + i]
        return h

    novel = np.zeros(len(val), dtype=bool)
    novel[k - 1:] = ~np.isin(hashes(val), np.unique(hashes(train)))
    return novel


@torch.no_grad()
def token_nll(model: MicroTransformer, ids: np.ndarray, window: int) -> np.ndarray:
    """Negative log-likelihood (nats) of each token predicted in non-overlapping windows of
    `ids`; NaN where a token is not predicted (each window's first)."""
    out = np.full(len(ids), np.nan)
    rows = (len(ids) - 1) // window
    x = torch.from_numpy(ids[: rows * window + 1])
    for start in range(0, rows, 32):
        r = torch.arange(start, min(rows, start + 32))[:, None] * window
        inp, tgt = x[r + torch.arange(window)], x[r + 1 + torch.arange(window)]  # (B, T)
        logp = torch.log_softmax(model(inp).float(), dim=-1)  # (B, T, V)
        nll = -logp.gather(-1, tgt[..., None])[..., 0]  # (B, T)
        out[(r + 1 + torch.arange(window)).flatten().numpy()] = nll.flatten().numpy()
    return out


def score(args: argparse.Namespace) -> list[dict[str, float]]:
    """Score every kept snapshot; returns the rows (also written to --out)."""
    model, tokenizer, run_cfg = load_run(args.run)  # weights replaced by each snapshot below
    cfg = run_cfg.model
    train = np.asarray(load_tokens(args.data, "train"), dtype=np.int64)
    val = np.asarray(load_tokens(args.data, "val"), dtype=np.int64)
    if cfg.vocab_size ** args.k >= 2 ** 63:
        raise SystemExit(f"--k {args.k}: vocab_size {cfg.vocab_size} ** k overflows the int64 "
                         "k-gram hash; use a smaller --k")
    novel = novel_kgrams(train, val, args.k, cfg.vocab_size)
    texts = {}
    for path in args.text:
        text = Path(path).read_text(encoding="utf-8")[: args.max_chars]
        texts[Path(path).stem] = (np.asarray(tokenizer.encode(text), dtype=np.int64),
                                  len(text.encode("utf-8")))
    snaps = sorted(Path(args.snapshots).glob("step_*.safetensors"),
                   key=lambda p: int(p.stem.split("_")[1]))
    last = max(int(p.stem.split("_")[1]) for p in snaps)
    tc = run_cfg.train
    passes_per_step = (tc.batch_size * tc.grad_accum_steps * (tc.seq_len or cfg.max_seq_len)
                       / len(train))
    rows = []
    for snap in snaps:
        step = int(snap.stem.split("_")[1])
        if step % args.every and step != last:
            continue
        load_weights_into(model, snap)
        nll = token_nll(model, val, cfg.max_seq_len)
        have = ~np.isnan(nll)
        row = {"step": step, "passes": round(step * passes_per_step, 2),
               "val_nats": float(nll[have].mean()),
               f"val_novel{args.k}_nats": float(nll[have & novel].mean())}
        for name, (ids, nbytes) in texts.items():
            t = token_nll(model, ids, cfg.max_seq_len)
            scored = ~np.isnan(t)  # bytes of the scored tokens, pro rata
            row[f"{name}_bpb"] = float(t[scored].sum() / math.log(2)
                                       / (nbytes * scored.sum() / len(ids)))
        rows.append(row)
        print(json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    print(f"val tokens with a {args.k}-gram not in train: {novel[args.k - 1:].mean():.3f}")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def average(run: Path, snapshots: Path, out: Path, lasts: list[int]) -> None:
    """For each K in `lasts`: a copy of `run` at out/lastK whose model.safetensors is the mean
    of the K newest snapshots (uniform weights, summed in float64), for `microtransformer eval`.
    """
    model, _, _ = load_run(run)
    snaps = sorted(snapshots.glob("step_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    for k in lasts:
        if not 1 <= k <= len(snaps):
            raise SystemExit(f"--last {k}: there are {len(snaps)} snapshots in {snapshots}")
        total: dict[str, torch.Tensor] = {}
        for snap in snaps[-k:]:
            load_weights_into(model, snap)
            for name, t in model.state_dict().items():
                total[name] = total.get(name, 0) + t.double()
        model.load_state_dict({name: t / k for name, t in total.items()})
        dst = out / f"last{k}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(run, dst, ignore=shutil.ignore_patterns("*.prev.*"))
        meta = read_safetensors_metadata(snaps[-1])
        extra = {"averaged": ",".join(p.stem for p in snaps[-k:])}
        if "tokenizer_sha256" in meta:
            extra["tokenizer_sha256"] = meta["tokenizer_sha256"]
        save_weights(model, dst / "model.safetensors", step=int(meta["step"]), extra=extra)
        print(f"{dst}: mean of {', '.join(p.stem for p in snaps[-k:])}", flush=True)


def plot(rows: list[dict[str, float]], out: str, k: int) -> None:
    """Scores against passes: the texts (bits/byte, left) and the val split (nats/token, right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["passes"] for r in rows]
    fig, left = plt.subplots(figsize=(9, 5))
    for key in rows[0]:
        if key.endswith("_bpb"):
            left.plot(x, [r[key] for r in rows], marker="o", ms=3, label=key[:-4] + " (bits/byte)")
    left.set_xlabel("passes over the training text")
    left.set_ylabel("bits per byte")
    right = left.twinx()
    right.plot(x, [r["val_nats"] for r in rows], "k--", label="val split (nats/token)")
    right.plot(x, [r[f"val_novel{k}_nats"] for r in rows], "k:",
               label=f"val tokens with an unseen {k}-gram (nats/token)")
    right.set_ylabel("val nats/token")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    left.set_ylim(1.0, 4.5)
    right.set_ylim(3.0, 4.6)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=110)


def main() -> None:
    """Parse the arguments and run `watch`, `score`, `average` or `plot`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch", help="copy each new checkpoint of RUN to SNAPSHOTS")
    w.add_argument("run", type=Path)
    w.add_argument("snapshots", type=Path)
    s = sub.add_parser("score", help="score the snapshots")
    s.add_argument("run", type=Path)
    s.add_argument("data", type=Path, help="the run's prepared data directory")
    s.add_argument("snapshots", type=Path)
    s.add_argument("--text", action="append", default=[], help="another text to score (repeat)")
    s.add_argument("--every", type=int, default=1, help="score snapshots at multiples of this step")
    s.add_argument("--k", type=int, default=5, help="k-gram length of the novel-token val score")
    s.add_argument("--max-chars", type=int, default=150_000)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--out", help="JSON lines of the rows")
    s.add_argument("--plot", help="PNG of the curves")
    a = sub.add_parser("average", help="runs whose weights are the mean of the last snapshots")
    a.add_argument("run", type=Path)
    a.add_argument("snapshots", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--last", required=True, help="comma-separated counts of snapshots, e.g. 5,10")
    d = sub.add_parser("plot", help="draw the curves of a score --out file again")
    d.add_argument("rows", type=Path)
    d.add_argument("png")
    d.add_argument("--k", type=int, default=5)
    args = p.parse_args()
    if args.cmd == "watch":
        watch(args.run, args.snapshots)
        return
    if args.cmd == "average":
        average(args.run, args.snapshots, args.out, [int(k) for k in args.last.split(",")])
        return
    if args.cmd == "plot":
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line]
        plot(rows, args.png, args.k)
        return
    torch.set_num_threads(args.threads)
    rows = score(args)
    if args.plot:
        plot(rows, args.plot, args.k)


if __name__ == "__main__":
    main()
