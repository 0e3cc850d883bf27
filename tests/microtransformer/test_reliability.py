"""Reliability and security: nothing lost on crashes, no code run from files.

Covers (see docs/RELIABILITY.md for the summary table):
- malicious pickles in state.pt / weights files are refused without running anything;
- state.pt and weights carry checksums; corruption and truncation are detected naming the file,
  and --resume falls back to the previous intact generation, saying so;
- SIGKILL at several moments (between checkpoints, inside a save before its rename, while
  keeping the previous generation), then --resume: the finished weights are bit-identical to an
  uninterrupted run;
- SIGTERM / SIGINT: finish the step, save, say how to resume, exit 0; a second SIGINT stops now;
- disk full / unwritable directory during a save: one clear line, previous checkpoint intact;
- non-finite steps through the CLI; interrupted downloads leave no file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from microtransformer import checkpoint as ckpt
from microtransformer import training
from microtransformer.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    find_resume_point,
    load_run,
    load_training_state,
    load_weights,
    save_training_state,
    save_weights,
)
from microtransformer.cli import main
from microtransformer.data import sources as data_mod
from microtransformer.errors import UserError
from model import MicroTransformer
from model import losses as model_losses
from model.io import BEST_WEIGHTS_FILE, CONFIG_FILE, PREV_WEIGHTS_FILE, WEIGHTS_FILE

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model.max_seq_len", "16", "--model.embed_dim", "32", "--model.num_heads", "2",
        "--model.num_layers", "2", "--model.ff_dim", "64", "--model.dropout", "0.1",
        "--train.batch_size", "4", "--train.eval_steps", "2", "--train.warmup_steps", "2",
        "--train.log_interval", "1", "--train.cpu_threads", "1", "--no-progress"]
# 10 steps; checkpoints at 3, 6, 9 (+ eval saves at 0, 4, 8 when val improves) and the end.
RUN = [*TINY, "--train.max_steps", "10", "--train.checkpoint_interval", "3",
       "--train.eval_interval", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(char_data: Path, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted run of RUN (same config and seed as every test)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "--data", str(char_data), "--out", str(run), *RUN]) == 0
    tensors, _ = load_weights(run / WEIGHTS_FILE)
    return tensors


def assert_same_weights(run: Path, reference: dict[str, torch.Tensor]) -> None:
    """model.safetensors of `run` equals the reference bit for bit."""
    tensors, meta = load_weights(run / WEIGHTS_FILE)
    assert meta["step"] == "10"
    assert tensors.keys() == reference.keys()
    for k in tensors:
        assert torch.equal(tensors[k], reference[k]), k


def interrupted_run(char_data: Path, run: Path, steps: int, monkeypatch) -> None:
    """Run RUN through the CLI and interrupt it (SIGINT) after `steps` steps: the run saves
    at `steps` (current generation); the previous generation is the save before it."""
    real_step = training.train_step
    count = {"n": 0}

    def step_then_sigint(*args, **kwargs):
        out = real_step(*args, **kwargs)
        count["n"] += 1
        if count["n"] == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(training, "train_step", step_then_sigint)
    assert main(["train", "--data", str(char_data), "--out", str(run), *RUN]) == 0
    monkeypatch.setattr(training, "train_step", real_step)


def no_temp_files(run: Path) -> bool:
    return not [p for p in run.iterdir() if p.name.endswith((".tmp", ".part"))]


# ====================================================================== malicious files
class _CreatesFile:
    """Pickles to a call of builtins.open(marker, "w"): loading it would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _RunsCommand:
    """Pickles to os.system("touch marker")."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path: Path, marker: Path) -> dict[str, bytes]:
    """Crafted state files, each of which would create `marker` if unpickled unsafely."""
    zipped = io.BytesIO()
    torch.save({"step": 1, "x": _CreatesFile(marker)}, zipped)
    shell = io.BytesIO()
    torch.save({"step": 1, "x": _RunsCommand(marker)}, shell)
    # a well-formed checksum envelope around a malicious payload: the checksum passes, the
    # inner load must still refuse it
    inner = shell.getvalue()
    envelope = io.BytesIO()
    torch.save({"format": ckpt.STATE_FORMAT, "sha256": hashlib.sha256(inner).hexdigest(),
                "step": 1, "payload": torch.frombuffer(bytearray(inner), dtype=torch.uint8)},
               envelope)
    return {"zip_open": zipped.getvalue(), "zip_system": shell.getvalue(),
            "raw_pickle": pickle.dumps({"x": _CreatesFile(marker)}, protocol=2),
            "envelope": envelope.getvalue()}


@pytest.mark.parametrize("kind", ["zip_open", "zip_system", "raw_pickle", "envelope"])
def test_malicious_state_is_refused_and_runs_nothing(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "state.pt"
    path.write_bytes(_evil_files(tmp_path, marker)[kind])
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as info:
        load_training_state(path)
    assert not marker.exists()
    if kind != "raw_pickle":  # the zip loads name the blocked global
        assert "refused" in str(info.value) and "could run code" in str(info.value)
    # the sanity check: the payload really does create the file when unpickled unsafely
    if kind == "zip_open":
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_malicious_files_through_the_cli(char_data: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(char_data), "--out", str(run), *TINY,
                 "--train.max_steps", "2"]) == 0
    capsys.readouterr()
    marker = tmp_path / "pwned"
    evil = _evil_files(tmp_path, marker)["zip_open"]
    # both generations replaced (with one left intact, --resume would fall back to it)
    for name in (ckpt.STATE_FILE, ckpt.PREV_STATE, WEIGHTS_FILE, PREV_WEIGHTS_FILE):
        (run / name).write_bytes(evil)  # weights: a pickle posing as safetensors
    for argv in (["train", "--out", str(run), "--resume", "--train.max_steps", "4"],
                 ["info", str(run)],
                 ["generate", str(run), "--max-new-tokens", "2"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert re.search(r"(state|model)\.(prev\.)?(pt|safetensors)", err), err
    assert not marker.exists()


def test_no_unsafe_deserialization_in_the_code() -> None:
    """Every torch.load passes weights_only=True; no pickle/marshal/np.load(allow_pickle)."""
    sources = [*(REPO / "microtransformer").rglob("*.py"), *(REPO / "model").rglob("*.py")]
    assert sources
    loads = 0
    for path in sources:
        text = path.read_text()
        for m in re.finditer(r"(?<![.\w])torch\.load\(([^)]*)\)", text):
            loads += 1
            assert "weights_only=True" in m.group(1), f"{path}: {m.group(0)}"
        for banned in (r"\bpickle\.loads?\(", r"\bmarshal\.loads?\(", r"allow_pickle=True",
                       r"weights_only=False", r"\bdill\.", r"\bjoblib\.load",
                       r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"\bUnpickler\("):
            bad = [ln for ln in text.splitlines() if re.search(banned, ln)
                   and not ln.strip().startswith(("#", '"', "'"))]
            assert not bad, f"{path}: {banned}: {bad}"
    assert loads >= 1  # the one torch.load (checkpoint._safe_torch_load) was seen


# ====================================================================== checksums
def test_state_checksum_detects_a_flipped_payload_byte(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    state = {"step": 3, "w": torch.arange(4096, dtype=torch.float32)}
    save_training_state(path, state)
    raw = bytearray(path.read_bytes())
    # find the stored tensor bytes inside the payload and flip one of them: the zip container
    # still parses, only the checksum can notice
    needle = torch.arange(1000, 1016, dtype=torch.float32).numpy().tobytes()
    at = bytes(raw).find(needle)
    assert at > 0
    raw[at + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"state\.pt fails its checksum"):
        load_training_state(path)


@pytest.mark.parametrize("cut", [0, 1, 100, 0.5, -1])
def test_truncated_state_is_detected_naming_file(tmp_path: Path, cut: float) -> None:
    path = tmp_path / "state.pt"
    save_training_state(path, {"step": 1, "w": torch.ones(256)})
    raw = path.read_bytes()
    n = int(len(raw) * cut) if isinstance(cut, float) else (len(raw) + cut if cut < 0 else cut)
    path.write_bytes(raw[:n])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_training_state(path)


def _corrupt(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "flip":
        b = bytearray(raw)
        b[len(b) * 3 // 4] ^= 0xFF
        path.write_bytes(bytes(b))
    elif how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "delete":
        path.unlink()


# (file(s) damaged, how) -> the resume falls back to the previous generation
CORRUPTIONS = [
    ((WEIGHTS_FILE,), "flip"),
    ((WEIGHTS_FILE,), "truncate"),
    ((ckpt.STATE_FILE,), "flip"),
    ((ckpt.STATE_FILE,), "truncate"),
    ((ckpt.STATE_FILE,), "empty"),
    ((WEIGHTS_FILE,), "delete"),
    ((WEIGHTS_FILE, ckpt.STATE_FILE), "truncate"),
]


@pytest.mark.parametrize("files, how", CORRUPTIONS)
def test_resume_falls_back_to_previous_intact_checkpoint(
    char_data: Path, tmp_path: Path, reference, capsys, monkeypatch, files, how
) -> None:
    run = tmp_path / "run"
    interrupted_run(char_data, run, 7, monkeypatch)  # saves ... 6, then 7 on the interrupt
    # two generations on disk: 7 (current) and 6 (previous)
    assert load_training_state(run / ckpt.STATE_FILE)["step"] == 7
    assert load_training_state(run / ckpt.PREV_STATE)["step"] == 6
    for name in files:
        _corrupt(run / name, how)
    point = find_resume_point(run)
    assert point.step == 6 and not point.is_current
    assert any("newest intact checkpoint: step 6" in n for n in point.notes)
    if how != "delete":
        assert any(n.startswith(files[0]) for n in point.notes)
    capsys.readouterr()
    # resume: falls back to step 6, says so, ends bit-identical to the uninterrupted run
    assert main(["train", "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resume: resuming from the newest intact checkpoint: step 6" in err, err
    assert_same_weights(run, reference)


def test_resume_with_no_intact_checkpoint_is_one_clear_error(
    char_data: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(char_data), "--out", str(run), *RUN,
                 "--train.max_steps", "7"]) == 0
    for name in (WEIGHTS_FILE, PREV_WEIGHTS_FILE):
        _corrupt(run / name, "flip")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no intact checkpoint" in err, err
    assert "model.safetensors" in err and "model.prev.safetensors" in err


def test_load_run_uses_previous_weights_when_last_is_corrupted(
    char_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(char_data), "--out", str(run), *RUN,
                 "--train.max_steps", "7"]) == 0
    _corrupt(run / WEIGHTS_FILE, "truncate")
    with pytest.warns(UserWarning, match=r"model\.safetensors.*previous checkpoint"):
        model, _, _ = load_run(run)
    prev, _ = load_weights(run / PREV_WEIGHTS_FILE)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in prev.items())


# ====================================================================== SIGKILL and resume
DRIVER = r"""
import os, signal, sys
from microtransformer import training
mode, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
count = 0
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "step":  # killed right after optimizer step n, before its checkpoint
    real_step = training.train_step
    def step(*a, **k):
        global count
        out = real_step(*a, **k)
        count += 1
        if count == n:
            die()
        return out
    training.train_step = step
else:  # "replace": killed after the temp file of the n-th write of `target` is complete and
    real_replace = os.replace  # fsynced, just before it is renamed over `target`
    def replace(src, dst, *a, **k):
        global count
        if os.path.basename(dst) == target:
            count += 1
            if count == n:
                die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
from microtransformer.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _killed_run(char_data: Path, run: Path, mode: str, target: str, n: int) -> None:
    argv = ["train", "--data", str(char_data), "--out", str(run), *RUN]
    proc = subprocess.run([sys.executable, "-c", DRIVER, mode, target, str(n), *argv],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def _resume_and_check(run: Path, reference, capsys) -> str:
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 0
    out = capsys.readouterr()
    assert_same_weights(run, reference)
    assert no_temp_files(run)
    return out.err


# (mode, target, n): where the SIGKILL lands
KILLS_FAST = [
    ("step", "-", 5),                          # between checkpoints (last save: step 4)
    ("replace", ckpt.STATE_FILE, 4),           # inside a save: weights renamed, state not yet
]
KILLS_SLOW = [
    ("replace", PREV_WEIGHTS_FILE, 2),         # while keeping the previous generation
    ("step", "-", 1), ("step", "-", 3), ("step", "-", 4), ("step", "-", 7), ("step", "-", 9),
    ("step", "-", 10),
    ("replace", WEIGHTS_FILE, 2), ("replace", WEIGHTS_FILE, 3),
    ("replace", WEIGHTS_FILE, 5), ("replace", BEST_WEIGHTS_FILE, 2),
    ("replace", ckpt.STATE_FILE, 2), ("replace", ckpt.STATE_FILE, 6),
    ("replace", ckpt.PREV_STATE, 1), ("replace", ckpt.PREV_STATE, 3),
    ("replace", CONFIG_FILE, 1),
]


def _kill_case(char_data, tmp_path, reference, capsys, mode, target, n) -> None:
    run = tmp_path / "run"
    _killed_run(char_data, run, mode, target, n)
    if not ckpt.has_checkpoint(run):  # killed before the first checkpoint: start again
        capsys.readouterr()
        assert main(["train", "--out", str(run), "--resume"]) == 2
        assert "cannot resume" in capsys.readouterr().err
        assert main(["train", "--data", str(char_data), "--out", str(run), *RUN]) == 0
        assert_same_weights(run, reference)
        return
    _resume_and_check(run, reference, capsys)


@pytest.mark.parametrize("mode, target, n", KILLS_FAST)
def test_sigkill_then_resume_is_bit_identical(
    char_data, tmp_path, reference, capsys, mode, target, n
) -> None:
    _kill_case(char_data, tmp_path, reference, capsys, mode, target, n)


@pytest.mark.slow
@pytest.mark.parametrize("mode, target, n", KILLS_SLOW)
def test_sigkill_then_resume_is_bit_identical_more_points(
    char_data, tmp_path, reference, capsys, mode, target, n
) -> None:
    _kill_case(char_data, tmp_path, reference, capsys, mode, target, n)


def test_in_process_kill_points_every_save(
    char_data: Path, tmp_path: Path, reference, capsys, monkeypatch
) -> None:
    """Every rename of the run (each one a possible crash point) interrupted in turn; the
    on-disk state at that instant must resume to the same final weights. In-process (an
    exception stands in for the kill, then the files are left exactly as they are)."""
    real_replace = os.replace
    total = {"n": 0}

    def counting(src, dst, *a, **k):
        total["n"] += 1
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", counting)
    assert main(["train", "--data", str(char_data), "--out", str(tmp_path / "count"),
                 *RUN]) == 0
    n_replaces = total["n"]
    monkeypatch.setattr(os, "replace", real_replace)
    assert n_replaces >= 15
    # a sample of crash points spread over the run (all of them under -m slow elsewhere)
    points = sorted({2, n_replaces // 3, n_replaces // 2, n_replaces - 2})

    class Crash(BaseException):
        pass

    for k in points:
        run = tmp_path / f"run{k}"
        seen = {"n": 0}

        def crashing(src, dst, *a, _k=k, _seen=seen, **kw):
            _seen["n"] += 1
            if _seen["n"] == _k:
                raise Crash
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", crashing)
        with pytest.raises(Crash):
            main(["train", "--data", str(char_data), "--out", str(run), *RUN])
        monkeypatch.setattr(os, "replace", real_replace)
        if ckpt.has_checkpoint(run):
            _resume_and_check(run, reference, capsys)
        else:
            assert main(["train", "--data", str(char_data), "--out", str(run), *RUN]) == 0
            assert_same_weights(run, reference)


# ====================================================================== SIGTERM / SIGINT
@pytest.mark.parametrize("sig", [
    signal.SIGTERM,
    # SIGINT in-process: tests/microtransformer/test_training.py; as a process: -m slow
    pytest.param(signal.SIGINT, marks=pytest.mark.slow),
])
def test_signal_finishes_step_saves_and_exits_0(char_data: Path, tmp_path: Path, sig) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "microtransformer", "train", "--data", str(char_data),
           "--out", str(run), *TINY, "--train.max_steps", "100000",
           "--train.eval_interval", "100000", "--train.checkpoint_interval", "100000"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("step 3: loss"):
                break
            assert line, "".join(lines) + proc.stderr.read()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"{sig.name} received" in err and "Traceback" not in err
    m = re.search(r"checkpoint saved at step (\d+)", out)
    assert m, out
    step = int(m.group(1))
    assert 3 <= step < 100000
    assert f"microtransformer train --out {run} --resume" in out
    point = find_resume_point(run)
    assert point.step == step and point.is_current and not point.notes
    assert no_temp_files(run)


def test_second_sigint_stops_at_once() -> None:
    stop = training.StopRequest()
    previous = signal.getsignal(signal.SIGINT)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is previous


# ====================================================================== disk full / unwritable
def _fd_name(fd: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
@pytest.mark.parametrize("target, n", [(WEIGHTS_FILE, 3), (ckpt.STATE_FILE, 3)])
def test_disk_full_during_save_is_one_line_and_keeps_previous_checkpoint(
    char_data: Path, tmp_path: Path, reference, capsys, monkeypatch, target, n
) -> None:
    """ENOSPC from fsync of the n-th write of `target` (the data reached the page cache but
    not the disk): one line, exit 2, the previous checkpoint intact, --resume finishes."""
    real_fsync = os.fsync
    seen = {"n": 0}

    def full_fsync(fd: int) -> None:
        if _fd_name(fd).startswith(f".{target}."):
            seen["n"] += 1
            if seen["n"] == n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    run = tmp_path / "run"
    monkeypatch.setattr(os, "fsync", full_fsync)
    assert main(["train", "--data", str(char_data), "--out", str(run), *RUN]) == 2
    monkeypatch.setattr(os, "fsync", real_fsync)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot write {run / target}: No space left on device" in err, err
    assert "free some disk space" in err
    assert no_temp_files(run)
    point = find_resume_point(run)  # an intact pair is there (checksums verified)
    assert point.step > 0
    _resume_and_check(run, reference, capsys)


def test_unwritable_run_directory_keeps_old_files(tmp_path: Path, monkeypatch) -> None:
    """os.replace refused (EACCES: chmod cannot block root, so the error is injected)."""
    model = MicroTransformer(vocab_size=32, max_seq_len=8, embed_dim=16, num_heads=2,
                             num_layers=1, ff_dim=32)
    path = save_weights(model, tmp_path / "model.safetensors", step=1)
    before = path.read_bytes()

    def refuse(src, dst, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dst)

    monkeypatch.setattr(os, "replace", refuse)
    with torch.no_grad():
        model.ln_f.weight.add_(1.0)
    with pytest.raises(CheckpointWriteError, match=r"cannot write .*model\.safetensors: "
                       r"Permission denied; make the directory writable") as info:
        save_weights(model, path, step=2)
    assert isinstance(info.value, OSError) and info.value.errno == errno.EACCES
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_write_into_a_file_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointWriteError, match=r"cannot write .*blocker/state\.pt"):
        save_training_state(blocker / "state.pt", {"step": 0})


def test_interrupt_inside_a_write_leaves_old_file_and_no_temp(tmp_path: Path,
                                                             monkeypatch) -> None:
    path = tmp_path / "state.pt"
    save_training_state(path, {"step": 1})
    before = path.read_bytes()

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(path, {"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["state.pt"]


# ====================================================================== non-finite steps (CLI)
def test_non_finite_steps_stop_with_one_line_and_keep_last_good_checkpoint(
    char_data: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    real_loss = model_losses.chunked_lm_loss
    calls = {"n": 0}

    def nan_after_5(hidden, head, labels, **kwargs):
        loss = real_loss(hidden, head, labels, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(model_losses, "chunked_lm_loss", nan_after_5)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="update skipped"):
        rc = main(["train", "--data", str(char_data), "--out", str(run), *RUN,
                   "--train.max_bad_steps", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "2 consecutive steps" in err, err
    point = find_resume_point(run)
    # steps 6 and 7 were skipped (weights unchanged, still finite); the interval save at 6
    # is the last checkpoint, step 7 stopped the run before any save
    assert point.step == 6 and point.is_current and point.state["bad_steps"] == 1
    assert all(torch.isfinite(t).all() for t in point.tensors.values())
    assert "step 7: non-finite" not in err  # warnings went through pytest.warns


# ====================================================================== downloads
class _FlakyResponse:
    """A urlopen() response that delivers `good` bytes and then fails like a dropped link."""

    def __init__(self, good: bytes, exc: BaseException) -> None:
        self.headers = {"Content-Length": str(len(good) * 2)}
        self._chunks = [good]
        self._exc = exc

    def read(self, _n: int = -1) -> bytes:
        if self._chunks:
            return self._chunks.pop()
        raise self._exc

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


@pytest.mark.parametrize("exc", [ConnectionResetError(104, "Connection reset by peer"),
                                 KeyboardInterrupt()])
def test_interrupted_download_leaves_no_file(tmp_path: Path, monkeypatch, exc) -> None:
    monkeypatch.setattr(data_mod.urllib.request, "urlopen",
                        lambda url, timeout=None: _FlakyResponse(b"x" * 1000, exc))
    target = tmp_path / "cache" / "input.txt"
    expected = UserError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        data_mod.download_file("https://example.invalid/input.txt", target,
                               sha256="0" * 64, progress=False)
    if expected is UserError:
        assert "interrupted" in str(info.value) and "example.invalid" in str(info.value)
    assert not target.exists() and os.listdir(target.parent) == []
