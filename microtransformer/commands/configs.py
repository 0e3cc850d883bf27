"""`microtransformer configs`: list configurations whose exact parameter count lies in a budget.

Example: `microtransformer configs --min-params 2e6 --max-params 3e6 --heads 4,6 --limit 20`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from microtransformer import search as S
from microtransformer.config import available_presets, load_config, preset_path
from microtransformer.errors import UserError
from microtransformer.jsonout import json_dumps
from model.utils import parameter_formula


def parse_count(text: str, name: str) -> int:
    """A non-negative whole count written as `2500000`, `2.5e6`, `2_500_000` or `2.5M`/`300k`."""
    raw = text.strip().replace("_", "").replace(",", "")
    scale = 1
    if raw[-1:].lower() in ("k", "m"):
        scale = 1_000 if raw[-1].lower() == "k" else 1_000_000
        raw = raw[:-1]
    try:
        value = float(raw) * scale
    except ValueError:
        raise UserError(f"{name}={text!r} is not a number; write e.g. 2e6 or 2500000") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{name}={text!r} must be a finite number >= 0")
    return round(value)


def parse_int_list(text: str, name: str) -> list[int]:
    """Comma-separated positive integers with optional ranges: `4,6`, `1-12`, `2,4-6`."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if lo > hi:
                    raise UserError(f"{name}: range {part!r} is empty; write LOW-HIGH")
                values.extend(range(lo, hi + 1))
            else:
                values.append(int(part))
        except ValueError as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"{name}={text!r}: {part!r} is not an integer; "
                            "write e.g. 4,6 or 1-12") from None
    if not values:
        raise UserError(f"{name}={text!r} lists no values")
    bad = [v for v in values if v <= 0]
    if bad:
        raise UserError(f"{name}={text!r}: values must be positive, got {bad}")
    return values


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add the `configs` subcommand."""
    p = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    p.add_argument("--min-params", default="2e6", help="lower bound, inclusive (default 2e6)")
    p.add_argument("--max-params", default="3e6", help="upper bound, inclusive (default 3e6)")
    p.add_argument("--vocab-size", default="5000", help="vocabulary size (default 5000)")
    p.add_argument("--max-seq-len", default="512", help="position table length (default 512)")
    p.add_argument("--seq-len", default=None,
                   help="context length for FLOPs per token (default: --max-seq-len)")
    p.add_argument("--heads", default=None, help="num_heads to consider, e.g. 4,6 or 2-8 "
                   "(default 1-16)")
    p.add_argument("--layers", default=None, help="num_layers, e.g. 4,6 or 1-12 (default 1-12)")
    p.add_argument("--embed-dims", default=None,
                   help="embed_dim values, e.g. 128,160,192 (default multiples of 32, 64-1024)")
    p.add_argument("--head-dim-min", default="16", help="smallest head_dim (default 16)")
    p.add_argument("--head-dim-max", default="64", help="largest head_dim (default 64)")
    p.add_argument("--ff-step", default="64", help="ff_dim is a multiple of this (default 64)")
    p.add_argument("--ff-min-ratio", default="1", help="smallest ff_dim / embed_dim (default 1)")
    p.add_argument("--ff-max-ratio", default="8", help="largest ff_dim / embed_dim (default 8)")
    p.add_argument("--sort", default="params", choices=S.SORT_KEYS, help="sort key")
    p.add_argument("--limit", default=None, help="print at most N configurations")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument("--presets", action="store_true",
                   help="list the presets `train --preset NAME` knows (shape, parameters, "
                        "file, what each is for) instead of searching")
    p.set_defaults(func=run)


def preset_rows() -> list[dict[str, object]]:
    """One row per preset: name, shape, context, vocab, parameter count, its file and the
    first line of its comment."""

    rows = []
    for name in available_presets():
        path = preset_path(name)
        m = load_config(preset=name).model
        comment = next((line.lstrip("# ").strip() for line in
                        path.read_text(encoding="utf-8").splitlines()
                        if line.startswith("#")), "")
        rows.append({"name": name, "embed_dim": m.embed_dim, "num_heads": m.num_heads,
                     "num_layers": m.num_layers, "ff_dim": m.ff_dim,
                     "max_seq_len": m.max_seq_len, "vocab_size": m.vocab_size,
                     "params": parameter_formula(m), "file": str(path), "about": comment})
    return rows


def print_presets(as_json: bool) -> int:
    """`configs --presets`: the preset table (or JSON)."""
    rows = preset_rows()
    if as_json:
        print(json_dumps(rows, indent=1))
        return 0
    print(f"{'preset':<14}{'embed':>6}{'heads':>6}{'layers':>7}{'ff':>6}{'context':>8}"
          f"{'vocab':>7}{'params':>12}  about")
    for r in rows:
        print(f"{r['name']:<14}{r['embed_dim']:>6}{r['num_heads']:>6}{r['num_layers']:>7}"
              f"{r['ff_dim']:>6}{r['max_seq_len']:>8}{r['vocab_size']:>7}{r['params']:>12,}"
              f"  {str(r['about'])[:70]}")
    where = Path(str(rows[0]["file"])).parent if rows else "(none found)"
    print(f"\n{len(rows)} presets in {where}; use one with `train --preset NAME`; a "
          "preset's values adapt to the data and the run, typed flags never do (docs/CONFIG.md)")
    return 0


def run(args: argparse.Namespace) -> int:
    """List the in-budget configurations as a table (or JSON), or the presets."""
    if args.presets:
        return print_presets(args.json)
    vocab = parse_count(args.vocab_size, "--vocab-size")
    max_seq_len = parse_count(args.max_seq_len, "--max-seq-len")
    ratios = []
    for flag, text in (("--ff-min-ratio", args.ff_min_ratio),
                       ("--ff-max-ratio", args.ff_max_ratio)):
        try:
            ratios.append(float(text))
        except ValueError:
            raise UserError(f"{flag}={text!r} is not a number") from None
    kwargs = dict(
        vocab_size=vocab, max_seq_len=max_seq_len,
        seq_len=parse_count(args.seq_len, "--seq-len") if args.seq_len else None,
        head_dim_min=parse_count(args.head_dim_min, "--head-dim-min"),
        head_dim_max=parse_count(args.head_dim_max, "--head-dim-max"),
        ff_step=parse_count(args.ff_step, "--ff-step"), ff_min_ratio=ratios[0],
        ff_max_ratio=ratios[1],
        sort=args.sort,
    )
    if args.heads:
        kwargs["heads"] = parse_int_list(args.heads, "--heads")
    if args.layers:
        kwargs["layers"] = parse_int_list(args.layers, "--layers")
    if args.embed_dims:
        kwargs["embed_dims"] = parse_int_list(args.embed_dims, "--embed-dims")
    lo = parse_count(args.min_params, "--min-params")
    hi = parse_count(args.max_params, "--max-params")
    cands = S.search(lo, hi, **kwargs)
    S.verify_counts(cands, vocab, max_seq_len)
    total = len(cands)
    if args.limit is not None:
        cands = cands[: parse_count(args.limit, "--limit")]
    if args.json:
        print(json_dumps([c.to_dict() for c in cands], indent=1))
        return 0
    print(S.format_table(cands))
    shown = f"{len(cands)} of {total}" if len(cands) < total else f"{total}"
    print(f"\n{shown} configurations with {lo:,} <= params <= {hi:,} "
          f"(vocab {vocab}, max_seq_len {max_seq_len}); counts from the closed-form formula, "
          "spot-checked by instantiating models.")

    print(f"presets (train --preset NAME; details: configs --presets): "
          f"{', '.join(available_presets()) or '(none found)'}")
    return 0
