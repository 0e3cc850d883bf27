"""`microtransformer train`: train a model into a run directory (resumable)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from microtransformer import checkpoint as ckpt
from microtransformer.config import (
    RunConfig,
    add_override_arguments,
    collect_overrides,
    load_config,
    override_keys,
)
from microtransformer.errors import UserError

EPILOG = """examples:
  microtransformer prepare tinyshakespeare --tokenizer char --val-tail 0.1 --out data/shakespeare
  microtransformer train --data data/shakespeare --out runs/shakespeare --preset balanced \\
      --model.max_seq_len 128 --train.max_steps 500 --train.batch_size 16
  microtransformer train --out runs/shakespeare --resume          # continue where it stopped
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
                   help="preset from configs/ (wide_shallow, narrow_deep, balanced, ...)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN_DIR's run from its last checkpoint (reuses its config)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (plain log lines instead)")
    add_override_arguments(p)
    p.set_defaults(func=run)


def resolve_run_config(args: argparse.Namespace) -> tuple[RunConfig, bool]:
    """The run's config from the CLI args -> (config, whether model.vocab_size was explicit)."""
    overrides = collect_overrides(args)
    explicit = override_keys(overrides)
    run_dir = Path(args.out)
    if args.resume:
        saved = run_dir / ckpt.CONFIG_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist; start the run "
                                    "without --resume")
        base = RunConfig.load_json(saved)
        if args.config or args.preset:
            cfg = load_config(args.config, args.preset, overrides)
        else:
            cfg = load_config(None, None, overrides, base=base)
        if args.data is None:
            cfg = cfg.replace(data=replace(cfg.data, data_dir=base.data.data_dir))
        model_cfg = cfg.model if "model.vocab_size" in explicit else replace(
            cfg.model, vocab_size=base.model.vocab_size)
        if model_cfg != base.model:
            raise UserError(
                f"cannot resume {run_dir} with a different model: saved {base.model}, "
                f"requested {model_cfg}; drop the --model.* overrides or use a new --out"
            )
        cfg = cfg.replace(model=model_cfg)
    else:
        if (run_dir / ckpt.STATE_FILE).is_file():
            raise UserError(f"{run_dir} already holds a training run; add --resume to continue "
                            "it or choose another --out")
        cfg = load_config(args.config, args.preset, overrides)
    if args.data is not None:
        cfg = cfg.replace(data=replace(cfg.data, data_dir=args.data))
    return cfg, "model.vocab_size" in explicit


def restart_resume(args: argparse.Namespace) -> str | None:
    """After torchrun restarted the workers (--max-restarts), continue from RUN_DIR's checkpoint.

    torchrun relaunches every worker with the original arguments; when TORCHELASTIC_RESTART_COUNT
    is above 0 and a checkpoint exists, `args.resume` is switched on. Returns the log line to
    print (None when this is not a restart).
    """
    from microtransformer.distributed import restart_count

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
    from microtransformer import distributed
    from microtransformer.data import load_meta
    from microtransformer.device import resolve_dtype
    from microtransformer.training import prepare_data, train
    from model.utils import parameter_formula

    restart_note = restart_resume(args)
    cfg, explicit_vocab = resolve_run_config(args)
    run_dir = Path(args.out)
    with distributed.runtime(cfg.train.device) as ctx:
        show = ctx.is_main
        progress = not args.no_progress and show
        if restart_note and show:
            print(restart_note, flush=True)
        # rank 0 prepares (when sources are given), the others then find the data ready
        cfg = distributed.in_turns(lambda: prepare_data(
            cfg, run_dir, explicit_vocab=explicit_vocab, progress=progress), ctx)
        meta = load_meta(cfg.data.data_dir)
        tc, mc = cfg.train, cfg.model
        local_batch = distributed.per_rank_batch(tc.batch_size, ctx.world_size)
        device = ctx.device
        dtype = resolve_dtype(tc.dtype, device)
        tokens_per_step = tc.batch_size * tc.grad_accum_steps * mc.max_seq_len
        if show:
            procs = f"{ctx.world_size} process" + ("es" if ctx.world_size > 1 else "")
            where = (f"{procs} ({ctx.backend}), {local_batch} sequences per "
                     f"process per micro-step" if ctx.backend else "1 process")
            print(
                f"model: {parameter_formula(mc):,} parameters (embed {mc.embed_dim}, "
                f"{mc.num_layers} layers, {mc.num_heads} heads, ff {mc.ff_dim}, context "
                f"{mc.max_seq_len}, vocab {mc.vocab_size})\n"
                f"data: {cfg.data.data_dir} ({meta['kind']} tokenizer, "
                f"{meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens)\n"
                f"train: {tc.max_steps} steps x {tokens_per_step:,} tokens/step (global batch "
                f"{tc.batch_size} x {tc.grad_accum_steps} accum = "
                f"{tc.batch_size * tc.grad_accum_steps} sequences; {where}), lr {tc.lr:g}, "
                f"device {device} ({str(dtype).replace('torch.', '')})"
                + (f", resuming from {run_dir}" if args.resume else ""),
                flush=True,
            )
        result = train(cfg, run_dir, resume=args.resume, progress=progress, ctx=ctx)
    if not show:
        return 0

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    print(
        f"\n{result.stop_reason}: step {result.step}/{result.max_steps}, "
        f"{result.tokens_seen:,} tokens, {result.elapsed_s:.1f}s, "
        f"{result.tokens_per_s:,.0f} tokens/s\n"
        f"best val loss {fmt(result.best_val_loss)} (bpb {fmt(result.best_val_bpb)}), "
        f"last val loss {fmt(result.final_val_loss)}\n"
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
