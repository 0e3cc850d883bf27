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
    """Results by (group, corpus, config, init), each list sorted by seed."""
    out: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        sp = r["spec"]
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


def verdict(diffs: Sequence[float], claim_positive: bool) -> str:
    """'supported' / 'contradicted' when every seed's paired difference agrees, else 'mixed'.

    `claim_positive`: the claim predicts diffs > 0. With one seed the word is 'one seed: ...'.
    """
    if not diffs:
        return "not run"
    signs = {d > 0 for d in diffs}
    if len(signs) > 1 or any(d == 0 for d in diffs):
        word = "mixed"
    else:
        word = "supported" if signs.pop() == claim_positive else "contradicted"
    return word if len(diffs) > 1 else f"one seed: {word}"


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


def _metric(name: str) -> Callable[[dict[str, Any]], float]:
    return {
        "val_loss": lambda r: r["val_loss"],
        "tokens_per_s": lambda r: r["tokens_per_s_best"],
        "gen_tokens_per_s": lambda r: r["gen_tokens_per_s"],
        "peak_memory_mb": lambda r: r["peak_memory_mb"],
        "late": lambda r: r["position_buckets"]["late"],
        "early": lambda r: r["position_buckets"]["early"],
        "loss25": lambda r: loss_at_fraction(r, 0.25),
    }[name]


CLAIMS: tuple[Claim, ...] = (
    Claim("Wide & Shallow reaches a lower loss than Narrow & Deep on code (equal tokens)",
          "tokens", "code", "narrow_deep", "wide_shallow", "val_loss", True),
    Claim("Narrow & Deep reaches a lower loss than Wide & Shallow on narrative (equal tokens)",
          "tokens", "narrative", "wide_shallow", "narrow_deep", "val_loss", True),
    Claim("Wide & Shallow reaches a lower loss than Narrow & Deep at equal wall-clock",
          "time", None, "narrow_deep", "wide_shallow", "val_loss", True),
    Claim("Wide & Shallow trains faster (tokens/s) than Narrow & Deep",
          "tokens", None, "wide_shallow", "narrow_deep", "tokens_per_s", True),
    Claim("Narrow & Deep generates slower (KV-cache tokens/s) than Wide & Shallow",
          "tokens", None, "wide_shallow", "narrow_deep", "gen_tokens_per_s", True),
    Claim("Narrow & Deep uses less training memory than Wide & Shallow",
          "tokens", None, "wide_shallow", "narrow_deep", "peak_memory_mb", True),
    Claim("Narrow & Deep is harder to train: higher train loss than Wide & Shallow at 25% of "
          "the run", "tokens", None, "narrow_deep", "wide_shallow", "loss25", True),
    Claim("Narrow & Deep's advantage over Wide & Shallow is larger at late positions "
          "(long range) than at early ones", "tokens", None, "narrow_deep", "wide_shallow",
          "long_range", True),
)


def claim_rows(groups: dict[tuple[str, str, str, str], list[dict[str, Any]]],
               corpora: Sequence[str], base_init: str) -> list[dict[str, str]]:
    """One row per (claim, corpus): paired per-seed differences and the verdict word."""
    rows = []
    for c in CLAIMS:
        if c.corpus is None:
            targets = list(corpora)
        else:
            targets = [k for k in corpora if k == c.corpus or CORPORA[k].kind == c.corpus]
        for corpus in targets:
            a = groups.get((c.group, corpus, c.a, base_init), [])
            b = groups.get((c.group, corpus, c.b, base_init), [])
            if c.metric == "long_range":
                # (WS - ND) at late positions minus (WS - ND) at early positions > 0
                late = paired_diffs(b, a, _metric("late"))
                early = paired_diffs(b, a, _metric("early"))
                diffs = [x - y for x, y in zip(late, early, strict=True)]
            else:
                diffs = paired_diffs(a, b, _metric(c.metric))
            rows.append({"claim": c.text, "corpus": corpus,
                         "diffs": ", ".join(f"{d:+.4g}" for d in diffs) or "-",
                         "verdict": verdict(diffs, c.positive)})
    # Balanced in the middle (val loss strictly between the other two, each seed).
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
            between = [min(pick["ws"][k], pick["nd"][k]) <= pick["bal"][k]
                       <= max(pick["ws"][k], pick["nd"][k]) for k in seeds]
            word = ("supported" if all(between) else
                    "contradicted" if not any(between) else "mixed")
            rows.append({"claim": f"Balanced lies between the other two (val loss, {group})",
                         "corpus": corpus,
                         "diffs": ", ".join("between" if x else "outside" for x in between),
                         "verdict": word if len(seeds) > 1 else f"one seed: {word}"})
    return rows


def loss_at_fraction(r: dict[str, Any], frac: float) -> float:
    """Mean logged train loss in a window around `frac` of the run's steps."""
    curve = r.get("curve") or []
    if not curve:
        return float("nan")
    target = frac * curve[-1][0]
    near = sorted(curve, key=lambda e: abs(e[0] - target))[:3]
    return statistics.fmean(e[3] for e in near)


