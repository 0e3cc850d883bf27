"""`microtransformer train`: train a model into a run directory (resumable)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from microtransformer import checkpoint as ckpt
from microtransformer import distributed, finetune
from microtransformer.config import (
    ResolvedConfig,
    RunConfig,
    add_override_arguments,
    collect_overrides,
    load_config,
    parse_overrides,
    preset_path,
    read_config_file,
    read_toml,
    resolve_config,
)
from microtransformer.data import load_meta
from microtransformer.device import resolve_device, resolve_dtype
from microtransformer.distributed import RuntimeContext, restart_count
from microtransformer.errors import UserError
from microtransformer.recipe import (
    Recipe,
    choose_recipe,
    needs_speed,
    preset_for,
    this_machine,
)
from microtransformer.rundata import adapt_to_dataset, prepare_data, require_data_dir
from microtransformer.schedule import budget_spent, parse_duration
from microtransformer.speed_probe import probe_training_speed
from microtransformer.throughput.mfu import format_mfu, run_mfu
from microtransformer.training import resolve_batch_size, resolve_threads, train
from model.io import CONFIG_FILE
from model.utils import parameter_formula

EPILOG = """examples:
  microtransformer train --data data/shakespeare --out runs/budget --time 15m
      # no preset: picks one for the data's tokenizer, size and this machine, says why
  microtransformer prepare tinyshakespeare --tokenizer char --val-tail 0.1 --out data/shakespeare
  microtransformer train --data data/shakespeare --out runs/shakespeare --preset balanced \\
      --model.max_seq_len 128 --train.max_steps 500 --train.batch_size 16
  microtransformer train --out runs/shakespeare --resume          # continue where it stopped
  microtransformer train --init-from runs/shakespeare --data data/mine --out runs/ft
      # fine-tune (docs/FINETUNE.md): weights, architecture and tokenizer from the parent
  torchrun --nproc_per_node 2 -m microtransformer train --data data/shakespeare --out runs/ddp
      # data parallel (docs/DISTRIBUTED.md): train.batch_size is the global micro-batch
Config precedence: defaults < --preset < --config FILE < --section.key overrides.
"""


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add the `train` subcommand."""
    p = subparsers.add_parser(
        name, help=help_text, description=help_text, epilog=EPILOG, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", metavar="DATA_DIR",
                   help="prepared data directory (from `microtransformer prepare`); default: "
                        "prepare [data] sources (empty: the Python stdlib corpus) into OUT/data")
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run directory for config, checkpoints, metrics and plots")
    p.add_argument("--config", metavar="FILE", help="TOML (or JSON) config file")
    p.add_argument("--preset", metavar="NAME",
                   help="preset shipped in the package (wide_shallow, narrow_deep, balanced, "
                        "cpu_char, cpu_bpe; `microtransformer configs --presets` lists them)")
    p.add_argument("--time", metavar="DURATION",
                   help="training-time budget, e.g. 15m, 90s, 1h (= --train.max_time_minutes): "
                        "the LR schedule ends decayed when it is spent; without --preset or "
                        "--config a recipe is chosen for the data and the machine")
    p.add_argument("--init-from", metavar="SOURCE",
                   help="fine-tune: start from the weights of this run, model directory or "
                        "Hugging Face GPT-2 directory (= --train.init_from; its best weights "
                        "when a run has them, see --train.init_weights); the architecture and "
                        "the tokenizer are the parent's, lr and warm-up adapt for fine-tuning "
                        "(docs/FINETUNE.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN_DIR's run from its last checkpoint (reuses its config)")
    p.add_argument("--switch-data", action="store_true",  # checked in training.train
                   help="with --resume: continue on another dataset (same tokenizer); recorded")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (plain log lines instead)")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and check everything (config, data, what adapts and why) and "
                        "print the plan; train nothing, write nothing")
    add_override_arguments(p)
    p.set_defaults(func=run)


def resolve_run_config(args: argparse.Namespace) -> ResolvedConfig:
    """The run's config from the CLI args, with where each value came from.

    Typed: `--section.key` overrides, `--time` (= train.max_time_minutes) and `--data`. Not
    typed, so adapted to the run and the data with a note: defaults, `--preset`, `--config`,
    the budget recipe's choices, and on `--resume` the run's saved config.
    """
    overrides = collect_overrides(args)
    minutes = None
    if args.time is not None:
        try:
            minutes = parse_duration(args.time)
        except ValueError as exc:
            raise UserError(f"--time: {exc}") from None
        overrides.insert(0, f"--train.max_time_minutes={minutes:g}")
    if args.init_from is not None:
        overrides.insert(0, f"--train.init_from={Path(args.init_from).resolve()}")
    typed = parse_overrides(overrides)
    init_from = typed.get("train.init_from")
    layers: list[tuple[str, dict[str, Any]]] = []
    if minutes is not None and not (args.preset or args.config or args.resume or init_from):
        recipe = budget_recipe(args.data, minutes, overrides)
        if os.environ.get("RANK", "0") == "0":  # once, not from every torchrun worker
            print(recipe.reason, flush=True)
            note = recipe.typed_note(typed)
            if note:
                print(note, flush=True)
        args.preset = recipe.preset
        layers.append(("the budget recipe", recipe.sections()))
    run_dir = Path(args.out)
    if args.resume:
        saved = run_dir / CONFIG_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist; start the run "
                                    "without --resume")
        base = RunConfig.load_json(saved)
        if init_from is not None and str(Path(str(init_from)).resolve()) != str(
                Path(str(base.train.init_from)).resolve()):
            raise UserError(f"cannot resume {run_dir} --init-from {init_from}: a resumed run "
                            "continues from its own checkpoint"
                            + (f" (it was started from {base.train.init_from})"
                               if base.train.init_from else "")
                            + "; drop --init-from, or start a new run with another --out")
        if args.config or args.preset:
            resolved = resolve_config(args.config, args.preset, overrides, layers=layers)
        else:
            resolved = resolve_config(None, None, overrides, base=base)
        cfg = resolved.config
        if args.data is None:
            cfg = cfg.replace(data=replace(cfg.data, data_dir=base.data.data_dir))
        model_cfg = cfg.model if "model.vocab_size" in resolved.typed else replace(
            cfg.model, vocab_size=base.model.vocab_size)
        if model_cfg != base.model:
            raise UserError(
                f"cannot resume {run_dir} with a different model: saved {base.model}, "
                f"requested {model_cfg}; drop the --model.* overrides or use a new --out"
            )
        resolved = resolved.with_notes(cfg.replace(model=model_cfg))
    else:
        if (run_dir / ckpt.STATE_FILE).is_file():
            raise UserError(f"{run_dir} already holds a training run; add --resume to continue "
                            "it or choose another --out")
        if init_from is not None:
            resolved = resolve_finetune(args, str(init_from), overrides)
        else:
            resolved = resolve_config(args.config, args.preset, overrides, layers=layers)
    if args.data is not None:
        cfg = resolved.config
        resolved = resolved.with_notes(cfg.replace(data=replace(cfg.data, data_dir=args.data)))
    return resolved


def resolve_finetune(args: argparse.Namespace, init_from: str, overrides: list[str]
                     ) -> ResolvedConfig:
    """A fresh `--init-from` run's config: the parent's model and (a run's) training recipe
    are the base that a preset, a config file and typed values go on top of; then the
    architecture is the parent's (`finetune.adapt_to_parent`) and the values nobody typed
    adapt for fine-tuning (`finetune.finetune_layer`), each with a note."""

    typed = parse_overrides(overrides)
    parent = finetune.read_parent(init_from, str(typed.get("train.init_weights", "auto")))
    finetune.check_typed_architecture(typed, parent)
    origin = f"the parent {parent.path}"
    layers = [(f"--init-from {parent.path}", {"model": parent.model.to_dict()})]
    replaced = finetune.replaced_by_parent(
        [(f"preset {args.preset!r}", read_toml(preset_path(args.preset))) if args.preset
         else None, (f"config file {args.config}", read_config_file(args.config))
         if args.config else None], parent)
    base = finetune.parent_base(parent)
    first = resolve_config(args.config, args.preset, overrides, layers=layers, base=base,
                           base_origin=origin)
    defaults, notes = finetune.finetune_layer(first)  # adapted from what it would be
    layers.append(("fine-tuning defaults", defaults))
    resolved = resolve_config(args.config, args.preset, overrides, layers=layers, base=base,
                              base_origin=origin)
    resolved = resolved.with_notes(resolved.config, [*replaced, *notes])
    return finetune.adapt_to_parent(finetune.without_base_data_origins(resolved, origin), parent)


def check_parent_data(cfg: RunConfig) -> None:
    """Before a fresh fine-tune prepares or adapts to its data: the data must be the parent's
    tokenizer's (one line with the `prepare --tokenizer-from` command otherwise)."""

    if cfg.train.init_from is None or cfg.data.data_dir is None:
        return
    meta = load_meta(require_data_dir(cfg.data.data_dir))
    parent = finetune.read_parent(cfg.train.init_from, cfg.train.init_weights)
    finetune.check_data_tokenizer(parent, cfg.data.data_dir, meta)


def budget_recipe(data: str | None, minutes: float, overrides: list[str]) -> Recipe:
    """The recipe `--time` picks without a preset: from the prepared data's meta.json, or
    (when the data is prepared by this run) from the requested tokenizer kind; with the
    preset's training speed measured on this machine (the user's overrides applied) when the
    passes over the data count, except under torchrun (`recipe.MEASURED_TOKENS_PER_S`)."""

    if data is not None:
        meta = load_meta(require_data_dir(data))
    else:
        tokenizer = load_config(None, None, overrides).data.tokenizer
        meta = {"kind": tokenizer, "tokens": {}}
    machine = this_machine()
    if not needs_speed(meta) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return choose_recipe(meta, minutes, machine)
    cfg = load_config(None, preset_for(meta), overrides)
    cfg = cfg.replace(model=replace(cfg.model, vocab_size=int(meta["vocab_size"])))
    probe = probe_training_speed(cfg)
    return choose_recipe(meta, minutes, machine, probe.tokens_per_s, probe.describe())


def plan_text(cfg: RunConfig, meta: dict[str, Any] | None, ctx: Any, *,
                resuming: Path | None = None) -> str:
    """The three lines `train` prints before training: model, data, and the step plan.
    `meta` None: the data is still to be prepared into the run."""

    tc, mc = cfg.train, cfg.model
    device = ctx.device
    dtype = resolve_dtype(tc.dtype, device)
    tokens_per_step = tc.batch_size * tc.grad_accum_steps * cfg.seq_len
    budget = f"{tc.max_steps} steps"
    if tc.max_time_minutes is not None:
        budget = f"{tc.max_time_minutes:g} min of training (at most {tc.max_steps} steps)"
    threads = f", {resolve_threads(tc.cpu_threads)} threads" if device.type == "cpu" else ""
    local_batch = distributed.per_rank_batch(tc.batch_size, ctx.world_size)
    procs = f"{ctx.world_size} process" + ("es" if ctx.world_size > 1 else "")
    where = (f"{procs} ({ctx.backend}), {local_batch} sequences per process per micro-step"
             if ctx.backend else "1 process")
    d = cfg.data
    data = (f"data: {d.data_dir} ({meta['kind']} tokenizer, {meta['tokens']['train']:,} train "
            f"/ {meta['tokens']['val']:,} val tokens)" if meta is not None else
            f"data: to be prepared from {', '.join(d.sources) or 'the Python stdlib corpus'} "
            + (f"(val: {', '.join(d.val_sources)}) " if d.val_sources else "") +
            f"({d.tokenizer} tokenizer, vocab "
            f"{d.vocab_size if d.vocab_size is not None else 'by the text size'}); "
            "model.vocab_size and the window then follow it")
    return (f"model: {parameter_formula(mc):,} parameters (embed {mc.embed_dim}, "
            f"{mc.num_layers} layers, {mc.num_heads} heads, ff {mc.ff_dim}, context "
            f"{mc.max_seq_len}, vocab {mc.vocab_size}"
            + "".join(f", {v}" for v in mc.departures) + f")\n{data}\n"
            f"train: {budget} x {tokens_per_step:,} tokens/step (global batch "
            f"{tc.batch_size} x {tc.grad_accum_steps} accum = "
            f"{tc.batch_size * tc.grad_accum_steps} sequences of {cfg.seq_len}; {where}), "
            f"{tc.optimizer} lr {tc.lr:g} ({tc.schedule}"
            f"{'; weights averaged over the decay' if tc.average_cooldown else ''}), "
            f"warm-up {tc.warmup} steps, device "
            f"{device} ({str(dtype).replace('torch.', '')}{threads})"
            + (f", resuming from {resuming}" if resuming else ""))


def dry_run(resolved: ResolvedConfig, run_dir: Path, *, resuming: bool = False) -> int:
    """`train --dry-run`: resolve the config against the data (without preparing any), check
    it, print what would be adapted and the plan. Nothing is trained or written."""

    data_dir = resolved.config.data.data_dir
    if data_dir is None and (run_dir / "data" / "meta.json").is_file():
        data_dir = str(run_dir / "data")  # prepared by an earlier call of this run
    meta = None
    if not resuming:
        check_parent_data(resolved.config)
    if data_dir is not None:
        resolved, meta = adapt_to_dataset(resolved, data_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: check the batch split
    ctx = RuntimeContext(world_size=world, device=resolve_device(resolved.config.train.device),
                         backend="torchrun" if world > 1 else None)
    cfg = resolve_batch_size(resolved.config, ctx)
    if os.environ.get("RANK", "0") != "0":
        return 0
    for note in resolved.notes:
        print(f"note: {note}")
    print(plan_text(cfg, meta, ctx, resuming=run_dir if resuming else None))
    print("dry run: config resolved and checked; nothing trained or written (drop --dry-run "
          "to train)")
    return 0


def finished_note(run_dir: Path, cfg: RunConfig) -> str | None:
    """The line `train --resume` prints, instead of training, when the run in `run_dir` has
    already spent its budget under `cfg` (None when there is training left to do, or when its
    last checkpoint is not intact: the resume then falls back or refuses, and says why)."""

    if not (run_dir / ckpt.STATE_FILE).is_file():
        return None
    try:  # the checkpoint as the resume would take it: verified, no fallback needed
        point = ckpt.find_resume_point(run_dir, cleanup=False)
    except (OSError, ValueError):
        return None
    if not point.is_current:
        return None  # damaged files: the resume falls back, says so and goes on
    state = point.state
    step, spent = int(state["step"]), float(state.get("train_time_s", 0.0))
    if step > cfg.train.max_steps or not budget_spent(step, cfg.train, spent):
        return None  # a max_steps below the step reached is refused by the resume itself
    return (f"{run_dir} has already finished: step {step} of max_steps="
            f"{cfg.train.max_steps}" + (f", {spent / 60:.1f} of {cfg.train.max_time_minutes:g} "
                                        "min of training" if cfg.train.max_time_minutes else "")
            + "; nothing to resume. To train longer, raise the budget: --resume "
              "--train.max_steps N or --resume --time DURATION")


def restart_resume(args: argparse.Namespace) -> str | None:
    """After torchrun restarted the workers (--max-restarts), continue from RUN_DIR's checkpoint.

    torchrun relaunches every worker with the original arguments; when TORCHELASTIC_RESTART_COUNT
    is above 0 and a checkpoint exists, `args.resume` is switched on. Returns the log line to
    print (None when this is not a restart).
    """

    restarts = restart_count()
    if restarts == 0:
        return None
    state_path = Path(args.out) / ckpt.STATE_FILE
    if not state_path.is_file():
        return f"restart {restarts}: no checkpoint in {args.out} yet; starting from step 0"
    step = int(ckpt.load_training_state(state_path)["step"])
    args.resume = True
    return f"restart {restarts}: resuming from step {step}"


def run(args: argparse.Namespace) -> int:
    """Resolve the config, prepare data if needed, train, print a summary.

    Under torchrun every process runs this; the process group lives for the duration of
    `distributed.runtime` and only rank 0 prints.
    """

    restart_note = restart_resume(args)
    resolved = resolve_run_config(args)
    run_dir = Path(args.out)
    if (args.resume and args.data is None and not args.switch_data
            and (done := finished_note(run_dir, resolved.config)) is not None):
        if os.environ.get("RANK", "0") == "0":
            print(done, flush=True)
        return 0
    if args.dry_run:
        return dry_run(resolved, run_dir, resuming=args.resume)
    if not args.resume:
        check_parent_data(resolved.config)
    with distributed.runtime(resolved.config.train.device) as ctx:
        show = ctx.is_main
        progress = not args.no_progress and show
        if restart_note and show:
            print(restart_note, flush=True)
        # rank 0 prepares (when sources are given), the others then find the data ready
        resolved = distributed.in_turns(lambda: prepare_data(
            resolved, run_dir, progress=progress), ctx)
        cfg = resolved.config
        if show:
            for note in resolved.notes:
                print(f"note: {note}", flush=True)
        meta = load_meta(cfg.data.data_dir)
        cfg = resolve_batch_size(cfg, ctx)  # "auto": sized to the CUDA card (else an error)
        if show:
            print(plan_text(cfg, meta, ctx, resuming=run_dir if args.resume else None),
                  flush=True)
        result = train(cfg, run_dir, resume=args.resume, progress=progress, ctx=ctx,
                       notes=resolved.notes, switch_data=args.switch_data)
        mfu = run_mfu(result.tokens_per_s, ctx.world_size, cfg.model, cfg.seq_len, ctx.device)
    if not show:
        return 0

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    print(
        f"\n{result.stop_reason}: step {result.step}/{result.max_steps}, "
        f"{result.tokens_seen:,} tokens, {result.elapsed_s:.1f}s, "
        f"{result.tokens_per_s:,.0f} tokens/s\n"
        f"time: {result.train_time_s:.1f}s of training in the run (the budget's clock), "
        f"{result.eval_time_s:.1f}s of evaluation and checkpoints in this call (not counted)\n"
        f"best val loss {fmt(result.best_val_loss)} (bpb {fmt(result.best_val_bpb)}), "
        f"last val loss {fmt(result.final_val_loss)}\n"
        f"{format_mfu(mfu)}\n"
        f"run directory: {run_dir} (model.safetensors, best.safetensors, state.pt, "
        "metrics.jsonl, loss.png)"
    )
    if result.interrupted:
        launcher = "torchrun ... -m microtransformer" if ctx.distributed else "microtransformer"
        print(f"checkpoint saved at step {result.step}; resume with:\n"
              f"  {launcher} train --out {run_dir} --resume")
    else:
        print(f"sample with: microtransformer generate {run_dir} --prompt \"...\"")
    return 0
