"""The study loop: prepare the corpora, calibrate, plan, run (skipping finished runs), report.

Resume: rerun the same command. Finished runs are skipped, and the run sizes (tokens, minutes)
chosen by the first invocation are kept (REPORT_DIR/plan.json) unless --tokens / --minutes are
given, so a rerun with a new --budget-minutes only decides how many of the remaining runs fit.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from microtransformer.data import load_meta
from microtransformer.device import resolve_device
from microtransformer.fileio import atomic_write_json
from microtransformer.search import seed_model_config
from microtransformer.study.corpora import prepare_corpus
from microtransformer.study.executors import Executor, SubprocessExecutor
from microtransformer.study.measure import measure_throughput
from microtransformer.study.plan import (
    RunSpec,
    StudySettings,
    estimate_seconds,
    fit_to_budget,
    plan_runs,
    size_budget,
    steps_for_tokens,
)
from microtransformer.study.report import write_report


def load_finished(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Results of finished runs in a report dir, by run_id (from RUN/result.json)."""
    done = {}
    for path in sorted((out_dir / "runs").glob("*/result.json")):
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue  # torn write: the run is redone
        done[res["run_id"]] = res
    return done


def run_study(s: StudySettings, out_dir: str | os.PathLike, *, command: str = "",
              executor: Executor | None = None, throughput: dict[str, float] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Plan, run (skipping finished runs) and report. Returns a summary dict.

    `executor` runs the planned runs (default: one local subprocess at a time;
    `executors.SubmititExecutor` hands them to a scheduler). `throughput` (config -> training
    tokens/s) skips the calibration (tests).
    """
    executor = executor or SubprocessExecutor()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = resolve_device(s.device, option="device").type
    s = replace(s, device=device)

    data_dirs = {}
    for corpus in s.corpora:
        log(f"preparing corpus {corpus} ...")
        data_dirs[corpus] = prepare_corpus(corpus, out / "data" / corpus,
                                           vocab_size=s.vocab_size,
                                           max_bytes=int(s.corpus_max_mb * 2**20),
                                           paths=s.corpus_paths, holdout=s.holdout_paths)
    if throughput is None:
        vocab = int(load_meta(data_dirs[s.corpora[0]])["vocab_size"])
        throughput = {c: measure_throughput(seed_model_config(c), vocab_size=vocab,
                                            seq_len=s.seq_len, batch_size=s.batch_size,
                                            device=device) for c in s.configs}
        log("calibrated training throughput (tokens/s): "
            + ", ".join(f"{c} {v:,.0f}" for c, v in throughput.items()))
    fixed_s = time.perf_counter() - t_start
    plan_path = out / "plan.json"
    if plan_path.is_file() and s.tokens is None and s.minutes is None:
        # Resuming: keep the run sizes of the first invocation so finished and new runs match.
        saved = json.loads(plan_path.read_text(encoding="utf-8"))
        tokens, minutes = int(saved["tokens"]), float(saved["minutes"])
        log(f"resuming with the sizes in {plan_path}: {tokens:,} tokens, {minutes:.2f} min")
    else:
        tokens, minutes = size_budget(s, throughput, fixed_s)
        atomic_write_json(plan_path, {"tokens": tokens, "minutes": minutes,
                                       "throughput": throughput})
    runs = plan_runs(s, tokens, minutes, throughput)
    done = load_finished(out)
    budget_s = None if s.budget_minutes is None else s.budget_minutes * 60 - fixed_s
    kept, skipped = fit_to_budget(runs, budget_s, throughput, set(done))
    log(f"plan: {len(runs)} runs ({len(done)} already finished), {tokens:,} tokens per "
        f"equal-token run, {minutes:.2f} min per equal-time run; {len(skipped)} skipped by "
        "the budget")

    results: list[dict[str, Any]] = [done[spec.run_id] for spec in kept if spec.run_id in done]
    failed: list[str] = []
    deadline = None if s.budget_minutes is None else t_start + s.budget_minutes * 60
    measured: dict[str, list[float]] = {}  # config -> tokens/s of its equal-token runs so far

    def note_speed(res: dict[str, Any]) -> None:
        if res["spec"]["group"] == "tokens" and res["spec"]["device"] == device:
            measured.setdefault(res["spec"]["config"], []).append(res["tokens_per_s_best"])

    for res in results:
        note_speed(res)
    finished = {r["run_id"]: r for r in results}
    token_steps = steps_for_tokens(tokens, s.batch_size, s.seq_len)
    anchor = "balanced" if "balanced" in s.configs else s.configs[0]  # as `size_budget`
    todo = [(i, spec) for i, spec in enumerate(kept, start=1) if spec.run_id not in done]

    def next_specs() -> Iterator[RunSpec]:
        """The runs still to do, each decided when the executor asks for it: a one-at-a-time
        executor asks after the previous run, so the deadline and the speeds measured so far
        apply; a scheduler takes them all at once."""
        for i, spec in todo:
            if spec.group == "time" and spec.config in measured:
                # Equal-time steps from this config's measured speed in the equal-token runs
                # so far (best window, median over runs); else the calibration's. When the
                # minutes come from --tokens, the wall-clock is the anchor config's equal-token
                # run's: its speed measured the same way.
                speed = statistics.median(measured[spec.config])
                if s.minutes is None and anchor in measured:
                    steps = round(token_steps * speed / statistics.median(measured[anchor]))
                else:
                    steps = steps_for_tokens(speed * minutes * 60, spec.batch_size,
                                             spec.seq_len)
                spec = replace(spec, max_steps=max(1, steps))
            twin = replace(spec, group="tokens").run_id
            if spec.group == "time" and same_length(spec.max_steps, token_steps) and (
                    twin in finished):
                # Within 5% of the equal-token run's length: that run is this one's equal-time
                # run too (the speeds differ by less than 5%), recorded as such, not retrained.
                folded = fold_time_run(spec, finished[twin], out)
                finished[spec.run_id] = folded
                results.append(folded)
                log(f"[{i}/{len(kept)}] {spec.run_id}: {spec.max_steps} steps is within "
                    f"{TIME_FOLD:.0%} of {twin}'s {token_steps}: that run stands for it")
                continue
            est = estimate_seconds(spec, throughput)
            if deadline is not None and time.perf_counter() + est > deadline:
                skipped.append(spec)  # the runs so far took longer than planned
                continue
            log(f"[{i}/{len(kept)}] {spec.run_id}: {spec.max_steps} steps"
                + (f", cap {spec.max_minutes:.2f} min" if spec.max_minutes else "")
                + ("" if executor.name == "subprocess" else f" -> {executor.name}"))
            yield spec

    for spec, outcome in executor.run(next_specs(), data_dirs, out):
        if isinstance(outcome, Exception):
            failed.append(f"{spec.run_id}: {str(outcome)[:300]}")
            log(f"  {spec.run_id} FAILED: {str(outcome)[:300]}")
            continue
        log(f"  {spec.run_id}: val loss {outcome['val_loss']:.4f}, "
            f"{outcome['tokens_per_s_best']:,.0f} tok/s")
        results.append(outcome)
        finished[spec.run_id] = outcome
        note_speed(outcome)

    settings = {**asdict(s), "tokens_per_run": tokens, "minutes_per_time_run": minutes,
                "throughput_estimate": throughput}
    # The report covers every finished run in the directory (earlier invocations too).
    every = {**load_finished(out), **{r["run_id"]: r for r in results}}
    report = write_report(out, list(every.values()), settings=settings, command=command,
                          skipped=[r.run_id for r in skipped], failed=failed,
                          elapsed_s=time.perf_counter() - t_start)
    return {"report": report, "results": results, "skipped": skipped, "failed": failed}


TIME_FOLD = 0.05  # an equal-time run this close in steps to its equal-token run is that run


def same_length(time_steps: int, token_steps: int) -> bool:
    """True when an equal-time run's steps are within TIME_FOLD of the equal-token run's (the
    config's measured speed is within 5% of the anchor's): one run serves both comparisons."""
    return abs(time_steps - token_steps) <= TIME_FOLD * token_steps


def fold_time_run(spec: RunSpec, twin: dict[str, Any], out: Path) -> dict[str, Any]:
    """The record of an equal-time run that its equal-token twin stands for: the twin's
    measurements under the time run's id and spec, with `same_run_as` naming the twin. Written
    to RUN/result.json like a trained run, so a rerun skips it."""
    record = {**twin, "run_id": spec.run_id, "spec": asdict(spec),
              "same_run_as": twin["run_id"]}
    atomic_write_json(out / "runs" / spec.run_id / "result.json", record)
    return record


def shell_command(argv: Sequence[str]) -> str:
    """The command line as one copy-pasteable string."""
    return "microtransformer study " + " ".join(shlex.quote(a) for a in argv)


