"""The study report: runs.jsonl and report.md (tables, claims, samples, settings)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from microtransformer.study.corpora import CORPORA
from microtransformer.study.measure import BUCKET
from microtransformer.study.plots import write_plots
from microtransformer.study.stats import (
    claim_rows,
    fmt,
    grad_depth_ratio,
    group_results,
    loss_at_fraction,
    lr_sweep_losses,
)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return lines


def write_report(out_dir: str | os.PathLike, results: Sequence[dict[str, Any]], *,
                 settings: dict[str, Any], command: str = "", skipped: Sequence[str] = (),
                 failed: Sequence[str] = (), elapsed_s: float | None = None,
                 plots: bool = True) -> Path:
    """Write runs.jsonl, report.md and the PNG plots into out_dir; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.jsonl", "w", encoding="utf-8") as fh:
        for r in sorted(results, key=lambda r: r["run_id"]):
            fh.write(json.dumps(r) + "\n")
    groups = group_results(results)
    corpora = [c for c in settings.get("corpora", CORPORA) if any(k[1] == c for k in groups)]
    base_init = (settings.get("inits") or ["kaiming"])[0]
    sweep = lr_sweep_losses(results, corpora[0], base_init) if corpora else {}
    images = write_plots(out, groups, corpora, base_init, sweep) if plots and results else []

    L: list[str] = ["# Architecture study report", ""]
    if command:
        L += ["Command:", "", "```", command, "```", ""]
    dev = {r.get("device") for r in results}
    L += [f"- runs finished: {len(results)}; skipped by the budget: {len(skipped)}; "
          f"failed: {len(failed)}",
          f"- device: {', '.join(sorted(d for d in dev if d)) or '-'}; torch "
          f"{results[0]['torch'] if results else '-'}; CPU threads "
          f"{results[0].get('threads', '-') if results else '-'}",
          f"- seq_len {settings.get('seq_len')}, batch {settings.get('batch_size')}, lr "
          f"{settings.get('lr')}, dropout {settings.get('dropout')}, "
          f"{settings.get('tokens_per_run', 0):,} tokens per equal-token run, "
          f"{settings.get('minutes_per_time_run', 0):.2f} min per equal-time run",
          "- values are mean ± sample std over seeds (n = seeds); loss in nats/token on fixed "
          "val windows; bpb = bits per UTF-8 byte",
          "- early / late = mean loss at context positions "
          f"1-{BUCKET} / last {BUCKET} positions; gain = early - late", ""]
    trained = [r for r in results if not r.get("same_run_as")]  # a folded run cost nothing
    if trained:
        wall = sum(r.get("train_seconds", 0.0) for r in trained)
        idle = sum(r["steps"] * r["step_time_ms"] / 1e3 for r in trained
                   if r.get("step_time_ms"))
        L.insert(len(L) - 1, f"- machine time: {wall / 3600:.2f} h of training loops over "
                 f"{len(trained)} trained runs (wall-clock, pauses and other jobs included; "
                 f"at each run's best logged speed {idle / 3600:.2f} h)")
    if elapsed_s is not None:
        L.insert(len(L) - 1, f"- study wall-clock this invocation: {elapsed_s / 60:.1f} min")

    for group, title in (("tokens", "Equal training tokens"), ("time", "Equal wall-clock")):
        rows = []
        for corpus in corpora:
            for (g, c, cfg, init), rs in sorted(groups.items()):
                if g != group or c != corpus:
                    continue
                pb = [r["position_buckets"] for r in rs]
                rows.append([
                    corpus, cfg, init, len(rs), f"{rs[0]['params']:,}",
                    fmt([r["tokens"] for r in rs], 0, 1e-3) + "k",
                    fmt([r["val_loss"] for r in rs]), fmt([r["val_bpb"] for r in rs]),
                    fmt([p["early"] for p in pb]), fmt([p["late"] for p in pb]),
                    fmt([p["early"] - p["late"] for p in pb]),
                    fmt([r["tokens_per_s_best"] for r in rs], 0),
                    fmt([r["step_time_ms"] for r in rs], 0),
                    fmt([r["peak_memory_mb"] for r in rs], 0),
                    fmt([r["gen_tokens_per_s"] for r in rs], 0),
                    fmt([r.get("gen_tokens_per_s_b8") for r in rs], 0),
                ])
        if rows:
            L += [f"## {title}", ""]
            L += _table(["corpus", "config", "init", "n", "params", "tokens", "val loss",
                         "val bpb", "early", "late", "gain", "train tok/s*", "step ms*",
                         "peak MB", "gen tok/s", "gen tok/s b8"], rows)
            L.append("")
    if results:
        kind = results[0].get("memory_kind", "")
        L += ["\\* best logged window of the run (the uncontended speed; runs.jsonl also has "
              "the median). gen tok/s: KV-cache sampling, batch 1, fastest of three; b8: batch 8, "
              "tokens/s per sequence.",
              f"Peak MB: {kind} (CPU: growth of the run process's RSS high-water mark during "
              "training, which includes allocator caching; CUDA: torch max allocated).", ""]

    folded = sorted((r["run_id"], r["same_run_as"]) for r in results if r.get("same_run_as"))
    if folded:
        L += ["Equal wall-clock runs whose config's measured speed is within 5% of the anchor's "
              "were not trained again: the equal-token run stands for each of them "
              f"({len(folded)}: " + ", ".join(f"{a} = {b}" for a, b in folded) + ").", ""]
    if sweep:
        rates = sorted({lr for by_seed in sweep.values() for v in by_seed.values() for lr in v})
        L += [f"## Learning-rate sweep ({corpora[0]}, equal tokens)", "",
              "val loss per peak learning rate; spread = max - min over the rates.", ""]
        rows = []
        for cfg, by_seed in sorted(sweep.items()):
            cells = [fmt([v[lr] for v in by_seed.values() if lr in v]) for lr in rates]
            spread = fmt([max(v.values()) - min(v.values()) for v in by_seed.values()])
            rows.append([cfg, len(by_seed), *cells, spread])
        L += _table(["config", "n", *[f"lr {lr:g}" for lr in rates], "spread"], rows)
        L.append("")
    grad_rows = []
    for (g, c, cfg, init), rs in sorted(groups.items()):
        norms = [r.get("grad_norms_init") for r in rs if r.get("grad_norms_init")]
        if g == "tokens" and c == (corpora[0] if corpora else None) and norms:
            layers = len(norms[0])
            per_layer = [fmt([n[i] for n in norms], 3) for i in range(layers)]
            grad_rows.append([cfg, init, len(norms), fmt([grad_depth_ratio(n) for n in norms]),
                              " / ".join(per_layer)])
    if grad_rows:
        L += [f"## Gradient norms at initialisation ({corpora[0]}, first training batch)", "",
              "Per block, input side first; ratio = first / last block (below 1: gradients "
              "shrink toward the input).", ""]
        L += _table(["config", "init", "n", "first/last", "per block"], grad_rows)
        L.append("")

    claims = claim_rows(groups, corpora, base_init, sweep)
    if claims:
        L += ["## Claims of the seed spec, measured", "",
              "Paired per-seed differences (same seed = same data order and eval windows). "
              "'supported' / 'contradicted' = every seed's difference agrees and the two sides' "
              "spreads over seeds (mean ± std) do not overlap; 'not distinguishable' = seeds "
              "disagree or the spreads overlap (within seed noise at this budget), or, for speed "
              "and memory, the two are less than 5% apart (separately timed runs vary by "
              "that much, and it is too small to choose a shape by).", ""]
        L += _table(["claim", "corpus", "per-seed difference", "verdict"],
                    [[r["claim"], r["corpus"], r["diffs"], r["verdict"]] for r in claims])
        L.append("")
    init_rows = []
    for corpus in corpora:
        for (g, c, cfg, init), rs in sorted(groups.items()):
            if g == "tokens" and c == corpus and any(
                    k[0] == "tokens" and k[1] == corpus and k[2] == cfg and k[3] != init
                    for k in groups):
                quarter = [loss_at_fraction(r, 0.25) for r in rs]
                init_rows.append([corpus, cfg, init, len(rs), fmt([r["val_loss"] for r in rs]),
                                  fmt(quarter), fmt([r["max_grad_norm"] for r in rs], 2)])
    if init_rows:
        L += ["## Initialisation (equal tokens)", "",
              "loss @25% = mean train loss over the logged steps around a quarter of the run.",
              ""]
        L += _table(["corpus", "config", "init", "n", "val loss", "loss @25%",
                     "max grad norm"], init_rows)
        L.append("")
    if images:
        L += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    samples = [(k, rs[0]) for k, rs in sorted(groups.items()) if k[0] == "tokens"]
    if samples:
        L += ["## Samples (seed of the first run, temperature 0.8, top-k 50)", ""]
        for (_, corpus, cfg, init), r in samples:
            text = r["sample"].replace("```", "'''")[:400]
            L += [f"**{corpus} / {cfg} / {init}**", "", "```", text, "```", ""]
    capped = sorted(r["run_id"] for r in results if r.get("stop_reason") != "completed")
    if capped:
        L += ["## Runs that stopped early", "",
              "These stopped before their planned steps (the wall-clock cap: on a shared machine, "
              "a sign of heavy contention). Delete their RUN/result.json and rerun the command "
              "to redo them.", ""]
        L += [f"- {r['run_id']}: {r['steps']} of {r['spec']['max_steps']} steps "
              f"({r.get('stop_reason')}), median {r['tokens_per_s']:,.0f} tok/s"
              for r in sorted(results, key=lambda r: r["run_id"]) if r["run_id"] in capped]
        L.append("")
    if skipped:
        L += ["## Skipped (did not fit the budget)", ""] + [f"- {s}" for s in skipped] + [""]
    if failed:
        L += ["## Failed", ""] + [f"- {f}" for f in failed] + [""]
    L += ["## Settings", "", "```json", json.dumps(settings, indent=1, default=str), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(L), encoding="utf-8")
    return path


