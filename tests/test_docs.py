"""Documentation that runs: every shell block in README.md and docs/*.md is executed.

Each fenced block of shell commands (``bash``/``sh``/``console`` blocks, and unlabelled blocks
whose first line is a command) runs as one bash script (`set -euo pipefail`) in one sandbox
directory, file by file in the order README.md, then docs/ alphabetically, so later commands
find what earlier ones made. The sandbox has the inputs the docs name: small stand-ins for
`input.txt`, `more_texts/`, `held_out.txt`, `tinystories_val.txt` and `../shared/data/...`
(and the repository's `scripts/`, as a clone has them), and a download cache
holding tinyshakespeare (the real file, checked against its pinned sha256) and a small
TinyStories stand-in, so the named downloads work offline.

Commands run as written, at reduced size where they train, through shims placed first on PATH:
- `microtransformer train ...` runs first as written with `--dry-run` (the whole config
  resolved and checked against the data), then for real with `REDUCE` appended (2 steps,
  batch 4), so that the runs later commands use exist; `eval` scores at most 4,096 tokens
  and `generate` runs eager (`--no-compile`: compiling costs more than a test's sample);
- `microtransformer study ...` runs with `--dry-run` (settings and corpora checked, the runs
  planned; a study trains for hours);
- `microtransformer serve ...` starts on a free loopback port, must answer `/health`, and is
  stopped; a block that talks to `127.0.0.1:8000` gets a live server on a free port instead;
- `python -m microtransformer` and `torchrun -m microtransformer` go through the same rules;
- a run or data directory that a command reads but no doc made (`runs/a`, `data/shakespeare`)
  is a copy of a small trained stand-in, and the summary says which.
Lines that cannot run here are skipped by the rules in `SKIP` (a CUDA device, two machines,
the test suite itself, a benchmark), each named with its reason in the summary. A command
that fails fails the test with the block and its output.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SHARED_SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
PROGRAMS = {"microtransformer", "python", "torchrun", "bash", "curl", "pytest", "flock",
            "source", "nvidia-smi", "pip", "for", "llama-cli", "llama-server", "ollama", "lms"}
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}
# (pattern on a logical line, why it cannot run here)
SKIP: list[tuple[str, str]] = [
    (r"--train\.device cuda|--device cuda|batch_size auto|nvidia-smi", "needs a CUDA device"),
    (r"--nnodes [2-9]|HOST:", "needs two machines"),
    (r"scripts/test\.sh|^(\S+=\S+ )*pytest", "the test suite itself"),
    (r"scripts/quickstart\.sh", "the main job (minutes; run from a fresh clone, see the note)"),
    # benchmarks take minutes and run on their own; format_variants.py only rewrites a text file
    (r"benchmarks/(?!format_variants\.py)", "a benchmark (minutes; benchmarks are run on their "
     "own)"),
    (r"^source ", "changes the calling shell only"),
    (r"^pip install", "installs packages (the set-up script does that here)"),
    (r"http\.server", "a static file server that runs until stopped (tests serve the page)"),
    (r"^(llama-cli|llama-server|ollama|lms) |localhost:11434",
     "needs llama.cpp's or Ollama's own programs, not installed here"),
]
# appended to every `train` that runs for real: a couple of small steps
# (evaluated and saved at the start and the end only)
REDUCE = ["--train.max_steps", "2", "--train.warmup_steps", "1", "--train.batch_size", "4",
          "--train.eval_steps", "1", "--train.eval_interval", "1000",
          "--train.log_interval", "1", "--train.checkpoint_interval", "1000",
          "--train.cpu_threads", "1", "--no-progress"]


@dataclass
class Block:
    """One shell block of a doc: where it is, its logical lines, and what the test did."""

    path: Path
    line: int
    lines: list[str]
    ran: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def script(self) -> str:
        """The block as a bash script, skipped lines replaced by a comment (and `ran` /
        `skipped` filled in, afresh on each call)."""
        self.ran, self.skipped = [], []
        out = []
        for text in self.lines:
            reason = skip_reason(text)
            if reason is not None:
                self.skipped.append((text, reason))
                out.append(f"# skipped: {reason}")
            else:
                if is_command(text):
                    self.ran.append(text)
                out.append(text)
        return "\n".join(out) + "\n"


def logical_lines(body: str, console: bool) -> list[str]:
    """Lines of a block with `\\` continuations joined, `$ ` prompts stripped (a console block
    with prompts keeps only the prompted lines), blank lines and comment-only lines dropped."""
    joined = re.sub(r"[ \t]*\\\n\s*", " ", body)
    console = console and any(line.lstrip().startswith("$ ") for line in joined.splitlines())
    out = []
    for raw in joined.splitlines():
        text = raw.strip()
        if console:
            if not text.startswith("$ "):
                continue
            text = text[2:]
        if text and not text.startswith("#"):
            out.append(text)
    return out


def first_word(text: str) -> str:
    """The program a logical line runs (after leading VAR=value assignments)."""
    words = text.split()
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    return words[0] if words else ""


def is_command(text: str) -> bool:
    """A line that runs one of the programs the docs show (not an assignment or `done`)."""
    return first_word(text) in PROGRAMS


def skip_reason(text: str) -> str | None:
    """Why this line cannot run here, or None."""
    for pattern, reason in SKIP:
        if re.search(pattern, text):
            return reason
    return None


def doc_blocks(path: Path) -> list[Block]:
    """The shell blocks of one Markdown file, in order."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```([\w-]*)\n(.*?)^```", text, re.S | re.M):
        lang, body = match.group(1), match.group(2)
        if lang not in SHELL_LANGS:
            continue
        lines = logical_lines(body, console=lang == "console")
        if not any(is_command(line) for line in lines):
            continue  # output, a directory tree, a template
        line_no = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(path, line_no, lines))
    return blocks


# ---------------------------------------------------------------- the sandbox
SHIM = '''#!{python}
"""Doc-test shim for `microtransformer` (tests/test_docs.py): reduced training, planned
studies, served-then-stopped servers, and stand-ins for inputs no doc made."""
import os, re, shutil, signal, subprocess, sys, urllib.request
from pathlib import Path

FIXTURES = Path({fixtures!r})
REDUCE = {reduce!r}
args = sys.argv[1:]
cmd = [{python!r}, "-m", "microtransformer"]
log = open(FIXTURES / "standins.log", "a")


def standin(path, kind):
    p = Path(path)
    if not p.exists() and not p.is_absolute() and p.parts[0] in ("runs", "data", "exported"):
        shutil.copytree(FIXTURES / kind, p)
        print(f"{{path}} <- stand-in {{kind}}", file=log, flush=True)


sub = args[0] if args else ""
if sub in ("generate", "eval", "info", "export", "serve"):
    for a in args[1:]:
        if a.startswith("-"):
            break
        standin(a, "run")
if "--data" in args and sub in ("train", "eval"):
    standin(args[args.index("--data") + 1], "data")
if sub == "train" and "--dry-run" not in args:
    sys.path.insert(0, {repo!r})
    from microtransformer.cli import main  # both calls in this one process

    rc = main(args + ["--dry-run"])
    sys.exit(rc or main(args + REDUCE))
elif sub == "eval" and "--max-tokens" not in args:
    args = args + ["--max-tokens", "4096"]
elif sub == "generate" and "--no-compile" not in args:
    args = args + ["--no-compile"]  # the measured compile rule would compile long requests
elif sub == "study" and "--dry-run" not in args:
    args = args + ["--dry-run"]
elif sub == "serve":
    args = [a for a in args]
    for opt, value in (("--port", "0"), ("--host", "127.0.0.1")):
        if opt in args:
            args[args.index(opt) + 1] = value
    if "--port" not in args:
        args += ["--port", "0"]
    proc = subprocess.Popen(cmd + args, stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:
        sys.stderr.write(line)
        m = re.search(r"serving on (http://\\S+)", line)
        if m:
            url = m.group(1)
            break
    ok = False
    if url:
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            ok = r.status == 200
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    sys.exit(0 if ok else 1)
os.execv({python!r}, cmd + args)
'''

PY_SHIM = '''#!/usr/bin/env bash
# `python -m microtransformer ...` goes through the microtransformer shim
if [ "${{1:-}}" = "-m" ] && [ "${{2:-}}" = "microtransformer" ]; then
    shift 2; exec "{shims}/microtransformer" "$@"
fi
exec {python} "$@"
'''

TORCHRUN_SHIM = '''#!/usr/bin/env bash
# torchrun: training reduced like the microtransformer shim's (workers use the real python)
args=("$@")
for a in "$@"; do [ "$a" = "train" ] && args+=({reduce}); done
exec {python} -m torch.distributed.run "${{args[@]}}"
'''

FLOCK_SHIM = '''#!/usr/bin/env bash
# flock LOCKFILE COMMAND...: the doc's advice for a shared machine; here just the command
shift; exec "$@"
'''


def _text(lines: int, seed: str) -> str:
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away", "to",
             "see", "the", "old", "king", "who", "sang", "a", "song", "about", "snow", ",",
             "rain", "and", "the", "sea", "."]
    out = []
    for i in range(lines):
        out.append(" ".join(words[(i * 7 + j * 3 + len(seed)) % len(words)]
                            for j in range(9 + i % 5)).capitalize() + ".\n")
    return "".join(out)


def _stories(n: int) -> str:
    return "".join(f"Once upon a time, a {w} named Lily {_text(3, w)}<|endoftext|>\n"
                   for w in ("girl", "dog", "cat", "boy", "bird") * (n // 5))


def make_sandbox(root: Path) -> tuple[Path, dict[str, str]]:
    """The working directory, inputs and shims; returns (cwd, environment)."""
    work = root / "work"
    work.mkdir()
    (work / "input.txt").write_text(_text(1500, "input"))
    (work / "more_texts").mkdir()
    (work / "more_texts" / "book.txt").write_text(_text(400, "book"))
    (work / "held_out.txt").write_text(_text(200, "held"))
    (work / "tinystories_val.txt").write_text(_text(200, "tsval"))  # RESULTS 19: not in the repo
    (work / "benchmarks").symlink_to(REPO_ROOT / "benchmarks")  # the quick scripts the docs run
    (work / "scripts").symlink_to(REPO_ROOT / "scripts")  # the repository's scripts, as in a clone
    shared = root / "shared" / "data"
    for name, text in (("tinystories/train.txt", _stories(400)),
                       ("tinystories/valid.txt", _stories(60)),
                       ("tinyshakespeare/input.txt", _text(2000, "shk")),
                       ("gutenberg/book_one.txt", _text(800, "one")),
                       ("gutenberg/book_two.txt", _text(800, "two")),
                       ("gutenberg/frankenstein.txt", _text(300, "fr")),
                       ("gutenberg/jane_eyre.txt", _text(300, "je")),
                       ("gutenberg/tom_sawyer.txt", _text(800, "tom")),
                       ("gutenberg/huckleberry_finn.txt", _text(300, "huck")),
                       ("gutenberg/alice_in_wonderland.txt", _text(300, "alice")),
                       ("gutenberg/dracula.txt", _text(300, "dracula")),
                       ("gutenberg/emma.txt", _text(300, "emma")),
                       ("gutenberg/pride_and_prejudice.txt", _text(300, "pride"))):
        (shared / name).parent.mkdir(parents=True, exist_ok=True)
        (shared / name).write_text(text)
    cache = root / "cache"
    cache.mkdir()
    shutil.copyfile(SHARED_SHAKESPEARE, cache / "tinyshakespeare.txt")
    (cache / "TinyStories-valid.txt").write_text(_stories(400))

    fixtures = root / "fixtures"
    fixtures.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(MICROTRANSFORMER_CACHE=str(cache), OMP_NUM_THREADS="1", KEY="doc-test-key",
               PYTHONPATH=str(REPO_ROOT), MPLBACKEND="Agg")
    py = [sys.executable, "-m", "microtransformer"]
    subprocess.run([*py, "prepare", str(work / "input.txt"), "--out", str(fixtures / "data"),
                    "--tokenizer", "char"], check=True, env=env, capture_output=True)
    subprocess.run([*py, "train", "--data", str(fixtures / "data"), "--out",
                    str(fixtures / "run"), "--model.max_seq_len", "64", "--model.embed_dim",
                    "32", "--model.num_heads", "2", "--model.num_layers", "1",
                    "--model.ff_dim", "64", *REDUCE], check=True, env=env, capture_output=True)

    shims = root / "shims"
    shims.mkdir()
    for name, body in (
        ("microtransformer", SHIM.format(python=sys.executable, fixtures=str(fixtures),
                                         reduce=REDUCE, repo=str(REPO_ROOT))),
        ("python", PY_SHIM.format(shims=shims, python=shlex.quote(sys.executable))),
        ("python3", PY_SHIM.format(shims=shims, python=shlex.quote(sys.executable))),
        ("torchrun", TORCHRUN_SHIM.format(python=shlex.quote(sys.executable),
                                          reduce=" ".join(REDUCE))),
        ("flock", FLOCK_SHIM),
    ):
        (shims / name).write_text(body)
        (shims / name).chmod(0o755)
    env["PATH"] = f"{shims}{os.pathsep}{env.get('PATH', '')}"
    return work, env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A live `serve runs/mine` on a free loopback port for blocks that talk to :8000."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        if not (cwd / "runs" / "mine").is_dir():  # README's run, or its stand-in
            fixtures = Path(env["MICROTRANSFORMER_CACHE"]).parent / "fixtures"
            shutil.copytree(fixtures / "run", cwd / "runs" / "mine")
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "microtransformer", "serve", "runs/mine", "--port",
             str(self.port)], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if "serving on" in line:
                return
        raise AssertionError("the doc test's server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


# ---------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    if not SHARED_SHAKESPEARE.is_file():
        pytest.skip("the docs download tinyshakespeare: its pinned copy is ../shared/data")
    return make_sandbox(tmp_path_factory.mktemp("docs"))


RESULTS: dict[str, dict] = {}


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_documented_commands_run(doc: Path, sandbox: tuple[Path, dict[str, str]]) -> None:
    cwd, env = sandbox
    blocks = doc_blocks(doc)
    server = None
    try:
        for block in blocks:
            script = block.script()
            if "127.0.0.1:8000" in script:
                server = server or Server(cwd, env)
                script = script.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
            start = time.perf_counter()
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd,
                                  env=env, capture_output=True, text=True, timeout=600)
            block.seconds = time.perf_counter() - start
            assert proc.returncode == 0, (
                f"{doc.name}:{block.line}: a documented block failed (exit "
                f"{proc.returncode})\n--- block\n{script}--- output (tail)\n"
                f"{(proc.stdout + proc.stderr)[-3000:]}")
    finally:
        if server is not None:
            server.stop()
    ran = sum(len(b.ran) for b in blocks)
    reasons = Counter(reason for b in blocks for _, reason in b.skipped)
    RESULTS[doc.name] = {"ran": ran, "skipped": dict(reasons)}
    print(f"\n{doc.relative_to(REPO_ROOT)}: ran {ran} command(s) in {len(blocks)} block(s)"
          + "".join(f"; skipped {n} ({r})" for r, n in reasons.items())
          + " [" + ", ".join(f"line {b.line}: {b.seconds:.0f}s" for b in blocks) + "]")


def test_zz_summary(sandbox: tuple[Path, dict[str, str]]) -> None:
    """How many commands ran from which files (printed with -s or -rA), and which inputs were
    stand-ins; runs after the per-file tests (name order within the module)."""
    log = Path(sandbox[1]["MICROTRANSFORMER_CACHE"]).parent / "fixtures" / "standins.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    total = sum(r["ran"] for r in RESULTS.values())
    print("\n" + json.dumps(RESULTS, indent=1))
    print(f"documented commands run: {total} from {len(RESULTS)} files; stand-in inputs: "
          + textwrap.shorten(", ".join(sorted(set(lines))) or "none", 400))
    assert total > 0


def test_block_parsing_finds_commands_and_skips_by_rule(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("text\n```bash\nmicrotransformer train --data d \\\n    --out r  # c\n"
                   "torchrun --nnodes 2 -m microtransformer train\n```\n"
                   "```\nmodel/   the network\n```\n"
                   "```console\n$ microtransformer configs | tail -1\n1066 configurations\n```\n"
                   "```python\nprint(1)\n```\n")
    blocks = doc_blocks(doc)
    assert [b.lines for b in blocks] == [
        ["microtransformer train --data d --out r  # c",
         "torchrun --nnodes 2 -m microtransformer train"],
        ["microtransformer configs | tail -1"]]
    script = blocks[0].script()
    assert blocks[0].ran == ["microtransformer train --data d --out r  # c"]
    assert blocks[0].skipped[0][1] == "needs two machines" and "# skipped" in script
