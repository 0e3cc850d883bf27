"""`microtransformer study`: train the seed's configurations on code and narrative text, compare.

Example (CPU, about 25 minutes):
    flock /tmp/mt-heavy.lock microtransformer study --budget-minutes 25 --out study_report
With local copies of the corpora instead of the named sources (paths relative to the repo):
    microtransformer study --corpora code,stories,novels \
        --corpus stories=../shared/data/tinystories --corpus novels=../shared/data/gutenberg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from microtransformer.data import DATASETS
from microtransformer.errors import UserError
from microtransformer.study import (
    StudySettings,
    corpus_sources,
    holdout_files,
    parse_corpus_paths,
    parse_holdout_paths,
    plan_runs,
    run_study,
    shell_command,
)
from microtransformer.study.executors import (
    CLUSTERS,
    Executor,
    SubmititExecutor,
    SubprocessExecutor,
)


def _names(text: str, flag: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise UserError(f"{flag}={text!r} lists nothing; give comma-separated names")
    return items


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _names(text, flag))
    except ValueError:
        raise UserError(f"{flag}={text!r} must be comma-separated integers, e.g. 0,1") from None


def _number(text: str | None, flag: str, kind: type = float) -> float | int | None:
    if text is None:
        return None
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise UserError(f"{flag}={text!r} is not a number") from None
    return round(value) if kind is int else value


def _multiples(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("none", ""):
        return ()
    try:
        return tuple(float(x) for x in _names(text, "--lr-sweep"))
    except ValueError:
        raise UserError(f"--lr-sweep={text!r} must be comma-separated numbers, e.g. 0.5,2, "
                        "or none") from None


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add the `study` subcommand."""
    p = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="wide_shallow,narrow_deep,balanced",
                   help="seed presets to compare (default all three)")
    p.add_argument("--inits", default="kaiming,gpt2",
                   help="inits; the first is used for every run, the others only on "
                        "--init-configs (default kaiming,gpt2)")
    p.add_argument("--init-configs", default="narrow_deep",
                   help="configs that also train with the other inits (default narrow_deep)")
    p.add_argument("--corpora", default="code,stories",
                   help="code (Python stdlib), stories (named source tinystories), "
                        "shakespeare (named source tinyshakespeare), novels (needs --corpus)")
    p.add_argument("--corpus", action="append", default=[], metavar="NAME=PATH",
                   help="read corpus NAME from a local file, directory or glob instead of its "
                        "named source, e.g. stories=../shared/data/tinystories (repeatable)")
    p.add_argument("--holdout", action="append", default=[], metavar="NAME=PATH",
                   help="files that are corpus NAME's validation text, whole, never trained on "
                        "(e.g. novels=../shared/data/gutenberg/frankenstein.txt: a book held "
                        "out of the novels; taken out of the corpus's directory; repeatable)")
    p.add_argument("--seeds", default="0,1", help="seeds (default 0,1)")
    p.add_argument("--compare", default="tokens,time",
                   help="comparisons: tokens (equal tokens), time (equal wall-clock)")
    p.add_argument("--tokens", default=None, help="training tokens per equal-token run, e.g. 2e5")
    p.add_argument("--minutes", default=None, help="wall-clock minutes per equal-time run")
    p.add_argument("--budget-minutes", default=None,
                   help="bound on the whole study; runs are sized (or dropped) to fit")
    p.add_argument("--seq-len", default="256", help="context length T (default 256)")
    p.add_argument("--batch-size", default="16", help="sequences per step (default 16)")
    p.add_argument("--lr", default="1e-3", help="peak learning rate (default 1e-3)")
    p.add_argument("--recipe", default="plain",
                   help="optimisation recipe applied to every run: plain (AdamW, cosine to "
                        "lr/10) or a preset's [train] recipe, e.g. cpu_bpe (Muon + AdamW, wsd; "
                        "use its --lr 4e-3)")
    p.add_argument("--lr-sweep", default="0.5,2",
                   help="other learning rates, as multiples of --lr, trained per config on the "
                        "first corpus at equal tokens (default 0.5,2: three rates with the "
                        "base); 'none' for no sweep")
    p.add_argument("--dropout", default="0.0", help="dropout (default 0: single-epoch runs)")
    p.add_argument("--vocab-size", default="5000", help="BPE vocab per corpus (default 5000)")
    p.add_argument("--corpus-max-mb", default="8",
                   help="text used per corpus, MiB (code and novels; default 8)")
    p.add_argument("--eval-windows", default="128", help="val windows for the final eval")
    p.add_argument("--out", default="study_report", help="report directory (resumable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--executor", default="subprocess", choices=("subprocess", "submitit"),
                   help="where runs execute: subprocess (one at a time on this machine, the "
                        "default) or submitit (every run as a job of a scheduler; see --cluster)")
    p.add_argument("--cluster", default="slurm", choices=CLUSTERS,
                   help="with --executor submitit: slurm, or local (submitit's executor on this "
                        "machine), or debug (in this process)")
    p.add_argument("--timeout-min", default="240", help="submitit: time limit per job, minutes")
    p.add_argument("--cpus-per-task", default="2", help="submitit: CPU cores per job")
    p.add_argument("--gpus-per-node", default="0", help="submitit/Slurm: GPUs per job")
    p.add_argument("--max-parallel", default="16", help="submitit/Slurm: jobs running at once")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="submitit/Slurm: a slurm_* parameter, e.g. partition=gpu or "
                        "account=proj (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the settings and the corpora's sources and list the planned "
                        "runs; prepare, calibrate and train nothing")
    p.set_defaults(func=run)


def executor(args: argparse.Namespace) -> Executor:
    """The executor the flags ask for (the submitit options are checked even when unused)."""
    slurm = {}
    for item in args.slurm:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm {item!r} must be KEY=VALUE, e.g. --slurm partition=gpu")
        slurm[key.strip()] = value
    options = dict(cluster=args.cluster, timeout_min=_number(args.timeout_min, "--timeout-min",
                                                              int),
                   cpus_per_task=_number(args.cpus_per_task, "--cpus-per-task", int),
                   gpus_per_node=_number(args.gpus_per_node, "--gpus-per-node", int),
                   max_parallel=_number(args.max_parallel, "--max-parallel", int), slurm=slurm)
    submitit_executor = SubmititExecutor(**options)  # validates the options
    return submitit_executor if args.executor == "submitit" else SubprocessExecutor()


def dry_run(settings: Any) -> int:
    """`study --dry-run`: the settings are valid (checked when built), every corpus resolves
    to text here, and this is the list of runs; run sizes come from the calibration."""

    for corpus in settings.corpora:
        sources, _ = corpus_sources(corpus, int(settings.corpus_max_mb * 2**20),
                                    settings.corpus_paths, settings.holdout_paths)
        held = holdout_files(corpus, settings.holdout_paths)
        if held:
            print(f"corpus {corpus} is scored on {len(held)} held-out file(s): "
                  + ", ".join(Path(h).name for h in held))
        named = [s for s in sources if s in DATASETS]
        print(f"corpus {corpus}: {', '.join(sources[:3])}"
              + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
              + (" (named dataset: downloaded once into the cache)" if named else ""))
    tokens = settings.tokens or 0
    runs = plan_runs(settings, tokens, settings.minutes or 0.0,
                     dict.fromkeys(settings.configs, 1.0))
    sizes = (f"{tokens:,} tokens per equal-token run" if settings.tokens else
             "run sizes from the calibration" + (f" within {settings.budget_minutes:g} min"
                                                 if settings.budget_minutes else ""))
    print(f"plan: {len(runs)} runs ({sizes}): " + ", ".join(r.run_id for r in runs))
    print("dry run: settings and corpora checked; nothing prepared, calibrated or trained")
    return 0


def run(args: argparse.Namespace) -> int:
    """Build the settings, run the study, print where the report is."""
    settings = StudySettings(
        configs=_names(args.configs, "--configs"), inits=_names(args.inits, "--inits"),
        init_configs=_names(args.init_configs, "--init-configs"),
        corpora=_names(args.corpora, "--corpora"),
        corpus_paths=parse_corpus_paths(args.corpus),
        holdout_paths=parse_holdout_paths(args.holdout), seeds=_ints(args.seeds, "--seeds"),
        compare=_names(args.compare, "--compare"),
        tokens=_number(args.tokens, "--tokens", int),
        minutes=_number(args.minutes, "--minutes"),
        budget_minutes=_number(args.budget_minutes, "--budget-minutes"),
        seq_len=_number(args.seq_len, "--seq-len", int),
        batch_size=_number(args.batch_size, "--batch-size", int),
        lr=_number(args.lr, "--lr"), dropout=_number(args.dropout, "--dropout"),
        lr_sweep=_multiples(args.lr_sweep), recipe=args.recipe,
        vocab_size=_number(args.vocab_size, "--vocab-size", int),
        corpus_max_mb=_number(args.corpus_max_mb, "--corpus-max-mb"),
        eval_windows=_number(args.eval_windows, "--eval-windows", int),
        device=args.device,
    )
    chosen = executor(args)
    if args.dry_run:
        return dry_run(settings)
    # The exact command, every option spelled out (so it reruns the same study).
    argv = []
    for key, value in sorted(vars(args).items()):
        if key in ("func", "command") or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += [f"--{key.replace('_', '-')}", str(item)]
    out = run_study(settings, args.out, command=shell_command(argv), executor=chosen)
    print(f"report: {out['report']}")
    if out["skipped"]:
        print(f"{len(out['skipped'])} run(s) skipped by the budget (listed in the report)")
    if out["failed"]:
        print(f"{len(out['failed'])} run(s) failed (listed in the report)", file=sys.stderr)
        return 1
    return 0
