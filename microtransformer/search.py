"""Parameter-budget search: every configuration on a grid whose exact size lies in a budget.

The grid (all bounds inclusive, each one a flag of `microtransformer configs`):
  - num_heads in `heads` (default 1..16);
  - embed_dim in `embed_dims` (default the multiples of 32 from 64 to 1024), kept only when it is
    a multiple of num_heads and head_dim = embed_dim // num_heads lies in [head_dim_min,
    head_dim_max] (default 16..64) and is a multiple of 8 (tensor-core / SIMD friendly);
  - num_layers in `layers` (default 1..12);
  - ff_dim: the multiples of `ff_step` (default 64) from ff_min_ratio * embed_dim (default 1x)
    up to ff_max_ratio * embed_dim (default 8x).

Sizes come from the closed form `model.utils.parameter_formula` (no model is built), so the whole
grid is scanned in well under a second; `verify_counts` instantiates a sample on the meta device
and checks the formula against `count_parameters`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from microtransformer.config import load_config
from microtransformer.errors import UserError
from model import MicroTransformer, ModelConfig
from model.utils import count_parameters, flops_per_token, parameter_formula

# The seed spec's three configurations (section 3), by the names the project uses for them.
# Their one source is the TOML presets microtransformer/configs/<name>.toml.
SEED_PRESET_NAMES = ("wide_shallow", "narrow_deep", "balanced")
SHAPE_FIELDS = ("embed_dim", "num_heads", "num_layers", "ff_dim")


def seed_model_config(name: str) -> ModelConfig:
    """The seed preset's full ModelConfig as its TOML file gives it (vocab 5000, max_seq_len
    512, its init and dropout)."""

    if name not in SEED_PRESET_NAMES:
        raise UserError(f"unknown seed preset {name!r}; choose from "
                        f"{', '.join(SEED_PRESET_NAMES)}")
    return load_config(preset=name).model


def _seed_shapes() -> dict[str, dict[str, int]]:
    out = {}
    for name in SEED_PRESET_NAMES:
        cfg = seed_model_config(name)
        out[name] = {f: getattr(cfg, f) for f in SHAPE_FIELDS}
    return out


SEED_PRESETS: dict[str, dict[str, int]] = _seed_shapes()  # name -> the four shape fields

DEFAULT_HEADS = tuple(range(1, 17))
DEFAULT_EMBED_DIMS = tuple(range(64, 1025, 32))
DEFAULT_LAYERS = tuple(range(1, 13))
HEAD_DIM_MULTIPLE = 8
SORT_KEYS = ("params", "flops", "embed_dim", "layers")


@dataclass(frozen=True)
class Candidate:
    """One configuration in budget, with its exact size and cost."""

    embed_dim: int
    num_heads: int
    num_layers: int
    ff_dim: int
    head_dim: int
    params: int
    size_mb: float  # fp32 parameters, MiB
    flops_per_token: int  # forward pass, at the search's seq_len
    seed_preset: str | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict of every field."""
        return asdict(self)

    def model_config(self, vocab_size: int, max_seq_len: int) -> ModelConfig:
        """The ModelConfig this candidate stands for."""
        return ModelConfig(vocab_size=vocab_size, max_seq_len=max_seq_len,
                           embed_dim=self.embed_dim, num_heads=self.num_heads,
                           num_layers=self.num_layers, ff_dim=self.ff_dim)


def seed_preset_name(embed_dim: int, num_heads: int, num_layers: int, ff_dim: int) -> str | None:
    """The seed preset's name when (d, h, L, f) is one of the seed's three, else None."""
    key = {"embed_dim": embed_dim, "num_heads": num_heads, "num_layers": num_layers,
           "ff_dim": ff_dim}
    for name, preset in SEED_PRESETS.items():
        if preset == key:
            return name
    return None


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name}={value!r} must be a positive integer")


def search(
    min_params: int,
    max_params: int,
    *,
    vocab_size: int = 5000,
    max_seq_len: int = 512,
    seq_len: int | None = None,
    heads: Iterable[int] = DEFAULT_HEADS,
    embed_dims: Iterable[int] = DEFAULT_EMBED_DIMS,
    layers: Iterable[int] = DEFAULT_LAYERS,
    head_dim_min: int = 16,
    head_dim_max: int = 64,
    ff_step: int = 64,
    ff_min_ratio: float = 1.0,
    ff_max_ratio: float = 8.0,
    sort: str = "params",
) -> list[Candidate]:
    """Every grid configuration with min_params <= parameters <= max_params, sorted by `sort`.

    `seq_len` (default max_seq_len) is the context length used for FLOPs per token. Ties in the
    sort key are broken by (params, embed_dim, num_heads, num_layers, ff_dim) so the order is
    deterministic.
    """
    problems = []
    if min_params < 0 or max_params < 0:
        problems.append(f"parameter bounds must be >= 0 (got min={min_params}, max={max_params})")
    if min_params > max_params:
        problems.append(f"min params {min_params:,} is above max params {max_params:,}; "
                        "swap them")
    if head_dim_min > head_dim_max:
        problems.append(f"head_dim_min={head_dim_min} is above head_dim_max={head_dim_max}")
    if sort not in SORT_KEYS:
        problems.append(f"sort={sort!r} must be one of {', '.join(SORT_KEYS)}")
    if not 0 <= ff_min_ratio <= ff_max_ratio:
        problems.append(f"ff ratios must satisfy 0 <= ff_min_ratio <= ff_max_ratio "
                        f"(got {ff_min_ratio}, {ff_max_ratio})")
    if problems:
        raise UserError("; ".join(problems))
    for name, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len),
                        ("ff_step", ff_step), ("head_dim_min", head_dim_min),
                        ("head_dim_max", head_dim_max)):
        _check_positive(name, value)
    seq_len = max_seq_len if seq_len is None else seq_len
    _check_positive("seq_len", seq_len)
    heads, embed_dims, layers = sorted(set(heads)), sorted(set(embed_dims)), sorted(set(layers))
    for name, values in (("heads", heads), ("embed_dims", embed_dims), ("layers", layers)):
        if not values:
            raise UserError(f"{name} is empty; give at least one value")
        for v in values:
            _check_positive(name, v)

    found: list[Candidate] = []
    for d in embed_dims:
        for h in heads:
            if d % h:
                continue
            hd = d // h
            if not head_dim_min <= hd <= head_dim_max or hd % HEAD_DIM_MULTIPLE:
                continue
            for n_layers in layers:
                base = ModelConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, embed_dim=d,
                                   num_heads=h, num_layers=n_layers, ff_dim=ff_step)
                # params is affine in ff_dim: params(f) = p0 + n_layers * (2d + 1) * f, so the
                # in-budget ff_dims form one interval; solve for it instead of scanning.
                slope = n_layers * (2 * d + 1)
                p0 = parameter_formula(base) - slope * ff_step
                lo = max(1, math.ceil(ff_min_ratio * d / ff_step),
                         math.ceil((min_params - p0) / slope / ff_step))
                hi = min(int(ff_max_ratio * d) // ff_step,
                         math.floor((max_params - p0) / slope / ff_step))
                for k in range(lo, hi + 1):
                    f = k * ff_step
                    cfg = ModelConfig(vocab_size=vocab_size, max_seq_len=max_seq_len,
                                      embed_dim=d, num_heads=h, num_layers=n_layers, ff_dim=f)
                    params = parameter_formula(cfg)
                    if not min_params <= params <= max_params:  # guard the algebra above
                        continue
                    found.append(Candidate(
                        embed_dim=d, num_heads=h, num_layers=n_layers, ff_dim=f, head_dim=hd,
                        params=params, size_mb=round(params * 4 / 2**20, 3),
                        flops_per_token=flops_per_token(cfg, seq_len),
                        seed_preset=seed_preset_name(d, h, n_layers, f),
                    ))
    return sort_candidates(found, sort)


def sort_candidates(cands: Sequence[Candidate], key: str = "params") -> list[Candidate]:
    """Sorted copy: by params, flops (per token), embed_dim or layers, then a fixed tie-break."""
    primary = {"params": lambda c: c.params, "flops": lambda c: c.flops_per_token,
               "embed_dim": lambda c: c.embed_dim, "layers": lambda c: c.num_layers}
    if key not in primary:
        raise UserError(f"sort={key!r} must be one of {', '.join(SORT_KEYS)}")
    first = primary[key]
    return sorted(cands, key=lambda c: (first(c), c.params, c.embed_dim, c.num_heads,
                                        c.num_layers, c.ff_dim))


def verify_counts(cands: Sequence[Candidate], vocab_size: int, max_seq_len: int,
                  sample: int = 3) -> int:
    """Instantiate up to `sample` candidates (first, middle, last) on the meta device and check
    that `count_parameters` equals the formula's count; returns how many were checked.

    Raises RuntimeError on a mismatch (a bug in `parameter_formula`, not user input).
    """
    if not cands:
        return 0
    idx = sorted({0, len(cands) // 2, len(cands) - 1})[:sample]
    for i in idx:
        c = cands[i]
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = MicroTransformer.from_config(c.model_config(vocab_size, max_seq_len))
        n = count_parameters(model)
        if n != c.params:
            raise RuntimeError(f"parameter_formula gives {c.params} but the model has {n} for {c}")
    return len(idx)


def format_table(cands: Sequence[Candidate]) -> str:
    """Fixed-width text table, one configuration per line."""
    header = (f"{'embed':>5} {'heads':>5} {'hdim':>4} {'layers':>6} {'ff':>5} "
              f"{'params':>11} {'MB':>7} {'MFLOP/tok':>10}  preset")
    lines = [header, "-" * len(header)]
    for c in cands:
        lines.append(
            f"{c.embed_dim:>5} {c.num_heads:>5} {c.head_dim:>4} {c.num_layers:>6} "
            f"{c.ff_dim:>5} {c.params:>11,} {c.size_mb:>7.2f} "
            f"{c.flops_per_token / 1e6:>10.2f}  {c.seed_preset or ''}"
        )
    return "\n".join(lines)
