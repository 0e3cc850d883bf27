"""`microtransformer info`: a run's config, size, training summary and files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from microtransformer import checkpoint as ckpt
from microtransformer.config import RunConfig
from microtransformer.errors import UserError
from microtransformer.finetune import lineage_chain, read_lineage
from microtransformer.jsonout import json_dumps
from microtransformer.metrics import read_metrics
from model import MicroTransformer
from model.io import BEST_WEIGHTS_FILE, CONFIG_FILE, PREV_WEIGHTS_FILE, WEIGHTS_FILE
from model.utils import count_parameters, get_model_size_mb


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add the `info` subcommand."""
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.set_defaults(func=run)


def run_info(run_dir: str | Path) -> dict[str, Any]:
    """Everything `info` shows, as a dict (reads files only; no model weights are needed
    except to count parameters exactly)."""

    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise UserError(f"{run} is a file, not a run directory; pass the directory "
                        "`microtransformer train --out RUN_DIR` wrote")
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    cfg_path = run / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {run} is not a training run directory")
    cfg = RunConfig.load_json(cfg_path)
    model = MicroTransformer.from_config(cfg.model)
    info: dict[str, Any] = {
        "run_dir": str(run),
        "config": cfg.to_dict(),
        "parameters": count_parameters(model),
        "size_mb": round(get_model_size_mb(model), 3),
    }
    # Weights: only the safetensors headers are read (cheap); a file that is not safetensors (a
    # pickle, garbage, a truncated copy) is a one-line error naming it.
    weights: dict[str, Any] = {}
    for name in (WEIGHTS_FILE, BEST_WEIGHTS_FILE, PREV_WEIGHTS_FILE):
        if (run / name).is_file():
            header = ckpt.read_safetensors_header(run / name)
            meta = header.get("__metadata__") or {}
            weights[name] = {"step": int(meta["step"]) if "step" in meta else None,
                             "tensors": sum(1 for k in header if k != "__metadata__")}
    info["weights"] = weights
    summary: dict[str, Any] = {}
    if (run / ckpt.STATE_FILE).is_file():
        state = ckpt.load_training_state(run / ckpt.STATE_FILE)
        summary.update(step=int(state["step"]), max_steps=int(state.get("max_steps",
                                                                       cfg.train.max_steps)),
                       tokens_seen=int(state["tokens_seen"]),
                       best_val_loss=_finite(state["best_val_loss"]))
    events = read_metrics(run / ckpt.METRICS_FILE)
    vals = [e for e in events if e.get("val_loss") is not None]
    trains = [e for e in events if e.get("loss") is not None]
    if vals:
        best = min(vals, key=lambda e: e["val_loss"])
        summary.update(best_val_loss=best["val_loss"], best_val_bpb=best.get("val_bpb"),
                       best_val_step=best["step"], last_eval=vals[-1])
    if trains:
        summary["last_train"] = trains[-1]
    averaged = [e["averaged_steps"] for e in events if e.get("averaged_steps") is not None]
    if averaged:  # train.average_cooldown: the saved model is a mean over these steps
        summary["averaged_steps"] = averaged[-1]
    info["training"] = summary
    info["lineage"] = read_lineage(run)  # a fine-tune: its parent, and theirs
    # what config resolution adapted (defaults, presets and files yield to the data and run)
    info["adapted"] = [n for e in events for n in e.get("config_notes", [])]
    info["files"] = {p.name: p.stat().st_size for p in sorted(run.iterdir()) if p.is_file()
                     and not p.name.startswith(".")}
    return info


def _finite(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


def run(args: argparse.Namespace) -> int:
    """Print the run summary (or JSON)."""
    info = run_info(args.run_dir)
    if args.json:
        print(json_dumps(info, indent=2))
        return 0
    m = info["config"]["model"]
    t = info["config"]["train"]
    print(f"run: {info['run_dir']}")
    print(f"model: {info['parameters']:,} parameters, {info['size_mb']:.2f} MB (fp32)")
    print("  " + ", ".join(f"{k}={v}" for k, v in m.items()))
    print("train: " + ", ".join(f"{k}={t[k]}" for k in (
        "max_steps", "max_time_minutes", "batch_size", "grad_accum_steps", "seq_len",
        "optimizer", "lr", "min_lr", "warmup_steps", "schedule", "weight_decay", "seed")))
    for note in info["adapted"]:
        print(f"  adapted: {note}")
    if info["lineage"]:
        print("fine-tuned from: " + " <- ".join(lineage_chain(info["lineage"])))
    print(f"data: {info['config']['data']['data_dir']}")
    if info["weights"]:
        print("weights: " + ", ".join(
            name + (f" (step {w['step']})" if w["step"] is not None else "")
            for name, w in info["weights"].items()))
    s = info["training"]
    if s:
        line = f"training: step {s.get('step', '?')}/{s.get('max_steps', t['max_steps'])}"
        if "tokens_seen" in s:
            line += f", {s['tokens_seen']:,} tokens seen"
        print(line)
        if s.get("best_val_loss") is not None:
            bpb = s.get("best_val_bpb")
            print(f"  best val loss {s['best_val_loss']:.4f}"
                  + (f" (bpb {bpb:.4f}, step {s.get('best_val_step')})" if bpb else ""))
        if "last_train" in s:
            e = s["last_train"]
            print(f"  last train log: step {e['step']}, loss {e['loss']:.4f}, "
                  f"{e.get('tokens_per_s') or 0:,.0f} tokens/s")
        if "last_eval" in s:
            e = s["last_eval"]
            print(f"  last eval: step {e['step']}, val loss {e['val_loss']:.4f}")
        if "averaged_steps" in s:
            print(f"  final weights: the mean of the weights after each of the last "
                  f"{s['averaged_steps']} steps (train.average_cooldown)")
    else:
        print("training: no checkpoint or metrics yet")
    print("files: " + ", ".join(f"{k} ({v / 1e6:.2f} MB)" if v > 1e5 else f"{k} ({v} B)"
                                for k, v in info["files"].items()))
    return 0
