"""Architecture study (`microtransformer.study`): measurements, planning, resume, report, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from microtransformer import study as S
from microtransformer.cli import main
from microtransformer.study import runner as study_runner
from model import MicroTransformer

TINY = {"embed_dim": 32, "num_heads": 2, "num_layers": 2, "ff_dim": 64}


# ---------------------------------------------------------------- loss by position
def test_loss_by_position_shape_and_mean():
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=50, max_seq_len=16, dropout=0.1, **TINY)
    model.train()  # the function must switch dropout off and restore the mode
    windows = [torch.randint(0, 50, (3, 17)), torch.randint(0, 50, (5, 17))]
    per_pos = S.loss_by_position(model, windows)
    assert per_pos.shape == (16,) and model.training
    model.eval()
    with torch.no_grad():
        ids = torch.cat(windows)  # (8, 17)
        logits = model(ids[:, :-1])  # (8, 16, 50)
        flat = F.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))
        pos3 = F.cross_entropy(logits[:, 3], ids[:, 4])
    assert math.isclose(float(per_pos.mean()), float(flat), rel_tol=1e-5)
    assert math.isclose(float(per_pos[3]), float(pos3), rel_tol=1e-5)
    with pytest.raises(ValueError):
        S.loss_by_position(model, [])


def test_position_buckets_and_smoothing():
    per_pos = [float(i) for i in range(256)]
    b = S.position_buckets(per_pos)
    assert b["early"] == sum(range(32)) / 32 and b["late"] == sum(range(224, 256)) / 32
    assert (b["early_range"], b["late_range"]) == ("1-32", "225-256")
    xs, ys = S.smooth_positions(per_pos[:20], 8)
    assert len(xs) == 3 and ys[0] == 3.5 and ys[-1] == 17.5
    with pytest.raises(ValueError):
        S.position_buckets(per_pos[:40])


# ---------------------------------------------------------------- planning
def test_plan_order_sizes_and_budget():
    s = S.StudySettings(corpora=("code",), seeds=(0, 1), tokens=40_960, seq_len=64,
                        batch_size=8)
    tps = {"wide_shallow": 2000.0, "narrow_deep": 1000.0, "balanced": 1500.0}
    tokens, minutes = S.size_budget(s, tps, 0.0)
    assert tokens == 40_960 and math.isclose(minutes, 40_960 / 1500 / 60)
    runs = S.plan_runs(s, tokens, minutes, tps)
    groups = [r.group for r in runs]
    assert groups == (["tokens"] * 3 + ["init"] + ["lr"] * 6 + ["time"] * 3) * 2
    assert [r.seed for r in runs] == [0] * 13 + [1] * 13
    sweep = [r for r in runs if r.group == "lr" and r.seed == 0]
    assert sorted({r.lr for r in sweep}) == [s.lr * 0.5, s.lr * 2.0]
    assert {r.config for r in sweep} == set(s.configs) and {r.corpus for r in sweep} == {"code"}
    assert all(r.max_steps == 80 for r in runs if r.group != "time")
    time_steps = {r.config: r.max_steps for r in runs if r.group == "time"}
    assert time_steps["wide_shallow"] > time_steps["balanced"] > time_steps["narrow_deep"]
    assert len({r.run_id for r in runs}) == len(runs)
    budget = sum(S.estimate_seconds(r, tps) for r in runs[:5])
    kept, skipped = S.fit_to_budget(runs, budget, tps, done=set())
    assert kept == runs[:5] and skipped == runs[5:]
    kept, _ = S.fit_to_budget(runs, budget, tps, done={runs[0].run_id, runs[1].run_id})
    assert kept[:6] == runs[:6]  # finished runs cost nothing: room for the sixth


def test_budget_only_sizes_runs_to_fit():
    s = S.StudySettings(corpora=("code", "stories"), budget_minutes=30, seq_len=64)
    tps = {"wide_shallow": 2000.0, "narrow_deep": 1000.0, "balanced": 1500.0}
    tokens, minutes = S.size_budget(s, tps, fixed_s=60.0)
    runs = S.plan_runs(s, tokens, minutes, tps)
    total = sum(S.estimate_seconds(r, tps) for r in runs)
    assert total <= 30 * 60 - 60 + 1e-6
    kept, skipped = S.fit_to_budget(runs, 30 * 60 - 60, tps, set())
    assert not skipped and kept == runs
    with pytest.raises(ValueError, match="budget"):
        S.size_budget(S.StudySettings(budget_minutes=0.5), tps, fixed_s=0.0)


# ---------------------------------------------------------------- fake results / report
def fake_result(group: str, corpus: str, config: str, init: str, seed: int) -> dict:
    """A result dict shaped like execute_run's, with made-up but consistent numbers."""
    width = {"wide_shallow": 0.0, "balanced": 0.05, "narrow_deep": 0.1}[config]
    base = 4.0 + width + (0.3 if corpus == "stories" else 0.0) + 0.01 * seed
    per_pos = [base + 1.0 / (p + 1) for p in range(64)]
    spec = S.RunSpec(group, config, init, corpus, seed, seq_len=64, batch_size=8, max_steps=10)
    tps = 1000.0 - 300 * width * 10
    return {
        "run_id": spec.run_id, "spec": asdict(spec), "params": 2_000_000, "steps": 10,
        "tokens": 5120, "val_loss": sum(per_pos) / 64, "val_bpb": 1.5, "tokens_per_s": tps,
        "tokens_per_s_best": tps, "step_time_ms": 500.0, "loss_by_position": per_pos,
        "train_seconds": 9.0,
        "position_buckets": S.position_buckets(per_pos), "peak_memory_mb": 100 + 10 * seed,
        "memory_kind": "rss_high_water_growth", "gen_tokens_per_s": 200 - 100 * width,
        "max_grad_norm": 1.0, "curve": [[s, s * 512, s * 0.5, 6 - 0.1 * s] for s in
                                        range(1, 11)],
        "sample": f"sample {config}", "device": "cpu", "torch": torch.__version__,
        "threads": 2, "gen_tokens_per_s_b8": 150 - 100 * width,
        "grad_norms_init": [0.5 + 2 * width * i for i in range(4)],
    }


def fake_results() -> list[dict]:
    out = []
    for seed in (0, 1):
        for corpus in ("code", "stories"):
            for cfg in ("wide_shallow", "narrow_deep", "balanced"):
                out.append(fake_result("tokens", corpus, cfg, "kaiming", seed))
                out.append(fake_result("time", corpus, cfg, "kaiming", seed))
            out.append(fake_result("init", corpus, "narrow_deep", "gpt2", seed))
        for cfg in ("wide_shallow", "narrow_deep", "balanced"):
            for scale in (0.5, 2.0):  # the sweep: narrow_deep suffers more away from 1e-3
                r = fake_result("lr", "code", cfg, "kaiming", seed)
                r["spec"]["lr"] = 1e-3 * scale
                r["run_id"] += f"__lr{1e-3 * scale:g}"
                r["val_loss"] += (0.05 if cfg == "wide_shallow" else 0.2) * abs(scale - 1)
                out.append(r)
    return out


def test_report_from_fake_results(tmp_path):
    results = fake_results()
    for r in results:
        r["stop_reason"] = "completed"
    results[1]["stop_reason"] = "time budget"
    settings = {"corpora": ["code", "stories"], "inits": ["kaiming", "gpt2"], "seq_len": 64,
                "batch_size": 8, "tokens_per_run": 5120, "minutes_per_time_run": 0.1}
    path = S.write_report(tmp_path, results, settings=settings, command="microtransformer study",
                          skipped=["time__code__balanced__kaiming__s9"])
    text = path.read_text()
    assert "## Equal training tokens" in text and "## Equal wall-clock" in text
    assert "## Initialisation" in text and "time__code__balanced__kaiming__s9" in text
    # mean ± std over the two seeds (0.01 apart): std = 0.00707
    assert "± 0.007" in text
    # machine time: 9 s of training loop per run, 10 steps of 500 ms at the best speed
    n = len(results)
    assert (f"- machine time: {n * 9 / 3600:.2f} h of training loops over {n} trained runs"
            in text) and f"best logged speed {n * 5 / 3600:.2f} h)" in text
    # the fake numbers make wide_shallow best everywhere: the narrative claim is contradicted
    line = next(ln for ln in text.splitlines() if "on narrative" in ln)
    assert line.rstrip(" |").endswith("contradicted")
    line = next(ln for ln in text.splitlines() if "trains faster" in ln and "| code |" in ln)
    assert line.rstrip(" |").endswith("supported")
    # fake balanced sits between the other two on every corpus and seed
    line = next(ln for ln in text.splitlines() if "Balanced is a good compromise" in ln
                and "| code |" in ln and "equal tokens" in ln)
    assert "between, between" in line and line.rstrip(" |").endswith("supported")
    assert "## Runs that stopped early" in text and f"- {results[1]['run_id']}:" in text
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == len(results) and json.loads(lines[0])["run_id"]
    for name in ("study_loss_tokens.png", "study_loss_time.png", "study_position.png",
                 "study_init.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert f"({name})" in text


def test_verdict_words():
    assert S.verdict([0.1, 0.2], True) == "supported"
    assert S.verdict([0.1, 0.2], False) == "contradicted"
    assert S.verdict([0.1, -0.2], True) == "not distinguishable"  # seeds disagree
    assert S.verdict([0.1], True) == "one seed: supported"
    assert S.verdict([], True) == "not run"
    # every seed agrees, but the two sides' spreads over seeds overlap: within seed noise
    assert S.verdict([0.01, 0.02], True, [4.00, 4.30], [3.99, 4.28]) == "not distinguishable"
    assert S.verdict([0.3, 0.3], True, [4.30, 4.31], [4.00, 4.01]) == "supported"


def test_balanced_compromise_claim_ranks_per_seed():
    assert S.balanced_rank(3.40, 3.45, 3.50) == "best"
    assert S.balanced_rank(3.47, 3.45, 3.50) == "between"
    assert S.balanced_rank(3.55, 3.45, 3.50) == "worst"
    results = fake_results()
    for r in results:  # balanced worst on code for seed 0 only, best on stories for both
        sp = r["spec"]
        if sp["config"] == "balanced" and sp["group"] == "tokens":
            r["val_loss"] += 1.0 if (sp["corpus"], sp["seed"]) == ("code", 0) else 0.0
            r["val_loss"] -= 1.0 if sp["corpus"] == "stories" else 0.0
    rows = S.claim_rows(S.group_results(results), ["code", "stories"], "kaiming")
    row = {r["corpus"]: r for r in rows if "good compromise" in r["claim"]
           and "equal tokens" in r["claim"]}
    assert row["code"]["diffs"] == "worst, between"
    assert row["code"]["verdict"] == "not distinguishable"
    assert row["stories"]["diffs"] == "best, best" and row["stories"]["verdict"] == "supported"


def test_verdict_margin_for_speed_and_memory():
    # 3% faster on both seeds, spreads apart: supported without a margin, not with 5%
    faster, slower = [1030.0, 1040.0], [1000.0, 1010.0]
    diffs = [x - y for x, y in zip(faster, slower, strict=True)]
    assert S.verdict(diffs, True, faster, slower) == "supported"
    assert S.verdict(diffs, True, faster, slower, min_rel=0.05) == \
        "not distinguishable (< 5% apart)"
    assert S.verdict(diffs[:1], True, faster[:1], slower[:1], min_rel=0.05) == \
        "one seed: not distinguishable (< 5% apart)"
    # 40% apart clears the margin; the sign still decides
    assert S.verdict([400.0, 410.0], False, [1400, 1420], [1000, 1010], min_rel=0.05) == \
        "contradicted"


def test_claim_with_overlapping_seed_spreads_is_not_distinguishable(tmp_path):
    results = fake_results()
    # seeds far apart (a large seed effect) and configs close: paired diffs agree in sign,
    # but each config's spread over seeds covers the other's mean
    for r in results:
        if r["spec"]["corpus"] == "code" and r["spec"]["group"] == "tokens":
            r["val_loss"] = 4.0 + 0.5 * r["spec"]["seed"] + {
                "wide_shallow": 0.0, "balanced": 0.01, "narrow_deep": 0.02}[r["spec"]["config"]]
    rows = S.claim_rows(S.group_results(results), ["code", "stories"], "kaiming")
    row = next(r for r in rows if "Wide & Shallow reaches a lower loss than Narrow & Deep on "
               "code" in r["claim"])
    assert row["diffs"] == "+0.02, +0.02" and row["verdict"] == "not distinguishable"
    stories = next(r for r in rows if "on narrative" in r["claim"] and r["corpus"] == "stories")
    assert stories["verdict"] == "contradicted"  # untouched: 0.1 apart, seeds 0.01 apart


def test_lr_sweep_and_gradient_claims_from_fake_results(tmp_path):
    results = fake_results()
    sweep = S.lr_sweep_losses(results, "code", "kaiming")
    assert sorted(sweep["narrow_deep"][0]) == [5e-4, 1e-3, 2e-3]  # the base run joins the sweep
    rows = S.claim_rows(S.group_results(results), ["code", "stories"], "kaiming", sweep)
    lr_row = next(r for r in rows if "learning-rate sweep" in r["claim"])
    assert lr_row["verdict"] == "supported"  # narrow_deep's spread 0.2 vs 0.05
    grad = next(r for r in rows if "shrink more toward the input" in r["claim"]
                and r["corpus"] == "code")
    # fake norms grow with depth faster for narrow_deep: first/last lower -> supported
    assert grad["verdict"] == "supported"
    # and narrow_deep's own first/last ratio (0.45 on both seeds) is below 1: vanishing
    vanish = next(r for r in rows if "vanishing gradients" in r["claim"]
                  and r["corpus"] == "code")
    assert vanish["verdict"] == "supported" and vanish["diffs"].startswith("-0.5455")
    for r in results:  # gradients that grow toward the input instead: ratio 2.2
        if r["spec"]["config"] == "narrow_deep":
            r["grad_norms_init"] = r["grad_norms_init"][::-1]
    rows = S.claim_rows(S.group_results(results), ["code", "stories"], "kaiming", sweep)
    vanish = next(r for r in rows if "vanishing gradients" in r["claim"]
                  and r["corpus"] == "code")
    assert vanish["verdict"] == "contradicted"
    # a training-speed gap of 2% is within the 5% margin, whatever the seeds say
    for r in results:
        if r["spec"]["config"] == "wide_shallow":
            r["tokens_per_s_best"] = 1.02 * 700.0
    rows = S.claim_rows(S.group_results(results), ["code", "stories"], "kaiming", sweep)
    speed = next(r for r in rows if "trains faster" in r["claim"] and r["corpus"] == "code")
    assert speed["verdict"] == "not distinguishable (< 5% apart)"
    path = S.write_report(tmp_path, results, settings={"corpora": ["code", "stories"]})
    text = path.read_text()
    assert "## Learning-rate sweep (code, equal tokens)" in text
    assert "## Gradient norms at initialisation" in text and (tmp_path / "study_lr.png").is_file()


# ---------------------------------------------------------------- resume
def fake_runner(calls: list[str], killed_at: int | None = None):
    """A run function writing fake_result records; `calls` collects the run ids it ran, and
    the run numbered `killed_at` (from 1) raises KeyboardInterrupt, as a killed study would."""

    def runner(spec, data_dir, run_dir):
        if killed_at is not None and len(calls) == killed_at - 1:
            raise KeyboardInterrupt
        calls.append(spec.run_id)
        res = fake_result(spec.group, spec.corpus, spec.config, spec.init, spec.seed)
        res["spec"] = asdict(spec)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").write_text(json.dumps(res))
        return res

    return runner


class FnExecutor:
    """An executor that calls `fn(spec, data_dir, run_dir)` in this process, one at a time."""

    name = "subprocess"

    def __init__(self, fn):
        self.fn = fn

    def run(self, specs, data_dirs, out_dir):
        for spec in specs:
            yield spec, self.fn(spec, data_dirs[spec.corpus], out_dir / "runs" / spec.run_id)


def test_finished_runs_are_skipped_on_rerun(tmp_path, monkeypatch):
    monkeypatch.setattr(study_runner, "prepare_corpus", lambda name, out_dir, **_: out_dir)
    calls: list[str] = []
    runner = fake_runner(calls)

    s = S.StudySettings(corpora=("code",), seeds=(0,), compare=("tokens",), tokens=1024,
                        seq_len=64, batch_size=8, device="cpu", lr_sweep=())
    tps = {c: 1000.0 for c in s.configs}
    first = S.run_study(s, tmp_path, executor=FnExecutor(runner), throughput=dict(tps),
                        log=lambda _: None)
    assert len(calls) == 4 and len(first["results"]) == 4
    # Lose one run's result: only that run is redone.
    lost = tmp_path / "runs" / calls[1] / "result.json"
    lost.unlink()
    calls.clear()
    second = S.run_study(s, tmp_path, executor=FnExecutor(runner), throughput=dict(tps),
                         log=lambda _: None)
    assert calls == [lost.parent.name]
    assert len(second["results"]) == 4
    # A rerun with only a budget keeps the first invocation's run sizes (plan.json).
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["tokens"] == 1024
    calls.clear()
    third = S.run_study(replace(s, tokens=None, budget_minutes=60.0), tmp_path,
                        executor=FnExecutor(runner), throughput=dict(tps), log=lambda _: None)
    assert calls == [] and len(third["results"]) == 4
    assert (tmp_path / "report.md").is_file()


def test_killed_study_resumes_with_the_runs_it_had_not_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(study_runner, "prepare_corpus", lambda name, out_dir, **_: out_dir)
    calls: list[str] = []
    runner = fake_runner(calls, killed_at=3)  # the study is killed during its third run

    s = S.StudySettings(corpora=("code",), seeds=(0,), compare=("tokens",), tokens=1024,
                        seq_len=64, batch_size=8, device="cpu", lr_sweep=())
    tps = {c: 1000.0 for c in s.configs}
    with pytest.raises(KeyboardInterrupt):
        S.run_study(s, tmp_path, executor=FnExecutor(runner), throughput=dict(tps),
                    log=lambda _: None)
    first = list(calls)
    calls.clear()  # the rerun does the two runs left (it would be killed at a third)
    out = S.run_study(s, tmp_path, executor=FnExecutor(runner), throughput=dict(tps),
                      log=lambda _: None)
    assert len(first) == 2 and len(calls) == 2 and not set(calls) & set(first)
    assert sorted(r["run_id"] for r in out["results"]) == sorted(first + calls)
    assert (tmp_path / "report.md").is_file()


def test_equal_time_runs_within_five_percent_are_their_equal_token_runs(tmp_path, monkeypatch):
    """Equal-time steps come from the measured speeds relative to the anchor (balanced); a config
    within 5% of the anchor's speed is not retrained: its equal-token run stands for it."""
    monkeypatch.setattr(study_runner, "prepare_corpus", lambda name, out_dir, **_: out_dir)
    calls: list[str] = []
    s = S.StudySettings(corpora=("code",), seeds=(0,), compare=("tokens", "time"), tokens=5120,
                        seq_len=64, batch_size=8, device="cpu", lr_sweep=(), inits=("kaiming",))
    tps = {c: 1000.0 for c in s.configs}  # calibration: all equal; measured (fake): not
    out = S.run_study(s, tmp_path, executor=FnExecutor(fake_runner(calls)),
                      throughput=dict(tps), log=lambda _: None)
    assert sorted(calls) == sorted(["tokens__code__wide_shallow__kaiming__s0",
                                    "tokens__code__narrow_deep__kaiming__s0",
                                    "tokens__code__balanced__kaiming__s0",
                                    "time__code__wide_shallow__kaiming__s0",
                                    "time__code__narrow_deep__kaiming__s0"])
    by_id = {r["run_id"]: r for r in out["results"]}
    folded = by_id["time__code__balanced__kaiming__s0"]
    assert folded["same_run_as"] == "tokens__code__balanced__kaiming__s0"
    assert folded["spec"]["group"] == "time" and folded["val_loss"] == by_id[
        "tokens__code__balanced__kaiming__s0"]["val_loss"]
    # fake speeds: wide 1000, balanced 850, narrow 700 tokens/s; 10 steps at equal tokens
    runs = {p.parent.name: json.loads(p.read_text())
            for p in (tmp_path / "runs").glob("*/result.json")}
    assert runs["time__code__balanced__kaiming__s0"]["same_run_as"]
    assert S.load_finished(tmp_path)["time__code__balanced__kaiming__s0"]["same_run_as"]
    assert "stands for" in (tmp_path / "report.md").read_text()
    calls.clear()  # a rerun trains nothing: the folded run is finished too
    S.run_study(s, tmp_path, executor=FnExecutor(fake_runner(calls)), throughput=dict(tps),
                log=lambda _: None)
    assert calls == []


def test_time_steps_follow_the_measured_speed_ratio(tmp_path, monkeypatch):
    monkeypatch.setattr(study_runner, "prepare_corpus", lambda name, out_dir, **_: out_dir)
    seen: dict[str, int] = {}

    def runner(spec, data_dir, run_dir):
        seen[spec.run_id] = spec.max_steps
        return fake_runner([])(spec, data_dir, run_dir)

    s = S.StudySettings(corpora=("code",), seeds=(0,), compare=("tokens", "time"), tokens=5120,
                        seq_len=64, batch_size=8, device="cpu", lr_sweep=(), inits=("kaiming",))
    S.run_study(s, tmp_path, executor=FnExecutor(runner), throughput=dict.fromkeys(s.configs,
                                                                                   1.0),
                log=lambda _: None)
    assert seen["tokens__code__balanced__kaiming__s0"] == 10
    assert seen["time__code__wide_shallow__kaiming__s0"] == round(10 * 1000 / 850)
    assert seen["time__code__narrow_deep__kaiming__s0"] == round(10 * 700 / 850)
    assert S.same_length(105, 100) and not S.same_length(106, 100)


# ---------------------------------------------------------------- a real tiny run
@pytest.fixture
def tiny_data(tmp_path) -> Path:
    from microtransformer.data import prepare

    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        text = " ".join(f"the fox {i} ran to the hill and back {j} times." for j in range(12))
        (src / f"d{i}.txt").write_text(text + "\n")
    out = tmp_path / "data"
    prepare([str(src)], out, tokenizer="char", vocab_size=64, val_fraction=0.3, progress=False)
    return out


def _has_train_seq_len() -> bool:
    from dataclasses import fields

    from microtransformer.config import TrainConfig

    return "seq_len" in {f.name for f in fields(TrainConfig)}


@pytest.mark.skipif(not _has_train_seq_len(), reason="needs TrainConfig.seq_len (train.seq_len)")
def test_execute_run_trains_and_measures(tiny_data, tmp_path):
    spec = S.RunSpec("tokens", "narrow_deep", "gpt2", "code", 0, seq_len=64, batch_size=4,
                     max_steps=3, device="cpu", eval_windows=8, gen_tokens=8,
                     model_overrides=TINY)
    res = S.execute_run(spec, tiny_data, tmp_path / "run")
    assert (tmp_path / "run" / "result.json").is_file()
    assert res["steps"] == 3 and res["tokens"] == 3 * 4 * 64
    assert len(res["loss_by_position"]) == 64
    assert math.isclose(sum(res["loss_by_position"]) / 64, res["val_loss"], rel_tol=1e-4)
    assert res["model"]["init"] == "gpt2" and res["model"]["embed_dim"] == 32
    assert res["model"]["max_seq_len"] == 512  # the seed's position table, trained on T = 64
    assert res["tokens_per_s_best"] > 0 and res["gen_tokens_per_s"] > 0
    assert res["gen_tokens_per_s_b8"] > 0
    assert len(res["grad_norms_init"]) == 2 and all(g > 0 for g in res["grad_norms_init"])
    assert res["peak_memory_mb"] >= 0 and isinstance(res["sample"], str)
    assert math.isclose(res["val_bpb"], res["val_loss"] / math.log(2) / res["bytes_per_token"])


@pytest.mark.skipif(not _has_train_seq_len(), reason="needs TrainConfig.seq_len (train.seq_len)")
def test_a_killed_run_resumes_from_its_checkpoint_exactly(tiny_data, tmp_path, monkeypatch):
    """A study killed during a run (the machine taken back) continues that run from its last
    checkpoint when rerun, and ends with the weights of the run that was never interrupted."""
    from microtransformer.study import worker

    spec = S.RunSpec("tokens", "balanced", "kaiming", "code", 0, seq_len=64, batch_size=2,
                     max_steps=16, device="cpu", eval_windows=4, gen_tokens=4,
                     model_overrides=TINY)
    whole = S.execute_run(spec, tiny_data, tmp_path / "whole")

    real_train = worker.train

    def killed(cfg, run_dir, **kw):  # checkpoints at step 6 and stops, as an interrupt would
        real_train(cfg, run_dir, stop_at=6, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(worker, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        S.execute_run(spec, tiny_data, tmp_path / "killed")
    assert not (tmp_path / "killed" / "result.json").exists()

    def stopped(cfg, run_dir, **kw):  # SIGTERM: `train` checkpoints and returns "interrupted"
        return real_train(cfg, run_dir, stop_at=10, **kw)

    monkeypatch.setattr(worker, "train", stopped)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 10"):
        S.execute_run(spec, tiny_data, tmp_path / "killed")
    assert not (tmp_path / "killed" / "result.json").exists()  # not marked finished
    monkeypatch.setattr(worker, "train", real_train)
    resumed = S.execute_run(spec, tiny_data, tmp_path / "killed")
    assert resumed["steps"] == 16 and resumed["stop_reason"] == whole["stop_reason"]
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-6)
    assert [e[0] for e in resumed["curve"]] == [e[0] for e in whole["curve"]]
    # A run whose training finished but whose evaluation was cut short is evaluated again.
    (tmp_path / "killed" / "result.json").unlink()
    again = S.execute_run(spec, tiny_data, tmp_path / "killed")
    assert again["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-6)


def test_a_changed_spec_does_not_resume_the_old_attempt(tiny_data, tmp_path):
    spec = S.RunSpec("tokens", "balanced", "kaiming", "code", 0, seq_len=64, batch_size=2,
                     max_steps=4, device="cpu", eval_windows=4, gen_tokens=4,
                     model_overrides=TINY)
    run_dir = tmp_path / "runs" / spec.run_id
    S.execute_run(spec, tiny_data, run_dir)
    (run_dir / "result.json").unlink()
    (run_dir / "spec.json").write_text(json.dumps({"spec": asdict(replace(spec, max_steps=3)),
                                                   "data_dir": str(tiny_data)}))
    res = S.run_in_subprocess(replace(spec, max_steps=8), tiny_data, run_dir)
    fresh = S.execute_run(replace(spec, max_steps=8), tiny_data, tmp_path / "fresh")
    assert res["steps"] == 8  # trained afresh (the old 4-step checkpoint was discarded)
    assert res["val_loss"] == pytest.approx(fresh["val_loss"], abs=1e-6)


# ---------------------------------------------------------------- the seed's configurations
SEED_COUNTS = {"wide_shallow": 2_443_904, "narrow_deep": 2_290_176, "balanced": 2_428_640}


def test_planned_runs_are_the_seeds_exact_configurations():
    """Every planned run builds the seed's model (max_seq_len 512 -> the seed's parameter count
    at vocab 5000) while training on windows of --seq-len tokens."""
    from model.utils import parameter_formula

    s = S.StudySettings(corpora=("code",), seeds=(0,), tokens=1 << 20)
    tps = {c: 1000.0 for c in s.configs}
    runs = S.plan_runs(s, 1 << 20, 1.0, tps)
    assert {r.config for r in runs} == set(SEED_COUNTS)
    for r in runs:
        cfg = r.model_config(vocab_size=5000)
        assert (cfg.max_seq_len, r.seq_len) == (512, 256)
        assert parameter_formula(cfg) == SEED_COUNTS[r.config], r.run_id
        assert cfg.init == r.init and cfg.dropout == s.dropout
    with torch.device("meta"):
        from model.utils import count_parameters

        model = MicroTransformer.from_config(runs[0].model_config(5000))
    assert count_parameters(model) == SEED_COUNTS[runs[0].config]


def test_seed_shapes_come_from_the_toml_presets():
    from microtransformer.config import load_config
    from microtransformer.search import SEED_PRESETS

    for name, dims in SEED_PRESETS.items():
        m = load_config(preset=name).model
        assert dims == {k: getattr(m, k) for k in ("embed_dim", "num_heads", "num_layers",
                                                   "ff_dim")}


# ---------------------------------------------------------------- corpora
def test_corpora_are_named_sources_or_given_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("MICROTRANSFORMER_SHARED_DATA", raising=False)
    assert S.corpus_sources("code", 1000) == (["stdlib"], 1000)
    assert S.corpus_sources("stories", 1000) == (["tinystories"], None)
    assert S.corpus_sources("shakespeare", 1000) == (["tinyshakespeare"], None)
    with pytest.raises(ValueError, match="--corpus novels=PATH"):
        S.corpus_sources("novels", 1000)
    books = tmp_path / "books"
    books.mkdir()
    for name, size in (("a.txt", 600), ("b.txt", 600), ("c.txt", 300)):
        (books / name).write_text("x" * size)
    paths = S.parse_corpus_paths([f"novels={books}"])
    assert paths == (("novels", str(books)),)
    files, cap = S.corpus_sources("novels", 1000, paths)  # whole files, name order, <= cap
    assert [Path(f).name for f in files] == ["a.txt", "c.txt"] and cap is None
    one = books / "a.txt"
    assert S.corpus_sources("stories", 10, S.parse_corpus_paths([f"stories={one}"])) == (
        [str(one)], None)


def test_held_out_books_are_the_val_split_and_never_trained_on(tmp_path):
    """--holdout novels=FILE: the corpus's val split is exactly that book; its directory's other
    books are the training text (the held-out one is taken out of it)."""
    from microtransformer.data import load_tokens
    from microtransformer.tokenizer import Tokenizer

    books = tmp_path / "books"
    books.mkdir()
    for i, name in enumerate(("a.txt", "b.txt", "held.txt")):
        words = " ".join(f"w{i}{j % 7}" for j in range(400))
        (books / name).write_text(f"Book {name}. {words}\n")
    corpus = S.parse_corpus_paths([f"novels={books}"])
    holdout = S.parse_holdout_paths([f"novels={books / 'held.txt'}"])
    s = S.StudySettings(corpora=("novels",), corpus_paths=corpus, holdout_paths=holdout)
    files, _ = S.corpus_sources("novels", 10**6, s.corpus_paths, s.holdout_paths)
    assert [Path(f).name for f in files] == ["a.txt", "b.txt"]
    out = S.prepare_corpus("novels", tmp_path / "data", vocab_size=300, max_bytes=10**6,
                           paths=corpus, holdout=holdout)
    tok = Tokenizer.load(out / "tokenizer.json")
    val = tok.decode(load_tokens(out, "val").tolist())
    train = tok.decode(load_tokens(out, "train").tolist())
    assert val == (books / "held.txt").read_text()
    assert "held.txt" not in train and "a.txt" in train and "b.txt" in train


def test_holdout_errors(tmp_path):
    with pytest.raises(ValueError, match="must be NAME=PATH"):
        S.parse_holdout_paths(["novels"])
    with pytest.raises(ValueError, match="not in --corpora"):
        S.StudySettings(corpora=("code",), holdout_paths=(("stories", str(tmp_path)),))
    with pytest.raises(ValueError, match="does not exist"):
        S.StudySettings(corpora=("code", "stories"),
                        holdout_paths=(("stories", str(tmp_path / "nope.txt")),))
    one = tmp_path / "only.txt"
    one.write_text("text")
    with pytest.raises(ValueError, match="no file left for training"):
        S.corpus_sources("novels", 10**6, (("novels", str(one)),), (("novels", str(one)),))


@pytest.mark.parametrize("args, needle", [
    (["stories"], "must be NAME=PATH"),
    (["stories=a", "stories=b"], "twice"),
])
def test_corpus_arg_parsing_errors(args, needle):
    with pytest.raises(ValueError, match=needle):
        S.parse_corpus_paths(args)


def test_corpus_settings_errors(tmp_path):
    with pytest.raises(ValueError, match="novels corpus has no public source"):
        S.StudySettings(corpora=("code", "novels"))
    with pytest.raises(ValueError, match="not in --corpora"):
        S.StudySettings(corpora=("code",), corpus_paths=(("stories", str(tmp_path)),))
    with pytest.raises(ValueError, match="does not exist"):
        S.StudySettings(corpora=("stories",), corpus_paths=(("stories", str(tmp_path / "no")),))
    with pytest.raises(ValueError, match="unknown corpus 'poems'"):
        S.StudySettings(corpora=("code",), corpus_paths=(("poems", str(tmp_path)),))
    ok = S.StudySettings(corpora=("novels",), corpus_paths=(("novels", str(tmp_path)),))
    assert ok.corpus_paths == (("novels", str(tmp_path)),)


# ---------------------------------------------------------------- CLI bad input
@pytest.mark.parametrize("argv, needle", [
    (["--configs", "huge"], "unknown config 'huge'"),
    (["--corpora", "poetry"], "unknown corpus 'poetry'"),
    (["--inits", "xavier"], "unknown init"),
    (["--seeds", "a,b"], "--seeds"),
    (["--tokens", "lots"], "--tokens"),
    (["--seq-len", "16"], "--seq-len=16"),
    (["--seq-len", "1024"], "max_seq_len 512"),
    (["--corpus", "stories"], "NAME=PATH"),
    (["--corpora", "code,novels"], "--corpus novels=PATH"),
    (["--budget-minutes", "-3"], "--budget-minutes"),
])
def test_cli_bad_input_exits_2(argv, needle, capsys, tmp_path):
    assert main(["study", *argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("microtransformer study: error:") and needle in err
    assert not (tmp_path / "r").exists()  # rejected before any work


# ---------------------------------------------------------------- executors
def _deterministic(record: dict) -> dict:
    keep = ("run_id", "params", "steps", "tokens", "stop_reason", "val_loss", "val_bpb",
            "final_train_loss", "loss_by_position", "sample", "model")
    return {k: record[k] for k in keep}


@pytest.mark.skipif(not _has_train_seq_len(), reason="needs TrainConfig.seq_len (train.seq_len)")
def test_submitit_local_executor_gives_the_subprocess_records(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from microtransformer.study.executors import SubmititExecutor, SubprocessExecutor

    monkeypatch.setattr(study_runner, "prepare_corpus", lambda *a, **k: tiny_data)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # both executors' processes: the same kernels
    s = S.StudySettings(configs=("narrow_deep",), corpora=("code",), seeds=(0,),
                        compare=("tokens",), tokens=2 * 2 * 64, seq_len=64, batch_size=2,
                        eval_windows=2, gen_tokens=4, device="cpu", lr_sweep=())
    records = {}
    for name, executor in (("subprocess", SubprocessExecutor()),
                           ("submitit", SubmititExecutor(cluster="local", timeout_min=10,
                                                         cpus_per_task=1))):
        out = S.run_study(s, tmp_path / name, executor=executor,
                          throughput={"narrow_deep": 1000.0}, log=lambda _: None)
        assert not out["failed"], out["failed"]
        records[name] = [_deterministic(r) for r in out["results"]]
        assert (tmp_path / name / "report.md").is_file()
    assert len(records["submitit"]) == 2  # narrow_deep with each init
    for a, b in zip(records["subprocess"], records["submitit"], strict=True):
        assert a.keys() == b.keys() and a["run_id"] == b["run_id"]
        for key in a:  # exact where a thread schedule cannot matter, 1e-6 for float sums
            if isinstance(a[key], float):
                assert math.isclose(a[key], b[key], rel_tol=1e-6), key
            elif key == "loss_by_position":
                assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-5)
                           for x, y in zip(a[key], b[key], strict=True))
            else:
                assert a[key] == b[key], key
    ledger = json.loads((tmp_path / "submitit" / "jobs.json").read_text())
    assert sorted(ledger) == sorted(r["run_id"] for r in records["submitit"])


@pytest.mark.parametrize("argv, needle", [
    (["--executor", "submitit", "--cluster", "pbs"], "invalid choice: 'pbs'"),
    (["--executor", "submitit", "--timeout-min", "0"], "--timeout-min 0 must be >= 1"),
    (["--executor", "submitit", "--slurm", "partition"], "must be KEY=VALUE"),
])
def test_executor_options_are_checked_in_one_line(argv, needle, capsys, tmp_path):
    try:
        code = main(["study", "--out", str(tmp_path / "r"), "--dry-run", *argv])
    except SystemExit as exc:  # argparse's own refusals exit from the parser
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and err.count("\n") == 1


def test_recipe_gives_every_run_the_presets_optimisation():
    from microtransformer.study.plan import recipe_train_values

    assert recipe_train_values("plain", 1e-3) == {"min_lr": 1e-4}
    values = recipe_train_values("cpu_bpe", 2e-3)
    assert values["optimizer"] == "muon" and values["schedule"] == "wsd"
    assert math.isclose(values["min_lr"], 2e-3 * 1e-4 / 4e-3)  # the preset's min_lr / lr
    runs = S.plan_runs(S.StudySettings(recipe="cpu_bpe", lr=4e-3, seq_len=64), 1000, 1.0,
                       {c: 1.0 for c in ("wide_shallow", "narrow_deep", "balanced")})
    assert {r.recipe for r in runs} == {"cpu_bpe"}
    with pytest.raises(ValueError, match="--recipe 'fast' is not plain or a preset"):
        S.StudySettings(recipe="fast")
