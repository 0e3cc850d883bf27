"""Architecture study: train the seed's configurations on code and narrative text and compare them.

`microtransformer study` plans a list of runs, prepares each corpus once, trains every run with the
project's one training loop (`microtransformer.training.train`) in its own subprocess (so peak
memory is measured per run and a crash costs one run), evaluates it and writes a report.

One module per reason to change:

    corpora.py   which text each corpus is (named sources, the stdlib, --corpus NAME=PATH)
    plan.py      settings, the runs in priority order, their sizes and the budget
    measure.py   loss by position, peak memory, throughput
    worker.py    one run: train, evaluate, measure, write RUN/result.json (in a subprocess)
    runner.py    the study loop: prepare, calibrate, plan, run, resume
    stats.py     mean ± std, paired differences, the seed spec's claims and verdicts
    report.py    report.md and runs.jsonl
    plots.py     the PNG plots

Per run (`RUN/result.json`, also appended to `runs.jsonl`): val loss and bits per byte on fixed
val windows, loss by position in the context window, training tokens/s and step time, peak memory
(CUDA max allocated, or peak RSS growth of the run's process on CPU), KV-cache generation speed,
the loss curve and a sample text. A run whose result.json exists is skipped on rerun.

Every public name is importable from `microtransformer.study` itself.
"""

from microtransformer.study.corpora import (
    CORPORA,
    Corpus,
    corpus_sources,
    holdout_files,
    parse_corpus_paths,
    parse_holdout_paths,
    prepare_corpus,
)
from microtransformer.study.executors import SubmititExecutor, SubprocessExecutor
from microtransformer.study.measure import (
    BUCKET,
    PeakMemory,
    loss_by_position,
    measure_throughput,
    position_buckets,
    smooth_positions,
)
from microtransformer.study.plan import (
    OVERHEAD_S,
    TIME_CAP,
    RunSpec,
    StudySettings,
    estimate_seconds,
    fit_to_budget,
    plan_runs,
    size_budget,
    steps_for_tokens,
)
from microtransformer.study.plots import COLORS, write_plots
from microtransformer.study.report import write_report
from microtransformer.study.runner import (
    TIME_FOLD,
    load_finished,
    run_study,
    same_length,
    shell_command,
)
from microtransformer.study.stats import (
    CLAIMS,
    Claim,
    balanced_rank,
    claim_rows,
    fmt,
    grad_depth_ratio,
    group_results,
    loss_at_fraction,
    lr_sweep_losses,
    mean_std,
    paired_diffs,
    spreads_overlap,
    verdict,
)
from microtransformer.study.worker import execute_run, run_in_subprocess

__all__ = [
    "BUCKET",
    "CLAIMS",
    "COLORS",
    "CORPORA",
    "OVERHEAD_S",
    "TIME_CAP",
    "TIME_FOLD",
    "Claim",
    "Corpus",
    "PeakMemory",
    "RunSpec",
    "StudySettings",
    "SubmititExecutor",
    "SubprocessExecutor",
    "balanced_rank",
    "claim_rows",
    "corpus_sources",
    "estimate_seconds",
    "execute_run",
    "fit_to_budget",
    "fmt",
    "grad_depth_ratio",
    "group_results",
    "holdout_files",
    "load_finished",
    "loss_at_fraction",
    "loss_by_position",
    "lr_sweep_losses",
    "mean_std",
    "measure_throughput",
    "paired_diffs",
    "parse_corpus_paths",
    "parse_holdout_paths",
    "plan_runs",
    "position_buckets",
    "prepare_corpus",
    "run_in_subprocess",
    "run_study",
    "same_length",
    "shell_command",
    "size_budget",
    "smooth_positions",
    "spreads_overlap",
    "steps_for_tokens",
    "verdict",
    "write_plots",
    "write_report",
]
