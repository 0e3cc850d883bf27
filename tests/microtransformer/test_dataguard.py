"""Outputs appear whole, inputs are checked by identity: kill tests for `prepare` and `export`,
property tests for the dataset readers, and the runs that must work (a recorded data switch,
a dataset prepared before identities existed) or must fail loudly (a diverged run)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from microtransformer import artifacts
from microtransformer.cli import main
from microtransformer.data import prepare, verify_dataset
from microtransformer.errors import UserError
from microtransformer.metrics import read_metrics
from microtransformer.rundata import check_run_output, check_tokenizer_match

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--model.max_seq_len", "16", "--model.embed_dim", "32", "--model.num_heads", "2",
        "--model.num_layers", "2", "--model.ff_dim", "64", "--train.batch_size", "4",
        "--train.eval_steps", "2", "--no-progress"]
OLD_TEXT = "".join(f"the {w} sat on the mat.\n" for w in ("cat", "dog", "owl")) * 40
NEW_TEXT = "".join(f"a {w} ran up the hill, then sat.\n" for w in ("fox", "bee", "elk")) * 50


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(target: Path) -> list[str]:
    """Staging or aside directories next to `target`."""
    return [p.name for p in target.parent.iterdir()
            if p.name.startswith(f".{target.name}.")]


# ------------------------------------------------------------------------ kill tests
# Kills its own process at the n-th file-system step of a command: an os.replace (each file's
# atomic commit), an os.rename or the directory exchange (publishing the staged directory),
# either just before the step ("before") or just after it ("after").
DRIVER = r"""
import os, signal, sys
from microtransformer import artifacts
when, n = sys.argv[1], int(sys.argv[2])
count = 0
def step(real):
    def wrapped(*a, **k):
        global count
        count += 1
        if when == "before" and count == n:
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*a, **k)
        if when == "after" and count == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapped
os.replace = step(os.replace)
os.rename = step(os.rename)
artifacts._exchange = step(artifacts._exchange)
from microtransformer.cli import main
rc = main(sys.argv[3:])
print("STEPS", count)
sys.exit(rc)
"""


def _run_driver(when: str, n: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, when, str(n), *argv], env=ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=240)


def _kill_points(argv: list[str], count: int, seed: int) -> list[tuple[str, int]]:
    """`count` random (when, n) points among the command's file-system steps (all of them
    when count is 0)."""
    proc = _run_driver("never", 0, argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = int(proc.stdout.split("STEPS")[-1])
    points = [(w, n) for n in range(1, steps + 1) for w in ("before", "after")]
    return points if count == 0 else random.Random(seed).sample(points, min(count, len(points)))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An old and a new dataset (references) and their corpora."""
    T = tmp_path_factory.mktemp("guard")
    (T / "old.txt").write_text(OLD_TEXT)
    (T / "new.txt").write_text(NEW_TEXT)
    prepare([str(T / "old.txt")], T / "old", tokenizer="char", vocab_size=64, val_tail=0.1,
            progress=False)
    prepare([str(T / "new.txt")], T / "new", tokenizer="char", vocab_size=64, val_tail=0.1,
            progress=False)
    return {"root": T, "old": T / "old", "new": T / "new"}


def _prepare_kills(datasets: dict[str, Path], tmp_path: Path, count: int) -> None:
    old, new = tree(datasets["old"]), tree(datasets["new"])
    target = tmp_path / "data"
    argv = ["prepare", str(datasets["root"] / "new.txt"), "--out", str(target), "--force",
            "--tokenizer", "char", "--vocab-size", "64", "--val-tail", "0.1"]
    shutil.copytree(datasets["old"], target)
    points = _kill_points(argv, count, seed=21)
    outcomes = set()
    for when, n in points:
        shutil.rmtree(target)
        for name in leftovers(target):
            shutil.rmtree(tmp_path / name)
        shutil.copytree(datasets["old"], target)
        proc = _run_driver(when, n, argv)
        assert proc.returncode == -signal.SIGKILL, (when, n, proc.stderr[-2000:])
        artifacts.recover_directory(target)  # what the next prepare does first
        state = tree(target)
        assert state in (old, new), (when, n, sorted(state))
        outcomes.add("old" if state == old else "new")
        verify_dataset(target)  # each is loadable
        # the next prepare cleans up and finishes the job
        assert main(argv) == 0
        assert tree(target) == new and leftovers(target) == []
    assert outcomes  # (which ones depends on the sampled points)


def test_prepare_killed_over_a_dataset_leaves_old_or_new(datasets: dict[str, Path],
                                                         tmp_path: Path) -> None:
    _prepare_kills(datasets, tmp_path, count=4)


@pytest.mark.slow
def test_prepare_killed_at_every_step_leaves_old_or_new(datasets: dict[str, Path],
                                                        tmp_path: Path) -> None:
    _prepare_kills(datasets, tmp_path, count=0)


def test_export_killed_over_an_export_leaves_old_or_new(datasets: dict[str, Path],
                                                        tmp_path: Path) -> None:
    torch.set_num_threads(1)
    runs = {}
    for name in ("old", "new"):
        runs[name] = tmp_path / f"run_{name}"
        assert main(["train", "--data", str(datasets[name]), "--out", str(runs[name]), *TINY,
                     "--train.max_steps", "1"]) == 0
        assert main(["export", str(runs[name]), "--format", "hf", "--out",
                     str(tmp_path / f"ref_{name}")]) == 0
    old, new = tree(tmp_path / "ref_old"), tree(tmp_path / "ref_new")
    target = tmp_path / "hf"
    argv = ["export", str(runs["new"]), "--format", "hf", "--out", str(target), "--force"]
    for when, n in _kill_points_export(argv, target, tmp_path / "ref_old"):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(tmp_path / "ref_old", target)
        proc = _run_driver(when, n, argv)
        assert proc.returncode == -signal.SIGKILL, (when, n, proc.stderr[-2000:])
        artifacts.recover_directory(target)
        assert tree(target) in (old, new), (when, n)
        assert main(argv) == 0 and tree(target) == new and leftovers(target) == []


def _kill_points_export(argv: list[str], target: Path, ref_old: Path) -> list[tuple[str, int]]:
    shutil.copytree(ref_old, target)
    points = _kill_points(argv, 3, seed=7)
    shutil.rmtree(target)
    return points


# ------------------------------------------------------------------------ outputs, in-process
def test_prepare_force_replaces_a_dataset_and_nothing_else(datasets: dict[str, Path],
                                                           tmp_path: Path) -> None:
    target = tmp_path / "d"
    shutil.copytree(datasets["old"], target)
    meta = prepare([str(datasets["root"] / "new.txt")], target, tokenizer="char",
                   vocab_size=64, val_tail=0.1, progress=False, force=True)
    assert tree(target) == tree(datasets["new"]) and leftovers(target) == []
    assert meta["identity"]["files"]["train.bin"]["bytes"] == (target / "train.bin").stat().st_size
    # a failure while preparing (here: unknown characters) leaves the old dataset in place
    before = tree(target)
    with pytest.raises(UserError, match="unknown token"):
        prepare([str(datasets["root"] / "old.txt")], target, tokenizer="char", vocab_size=8,
                val_tail=0.1, progress=False, force=True)
    assert tree(target) == before and leftovers(target) == []


def test_classify_kinds(datasets: dict[str, Path], tmp_path: Path) -> None:
    assert artifacts.classify(tmp_path / "nope") == artifacts.MISSING
    (tmp_path / "e").mkdir()
    assert artifacts.classify(tmp_path / "e") == artifacts.EMPTY
    assert artifacts.classify(datasets["old"]) == artifacts.DATASET
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "data").mkdir()  # a run stopped after preparing its own data, or a
    assert artifacts.classify(tmp_path / "half") == artifacts.OTHER  # project's data folder
    check_run_output(tmp_path / "half", None)  # train may still take it up as its run
    check_run_output(tmp_path / "half" / "run", None)  # and a run beside a project's data
    (tmp_path / "f").write_text("x")
    assert artifacts.classify(tmp_path / "f") == artifacts.FILE


def test_recover_directory_puts_an_aside_copy_back(tmp_path: Path) -> None:
    target = tmp_path / "d"
    aside = tmp_path / ".d.old-123"
    aside.mkdir()
    (aside / "meta.json").write_text("{}")
    artifacts.recover_directory(target)  # a crash between the two renames of the fallback
    assert (target / "meta.json").is_file() and not aside.exists()


# ------------------------------------------------------------------------ readers: properties
@pytest.fixture(scope="module")
def pristine(datasets: dict[str, Path]) -> Path:
    return datasets["old"]


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


PROPS = settings(max_examples=30, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPS
@given(split=st.sampled_from(["train", "val"]), keep=st.floats(0, 0.999))
def test_truncated_token_files_are_refused(pristine: Path, tmp_path: Path, split: str,
                                           keep: float) -> None:
    d = _copy(pristine, tmp_path / "t")
    path = d / f"{split}.bin"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))
    with pytest.raises(UserError, match="truncated or corrupted"):
        verify_dataset(d)


@PROPS
@given(split=st.sampled_from(["train", "val"]), where=st.floats(0, 0.999),
       bit=st.integers(0, 7))
def test_flipped_bits_are_refused(pristine: Path, tmp_path: Path, split: str, where: float,
                                  bit: int) -> None:
    d = _copy(pristine, tmp_path / "f")
    path = d / f"{split}.bin"
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 1 << bit
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"sha256 differs|holds token id"):
        verify_dataset(d)


@PROPS
@given(seed=st.integers(0, 2**32 - 1))
def test_foreign_tokenizers_of_the_same_size_are_refused(pristine: Path, tmp_path: Path,
                                                         seed: int) -> None:
    tok = json.loads((pristine / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    regular = sorted(k for k, v in vocab.items() if v > 2)
    ids = [vocab[k] for k in regular]
    shuffled = ids[:]
    rng = random.Random(seed)
    while shuffled == ids:
        rng.shuffle(shuffled)
    vocab.update(dict(zip(regular, shuffled, strict=True)))
    # the dataset's own tokenizer.json swapped: refused by the reader
    d = _copy(pristine, tmp_path / "k")
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="is not the tokenizer"):
        verify_dataset(d)
    # a run holding the foreign tokenizer: refused against the original data
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "tokenizer.json").write_text(json.dumps(tok))
    meta = json.loads((pristine / "meta.json").read_text())
    with pytest.raises(UserError, match="another tokenizer"):
        check_tokenizer_match(run, pristine, meta, "check")


def test_a_file_and_its_reformatted_copy_hash_equal(pristine: Path, tmp_path: Path) -> None:
    from microtransformer.data import tokenizer_sha256

    tok = json.loads((pristine / "tokenizer.json").read_text())
    (tmp_path / "t.json").write_text(json.dumps(tok, indent=4, sort_keys=False))
    assert tokenizer_sha256(tmp_path / "t.json") == tokenizer_sha256(pristine / "tokenizer.json")


# ------------------------------------------------------------------------ runs
def test_old_datasets_still_train(datasets: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(datasets["old"], tmp_path / "v1")
    meta = json.loads((d / "meta.json").read_text())
    for key in ("identity", "unknown"):
        meta.pop(key)
    meta["format_version"] = 1
    (d / "meta.json").write_text(json.dumps(meta))
    torch.set_num_threads(1)
    assert main(["train", "--data", str(d), "--out", str(tmp_path / "r"), *TINY,
                 "--train.max_steps", "2"]) == 0


def test_switch_data_is_explicit_and_recorded(datasets: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)
    root = datasets["root"]
    other = tmp_path / "other"
    prepare([str(root / "old.txt"), str(root / "new.txt")], other,
            tokenizer_path=datasets["old"] / "tokenizer.json", val_tail=0.1, progress=False,
            max_unknown=1.0)
    run = tmp_path / "run"
    assert main(["train", "--data", str(datasets["old"]), "--out", str(run), *TINY,
                 "--train.max_steps", "2"]) == 0
    before = tree(run)
    assert main(["train", "--out", str(run), "--resume", "--data", str(other),
                 "--train.max_steps", "4", "--no-progress"]) == 2
    assert "--switch-data" in capsys.readouterr().err and tree(run) == before
    assert main(["train", "--out", str(run), "--resume", "--data", str(other),
                 "--train.max_steps", "4", "--switch-data", "--no-progress"]) == 0
    switches = [e for e in read_metrics(run / "metrics.jsonl") if "data_switch" in e]
    assert len(switches) == 1 and switches[0]["step"] == 2
    assert switches[0]["data_switch"]["to"] == str(other.resolve())
    # the switch is now the run's data: resuming on it needs no flag
    assert main(["train", "--out", str(run), "--resume", "--train.max_steps", "5",
                 "--no-progress"]) == 0


def test_diverged_run_exits_2_and_its_json_is_valid(datasets: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)
    run = tmp_path / "run"
    rc = main(["train", "--data", str(datasets["old"]), "--out", str(run), *TINY,
               "--train.max_steps", "4", "--train.lr", "1e6"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "train.lr=1e+06" in err[-1]
    assert main(["eval", str(run), "--data", str(datasets["root"] / "old.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # strict JSON: NaN would not parse as null
    assert result["loss"] is None and result["bits_per_byte"] is None
    assert main(["info", str(run), "--json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    assert main(["generate", str(run)]) == 2
    assert "are not finite" in capsys.readouterr().err


def test_info_json_into_a_closed_pipe_ends_quietly(datasets: dict[str, Path],
                                                   tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run = tmp_path / "run"
    assert main(["train", "--data", str(datasets["old"]), "--out", str(run), *TINY,
                 "--train.max_steps", "1"]) == 0
    proc = subprocess.run(f"{sys.executable} -m microtransformer info {run} --json | head -1",
                          shell=True, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "{" and "Broken pipe" not in proc.stderr, proc.stderr


def test_eval_reports_unknown_share_and_exact_bytes(datasets: dict[str, Path],
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)
    run = tmp_path / "run"
    assert main(["train", "--data", str(datasets["old"]), "--out", str(run), *TINY,
                 "--train.max_steps", "1"]) == 0
    text = OLD_TEXT + "§" * 3  # a character the char tokenizer has never seen
    (tmp_path / "t.txt").write_text(text)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(tmp_path / "t.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["unknown_tokens"] == 3 and result["bytes"] == len(text.encode())
    assert main(["eval", str(run), "--data", str(tmp_path / "t.txt"), "--max-unknown",
                 "0"]) == 2


def test_token_files_match_their_recorded_sizes(pristine: Path) -> None:
    meta = json.loads((pristine / "meta.json").read_text())
    for split in ("train", "val"):
        ids = np.fromfile(pristine / f"{split}.bin", dtype=meta["dtype"])
        assert len(ids) == meta["tokens"][split]
        record = meta["identity"]["files"][f"{split}.bin"]
        assert record["sha256"] == hashlib.sha256(ids.tobytes()).hexdigest()


def test_raw_os_errors_become_path_problem_and_fix() -> None:
    import errno

    from microtransformer.cli import error_line

    line = error_line(NotADirectoryError(errno.ENOTDIR, "Not a directory", "a/file/x"))
    assert line is not None and line.startswith("a/file/x: a part of the path is a file")
    assert "[Errno" not in line and "choose" in line
    line = error_line(FileExistsError(errno.EEXIST, "File exists", "out"))
    assert line is not None and "[Errno" not in line and "already exists" in line
    assert "out of memory" in (error_line(MemoryError()) or "")
    assert error_line(RuntimeError("a bug")) is None  # not a user error: keeps its traceback


def test_a_symlinked_dataset_is_replaced_where_it_points(datasets: dict[str, Path],
                                                         tmp_path: Path) -> None:
    real = _copy(datasets["old"], tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    prepare([str(datasets["root"] / "new.txt")], link, tokenizer="char", vocab_size=64,
            val_tail=0.1, progress=False, force=True)
    assert link.is_symlink() and tree(real) == tree(datasets["new"])
    assert leftovers(real) == [] and leftovers(link) == []


def test_a_model_too_large_to_train_is_refused_up_front(datasets: dict[str, Path],
                                                        tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    rc = main(["train", "--data", str(datasets["old"]), "--out", str(tmp_path / "r"),
               "--model.embed_dim", "65536", "--model.num_heads", "2", "--model.ff_dim", "64",
               "--model.max_seq_len", "16", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "to train (weights, gradients and optimizer moments)" in err, err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_memory_checks_name_the_request_and_the_limit() -> None:
    from microtransformer.memory import (
        check_eval_fits,
        check_generation_fits,
        check_training_fits,
        memory_limit,
    )
    from model import ModelConfig

    limit, _ = memory_limit("cpu")
    with pytest.raises(UserError, match=r"--batch-size=100000000 needs .* is the limit"):
        check_eval_fits(10**8, 10**8, 512, 50_000, "cpu")
    check_eval_fits(10**8, 3, 16, 64, "cpu")  # the batch is at most the windows there are
    with pytest.raises(UserError, match="--max-new-tokens"):
        check_generation_fits(1, 0, limit, "cpu")
    cfg = ModelConfig(vocab_size=64, max_seq_len=16, embed_dim=32, num_heads=2, num_layers=2,
                      ff_dim=64)
    check_training_fits(cfg, 4, 1, 16, "cpu")
    with pytest.raises(UserError, match=r"train.batch_size=.* --train.grad_accum_steps"):
        check_training_fits(cfg, limit, 1, 16, "cpu")


def test_publish_without_an_atomic_exchange(datasets: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)  # not Linux
    target = _copy(datasets["old"], tmp_path / "d")
    args = ([str(datasets["root"] / "new.txt")], target)
    kwargs = {"tokenizer": "char", "vocab_size": 64, "val_tail": 0.1, "progress": False,
              "force": True}
    real_rename, calls = os.rename, []

    def failing_rename(src, dst):  # the stage's rename fails after the old one went aside
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError):
        prepare(*args, **kwargs)
    assert tree(target) == tree(datasets["old"]) and leftovers(target) == []
    monkeypatch.setattr(os, "rename", real_rename)
    prepare(*args, **kwargs)
    assert tree(target) == tree(datasets["new"]) and leftovers(target) == []


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=40),
                      st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass"))),
       chunk=st.integers(1, 7))
@example(data=b"\x80\x00", chunk=1)  # found by CI: an invalid byte in a chunk before the NUL
def test_text_rule_agrees_with_the_decoder_at_the_exact_byte(tmp_path: Path, data: bytes,
                                                             chunk: int) -> None:
    from microtransformer.data.documents import text_problem

    path = tmp_path / "t.txt"
    path.write_bytes(data)
    problem = text_problem(path, chunk=chunk)  # small chunks: characters cut between reads
    if b"\x00" in data:
        assert problem is not None and f"at byte {data.index(0):,})" in problem
        return
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        assert problem is not None and f"at byte {exc.start:,}, line {line}," in problem
    else:
        assert problem is None


def test_outputs_inside_an_artifact_are_refused_but_a_runs_data_slot_is_not(
        datasets: dict[str, Path], tmp_path: Path) -> None:
    from microtransformer.artifacts import DATASET, HF, RUN, check_output

    with pytest.raises(UserError, match="never writes inside another artifact"):
        check_output(datasets["old"] / "sub", command="export", makes=HF)
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.pt").write_bytes(b"")
    check_output(run / "data", command="prepare", makes=DATASET)  # train's own layout
    with pytest.raises(UserError, match="never writes inside another artifact"):
        check_output(run / "other", command="prepare", makes=DATASET)
    with pytest.raises(UserError, match="never writes inside another artifact"):
        check_output(run / "data", command="train", makes=RUN)
    # an ordinary project directory with a meta.json or a config.json is not an artifact
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "meta.json").write_text("{}")
    (proj / "config.json").write_text('{"model": "mine"}')
    check_output(proj / "data", command="prepare", makes=DATASET)
