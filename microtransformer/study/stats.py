"""Statistics over finished runs: mean ± std over seeds, paired differences, the seed spec's
claims and their verdicts."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from microtransformer.study.corpora import CORPORA


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± std' of values (times scale), or '-' when there are none."""
    m, sd = mean_std([v * scale for v in values if v is not None])
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def group_results(results: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str, str],
                                                               list[dict[str, Any]]]:
    """Results by (group, corpus, config, init), each list sorted by seed (the init runs with
    the equal-token ones; the learning-rate sweep's runs apart)."""
    out: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        sp = r["spec"]
        if sp["group"] == "lr":
            continue  # the sweep's runs differ in lr: `lr_sweep_losses` groups them
        key = (sp["group"] if sp["group"] != "init" else "tokens", sp["corpus"], sp["config"],
               sp["init"])
        out.setdefault(key, []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["spec"]["seed"])
    return out


def paired_diffs(a: list[dict[str, Any]], b: list[dict[str, Any]],
                 metric: Callable[[dict[str, Any]], float]) -> list[float]:
    """metric(a) - metric(b) for each seed both have (same seed = same data order)."""
    by_seed = {r["spec"]["seed"]: r for r in b}
    return [metric(r) - metric(by_seed[r["spec"]["seed"]]) for r in a
            if r["spec"]["seed"] in by_seed]


def spreads_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when mean ± sample std over seeds of `a` and of `b` overlap."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if math.isnan(ma) or math.isnan(mb):
        return False
    return abs(ma - mb) <= sa + sb


def verdict(diffs: Sequence[float], claim_positive: bool, a: Sequence[float] = (),
            b: Sequence[float] = (), min_rel: float = 0.0) -> str:
    """The verdict on a claim from its paired per-seed differences `diffs` (a - b per seed;
    `claim_positive`: the claim predicts them > 0) and, when given, each side's values.

    'supported' / 'contradicted': every seed's difference has the same sign and the two sides'
    spreads over seeds (mean ± std) do not overlap. 'not distinguishable': seeds disagree, or
    the spreads overlap (the difference is within the seed-to-seed noise at this budget), or
    (`min_rel` > 0) the mean difference is below that fraction of b's mean: a speed or memory
    gap of a few percent is within what separately timed runs vary by, and too small to choose
    a shape by. One seed gives 'one seed: ...' (no spread to judge by).
    """
    if not diffs:
        return "not run"
    signs = {d > 0 for d in diffs}
    word = "supported" if signs == {claim_positive} else "contradicted"
    if min_rel > 0 and b:
        rel = abs(statistics.fmean(diffs)) / max(abs(statistics.fmean(b)), 1e-12)
        if rel < min_rel:
            small = f"not distinguishable (< {min_rel:.0%} apart)"
            return f"one seed: {small}" if len(diffs) == 1 else small
    if len(diffs) == 1:
        return f"one seed: {word}" if diffs[0] != 0 else "one seed: no difference"
    if len(signs) > 1 or any(d == 0 for d in diffs) or (a and b and spreads_overlap(a, b)):
        return "not distinguishable"
    return word


@dataclass(frozen=True)
class Claim:
    """A testable reading of one of the seed spec's section-3 claims."""

    text: str
    group: str
    corpus: str | None  # None: every corpus in the study
    a: str
    b: str
    metric: str
    positive: bool  # the claim predicts metric(a) - metric(b) > 0
    init_b: str | None = None  # compare inits of config a (b = init name)
    min_rel: float = 0.0  # a mean difference below this fraction of b's is 'not distinguishable'
    threshold: float | None = None  # compare config a with this constant (b unused)


def _metric(name: str) -> Callable[[dict[str, Any]], float]:
    return {
        "val_loss": lambda r: r["val_loss"],
        "tokens_per_s": lambda r: r["tokens_per_s_best"],
        "gen_tokens_per_s": lambda r: r["gen_tokens_per_s"],
        "gen_tokens_per_s_b8": lambda r: r.get("gen_tokens_per_s_b8", float("nan")),
        "grad_ratio": lambda r: grad_depth_ratio(r.get("grad_norms_init") or []),
        "peak_memory_mb": lambda r: r["peak_memory_mb"],
        "late": lambda r: r["position_buckets"]["late"],
        "early": lambda r: r["position_buckets"]["early"],
        "loss25": lambda r: loss_at_fraction(r, 0.25),
    }[name]


SPEED_MARGIN = 0.05  # the issue's own line: speeds within 5% are "the same speed"

CLAIMS: tuple[Claim, ...] = (
    Claim("Wide & Shallow reaches a lower loss than Narrow & Deep on code (equal tokens)",
          "tokens", "code", "narrow_deep", "wide_shallow", "val_loss", True),
    Claim("Narrow & Deep reaches a lower loss than Wide & Shallow on narrative (equal tokens)",
          "tokens", "narrative", "wide_shallow", "narrow_deep", "val_loss", True),
    Claim("Wide & Shallow reaches a lower loss than Narrow & Deep at equal wall-clock",
          "time", None, "narrow_deep", "wide_shallow", "val_loss", True),
    Claim("Wide & Shallow trains faster (tokens/s) than Narrow & Deep",
          "tokens", None, "wide_shallow", "narrow_deep", "tokens_per_s", True,
          min_rel=SPEED_MARGIN),
    Claim("Narrow & Deep generates slower (KV-cache tokens/s) than Wide & Shallow",
          "tokens", None, "wide_shallow", "narrow_deep", "gen_tokens_per_s", True,
          min_rel=SPEED_MARGIN),
    Claim("Narrow & Deep generates slower at batch 8 (KV-cache tokens/s per sequence)",
          "tokens", None, "wide_shallow", "narrow_deep", "gen_tokens_per_s_b8", True,
          min_rel=SPEED_MARGIN),
    Claim("Narrow & Deep uses less training memory than Wide & Shallow",
          "tokens", None, "wide_shallow", "narrow_deep", "peak_memory_mb", True,
          min_rel=SPEED_MARGIN),
    Claim("Narrow & Deep is harder to train: higher train loss than Wide & Shallow at 25% of "
          "the run", "tokens", None, "narrow_deep", "wide_shallow", "loss25", True),
    Claim("Narrow & Deep has vanishing gradients: its first-block gradient norm at "
          "initialisation is below its last block's (ratio < 1)", "tokens", None,
          "narrow_deep", "", "grad_ratio", False, threshold=1.0),
    Claim("Narrow & Deep's gradients shrink more toward the input than Wide & Shallow's: "
          "first-block / last-block gradient norm at initialisation lower", "tokens", None,
          "wide_shallow", "narrow_deep", "grad_ratio", True),
    Claim("Narrow & Deep is harder to train: its val loss varies more over the learning-rate "
          "sweep than Wide & Shallow's", "lr", None, "narrow_deep", "wide_shallow",
          "lr_spread", True),
    Claim("Narrow & Deep's advantage over Wide & Shallow is larger at late positions "
          "(long range) than at early ones", "tokens", None, "narrow_deep", "wide_shallow",
          "long_range", True),
)


def claim_rows(groups: dict[tuple[str, str, str, str], list[dict[str, Any]]],
               corpora: Sequence[str], base_init: str,
               sweep: dict[str, dict[int, dict[float, float]]] | None = None
               ) -> list[dict[str, str]]:
    """One row per (claim, corpus): paired per-seed differences and the verdict.

    `sweep` (`lr_sweep_losses`) serves the learning-rate claim, on the sweep's corpus.
    """
    rows = []
    for c in CLAIMS:
        if c.metric == "lr_spread":
            if not sweep:
                continue
            spread = {cfg: {seed: max(v.values()) - min(v.values())
                            for seed, v in by_seed.items() if len(v) >= 3}
                      for cfg, by_seed in sweep.items()}
            a, b = spread.get(c.a, {}), spread.get(c.b, {})
            seeds = sorted(set(a) & set(b))
            diffs = [a[k] - b[k] for k in seeds]
            rows.append({"claim": c.text, "corpus": corpora[0] if corpora else "-",
                         "diffs": ", ".join(f"{d:+.4g}" for d in diffs) or "-",
                         "verdict": verdict(diffs, c.positive, [a[k] for k in seeds],
                                            [b[k] for k in seeds])})
            continue
        if c.corpus is None:
            targets = list(corpora)
        else:
            targets = [k for k in corpora if k == c.corpus or CORPORA[k].kind == c.corpus]
        for corpus in targets:
            a = groups.get((c.group, corpus, c.a, base_init), [])
            b = groups.get((c.group, corpus, c.b, base_init), [])
            if c.threshold is not None:
                # config a against a constant: metric(a) - threshold per seed
                metric = _metric(c.metric)
                values = [metric(r) for r in a]
                diffs = [v - c.threshold for v in values]
                sides = (values, [c.threshold] * len(values))
            elif c.metric == "long_range":
                # (WS - ND) at late positions minus (WS - ND) at early positions > 0
                late = paired_diffs(b, a, _metric("late"))
                early = paired_diffs(b, a, _metric("early"))
                diffs = [x - y for x, y in zip(late, early, strict=True)]
                sides: tuple[list[float], list[float]] = (late, early)
            else:
                metric = _metric(c.metric)
                diffs = paired_diffs(a, b, metric)
                common = {r["spec"]["seed"] for r in a} & {r["spec"]["seed"] for r in b}
                sides = ([metric(r) for r in a if r["spec"]["seed"] in common],
                         [metric(r) for r in b if r["spec"]["seed"] in common])
            diffs = [d for d in diffs if math.isfinite(d)]
            rows.append({"claim": c.text, "corpus": corpus,
                         "diffs": ", ".join(f"{d:+.4g}" for d in diffs) or "-",
                         "verdict": verdict(diffs, c.positive, *sides, min_rel=c.min_rel)})
    # Balanced as "a good compromise": never the worst of the three (val loss, each seed);
    # where it ranks (best / between / worst) is shown per seed.
    for group in ("tokens", "time"):
        for corpus in corpora:
            ws = groups.get((group, corpus, "wide_shallow", base_init), [])
            nd = groups.get((group, corpus, "narrow_deep", base_init), [])
            bal = groups.get((group, corpus, "balanced", base_init), [])
            if not (ws and nd and bal):
                continue
            seeds = sorted({r["spec"]["seed"] for r in ws} & {r["spec"]["seed"] for r in nd}
                           & {r["spec"]["seed"] for r in bal})
            pick = {name: {r["spec"]["seed"]: r["val_loss"] for r in rs}
                    for name, rs in (("ws", ws), ("nd", nd), ("bal", bal))}
            ranks = [balanced_rank(pick["bal"][k], pick["ws"][k], pick["nd"][k])
                     for k in seeds]
            fine = [rank != "worst" for rank in ranks]
            word = ("supported" if all(fine) else
                    "contradicted" if not any(fine) else "not distinguishable")
            rows.append({"claim": "Balanced is a good compromise: never the worst of the three "
                                  f"(val loss, {'equal tokens' if group == 'tokens' else group})",
                         "corpus": corpus, "diffs": ", ".join(ranks),
                         "verdict": word if len(seeds) > 1 else f"one seed: {word}"})
    return rows


def balanced_rank(bal: float, ws: float, nd: float) -> str:
    """Where Balanced's val loss ranks against the other two: 'best', 'between' or 'worst'
    (a tie counts in Balanced's favour)."""
    if bal <= min(ws, nd):
        return "best"
    return "worst" if bal > max(ws, nd) else "between"


def loss_at_fraction(r: dict[str, Any], frac: float) -> float:
    """Mean logged train loss in a window around `frac` of the run's steps."""
    curve = r.get("curve") or []
    if not curve:
        return float("nan")
    target = frac * curve[-1][0]
    near = sorted(curve, key=lambda e: abs(e[0] - target))[:3]
    return statistics.fmean(e[3] for e in near)


def grad_depth_ratio(norms: Sequence[float]) -> float:
    """First-block over last-block gradient norm (below 1: gradients shrink toward the input)."""
    if len(norms) < 2 or not norms[-1] > 0:
        return float("nan")
    return norms[0] / norms[-1]


def lr_sweep_losses(results: Iterable[dict[str, Any]], corpus: str, base_init: str
                    ) -> dict[str, dict[int, dict[float, float]]]:
    """{config: {seed: {lr: val loss}}} on `corpus`: the sweep's runs plus the equal-token run
    at the base rate (same tokens, seed and data order)."""
    out: dict[str, dict[int, dict[float, float]]] = {}
    for r in results:
        sp = r["spec"]
        if sp["corpus"] != corpus or sp["init"] != base_init or sp["group"] not in ("lr",
                                                                                    "tokens"):
            continue
        out.setdefault(sp["config"], {}).setdefault(sp["seed"], {})[float(sp["lr"])] = \
            r["val_loss"]
    swept = {cfg for cfg, by_seed in out.items() if any(len(v) > 1 for v in by_seed.values())}
    return {cfg: by_seed for cfg, by_seed in out.items() if cfg in swept}
