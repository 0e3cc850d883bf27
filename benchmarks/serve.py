"""Benchmark `microtransformer serve`: continuous batching vs one request at a time vs llama.cpp.

Starts the real server (a subprocess on 127.0.0.1, a free port) twice on the same run: with
`--max-batch B` (continuous batching) and with `--max-batch 1` (one sequence at a time, what a
server without batching does), both with `--server-args` (default `--compile-after 1`: every
bucket's step is compiled on first use; warm-up passes of every level, and of every power of two
of clients below the largest level (so each row bucket is used with both column buckets, not
only by chance at a level's tail), trigger them until a pass compiles nothing new, and the
measurement starts once `/metrics` shows no compile pending).
The servers share a fresh inductor cache folder and a fresh folder of packaged decode steps
(`MICROTRANSFORMER_CACHE_DIR`), so the first compiles cold and the second reuses what it can
(compile seconds from the logs). At each concurrency level (default 1, 8, 32
streaming clients, each sending requests back to back) it measures:

- TTFT: time to first token (request sent -> first chunk with text), p50 / p99
- TPOT: time per output token after the first, per request ((e2e - ttft) / (tokens - 1)), p50 / p99
- end-to-end latency per request, p50 / p99
- aggregate output tokens/s (all tokens received / wall time of the level)

and, as a third column, llama.cpp on the same model exported to GGUF (f32) through
node-llama-cpp's batched API (`interop/llama_parallel.mjs`: one context with `sequences: N`,
N greedy sequences of the same prompt and length decoded at once, no HTTP). `--rounds` rounds
of every level, the three alternating, give medians and paired ratios with their spreads.

Every request asks for the same number of tokens (`ignore_eos`), so all do the same work.
Loopback only; bounded by --requests-per-client and --time-limit per level. Without --run it
builds a run directory with a model of the balanced preset's size (2.43M parameters, vocab
5000, context 512) and RANDOM weights, with a BPE tokenizer trained on this repository's own
text: speed does not depend on the weights.

    python benchmarks/serve.py                     # writes benchmarks/results/serve_cpu.{json,md}
    python benchmarks/serve.py --server-args "--compile-after 1 --precision bf16" \
        --out benchmarks/results/serve_cpu_bf16

This is a measurement script, not part of the test suite: it asserts nothing about speed.
The clients run in this process, on the same machine as the server (they share its cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

BALANCED = dict(vocab_size=5000, max_seq_len=512, embed_dim=160, num_heads=5, num_layers=5,
                ff_dim=640)
PROMPT = ("Once upon a time, in a small town by the sea, there lived an old fisherman who "
          "told stories to the children every evening.")


def build_random_run(out: Path) -> Path:
    """A run directory: balanced-preset-sized model with random weights + a BPE tokenizer."""
    import torch

    from microtransformer.checkpoint import save_weights
    from microtransformer.config import RunConfig
    from microtransformer.tokenizer import train_tokenizer
    from model import MicroTransformer, ModelConfig

    texts = [p.read_text(encoding="utf-8") for p in sorted(ROOT.rglob("*"))
             if p.suffix in (".py", ".md", ".toml") and ".venv" not in p.parts
             and ".git" not in p.parts]
    tok = train_tokenizer(texts, kind="bpe", vocab_size=BALANCED["vocab_size"])
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BALANCED, "vocab_size": tok.vocab_size}, dropout=0.0)
    out.mkdir(parents=True, exist_ok=True)
    RunConfig(model=cfg).save_json(out / "config.json")
    tok.save(out / "tokenizer.json")
    save_weights(MicroTransformer.from_config(cfg), out / "model.safetensors", step=0)
    return out


class Server:
    """`microtransformer serve RUN --port 0 ...` as a subprocess; the URL from its banner, and
    its later log lines (the compile progress) read in a background thread."""

    def __init__(self, run: Path, max_batch: int, extra: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.cmd = [sys.executable, "-m", "microtransformer", "serve", str(run), "--port", "0",
                    "--no-ui", "--max-batch", str(max_batch), "--max-queue", "4096", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, env=env, cwd=ROOT)
        self.url = ""
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.lines.append(line.rstrip())
            match = re.search(r"serving on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                threading.Thread(target=self._read, daemon=True).start()
                return
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("the server did not start:\n" + "\n".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def compile_seconds(self) -> dict[str, float]:
        """Compiled buckets ("rows x columns") -> seconds, from the server's log."""
        out = {}
        for line in self.lines:
            m = re.search(r"compiled bucket \((\d+), (\d+)\) in ([\d.]+) s", line)
            if m:
                out[f"{m.group(1)}x{m.group(2)}"] = float(m.group(3))
        return out

    def compile_failures(self) -> list[str]:
        """The buckets whose compile failed (they stay eager), from the server's log."""
        return [line for line in self.lines if "compiling bucket" in line and "failed" in line]

    def wait_compiled(self, timeout: float) -> bool:
        """Wait until no bucket is queued or compiling (`/metrics`); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = httpx.get(self.url + "/metrics", timeout=30).text
            m = re.search(r"^microtransformer_compile_pending\{[^}]*\} (\S+)$", text,
                          re.MULTILINE)
            if m is None or float(m.group(1)) == 0:
                return True
            time.sleep(1.0)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, float]:
    """One streamed completion -> ttft, e2e (seconds) and tokens received.

    The client shares the server's cores, so it is kept cheap: the raw bytes are split into
    events without parsing each event's JSON; the first event with a choice (`"choices":[{`,
    which cannot occur escaped inside a JSON string) is the first token, and the tokens
    received are the usage chunk's `completion_tokens` (`stream_options.include_usage`: one
    event may carry several tokens when the server coalesces a stream's pending tokens)."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    buffer = b""
    body = {**body, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for data in r.aiter_raw():
            *events, buffer = (buffer + data).split(b"\n\n")
            for event in events:
                if event.startswith(b'data: {"error"'):
                    raise RuntimeError(json.loads(event[6:])["error"]["message"])
                if ttft is None and b'"choices":[{' in event:
                    ttft = time.perf_counter() - start
                elif b'"choices":[],' in event:
                    tokens = json.loads(event[6:])["usage"]["completion_tokens"]
    e2e = time.perf_counter() - start
    return {"ttft": ttft or e2e, "e2e": e2e, "tokens": tokens,
            "tpot": (e2e - (ttft or e2e)) / max(tokens - 1, 1)}


async def run_level(url: str, clients: int, per_client: int, body: dict[str, Any],
                    time_limit: float) -> dict[str, Any]:
    """`clients` concurrent clients, each sending `per_client` requests back to back."""
    results: list[dict[str, float]] = []
    deadline = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(w: int) -> None:
            for i in range(per_client):
                if time.monotonic() > deadline:
                    return
                results.append(await one_request(client, {**body, "seed": w * 1000 + i}))

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)

    def pct(key: str, q: float) -> float:
        values = sorted(r[key] for r in results)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    return {"clients": clients, "requests": len(results), "wall_s": wall,
            "output_tokens": tokens, "tokens_per_s": tokens / wall,
            **{f"{k}_p{int(q * 100)}_ms": 1000 * pct(k, q) for k in ("ttft", "tpot", "e2e")
               for q in (0.5, 0.99)},
            "mean_tokens_per_request": statistics.mean(r["tokens"] for r in results)}


def environment() -> dict[str, Any]:
    import torch

    from microtransformer.device import cpu_flags, cpu_model, read_cpuinfo

    cpuinfo = read_cpuinfo()
    flags = cpu_flags(cpuinfo)
    env: dict[str, Any] = {"python": platform.python_version(), "cores": os.cpu_count(),
                           "torch": torch.__version__, "cpu": cpu_model(cpuinfo),
                           "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}
    env["loadavg_start"] = os.getloadavg()
    return env


def llama_level(gguf: Path, prompt_ids: list[int], sequences: int, tokens: int,
                threads: int) -> dict[str, Any]:
    """`node interop/llama_parallel.mjs`: `sequences` greedy sequences of `tokens` tokens at
    once in one llama.cpp context (one timed round after its warm-up)."""
    request = {"model": str(gguf), "prompt": prompt_ids, "sequences": sequences,
               "tokens": tokens, "repeats": 1, "threads": threads}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        out = subprocess.run(["node", str(ROOT / "interop" / "llama_parallel.mjs"), f.name],
                             capture_output=True, text=True, timeout=600, check=True).stdout
    finally:
        os.unlink(f.name)
    run = json.loads(out)["runs"][0]
    ttft = sorted(run["ttft_ms"])
    return {"clients": sequences, "requests": sequences, "wall_s": run["wall_s"],
            "output_tokens": sum(run["generated"]), "tokens_per_s": run["tokens_per_s"],
            "ttft_p50_ms": ttft[len(ttft) // 2], "ttft_p99_ms": ttft[-1]}


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(sp: dict[str, float], digits: int = 0) -> str:
    return (f"{sp['median']:,.{digits}f} ({sp['min']:,.{digits}f}-{sp['max']:,.{digits}f})"
            if sp["min"] != sp["max"] else f"{sp['median']:,.{digits}f}")


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    rounds = result["rounds"]
    lines = [f"CPU: {env.get('cpu', '?')} ({env.get('cores')} cores; avx512_bf16 "
             f"{env.get('avx512_bf16')}, amx_bf16 {env.get('amx_bf16')}); torch "
             f"{env.get('torch')}; load average (1 min) at start "
             f"{env['loadavg_start'][0]:.1f}, at end {env['loadavg_end'][0]:.1f}. Clients in "
             "the benchmark process, same machine.",
             f"Model: {result['model']}. Each request: {result['prompt_tokens']} prompt "
             f"tokens, {result['max_tokens']} output tokens (ignore_eos), temperature 0.8, "
             "top-k 50, streamed. llama.cpp: the same model exported to GGUF (f32), "
             "N greedy sequences of the same prompt and length at once in one context "
             f"(`sequences: N`, {result['llama_threads']} thread(s)), no HTTP.",
             f"Command: `{result['command']}`"]
    for name, cmd in result["server_commands"].items():
        lines.append(f"- {name}: `{cmd}`")
    if result.get("llama_command"):
        lines.append(f"- llama.cpp: `{result['llama_command']}`")
    lines += ["", f"Medians over {rounds} rounds (min-max), the servers and llama.cpp "
              "alternating within each round:", "",
              "| server | clients | tokens/s | TTFT p50 / p99 ms | TPOT p50 ms | e2e p99 ms |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, levels in result["summary"].items():
        for lv in levels:
            tpot = _fmt(lv["tpot_p50_ms"], 1) if "tpot_p50_ms" in lv else "-"
            e2e = _fmt(lv["e2e_p99_ms"]) if "e2e_p99_ms" in lv else "-"
            lines.append(f"| {name} | {lv['clients']} | {_fmt(lv['tokens_per_s'])} | "
                         f"{lv['ttft_p50_ms']['median']:,.0f} / "
                         f"{_fmt(lv['ttft_p99_ms'])} | {tpot} | {e2e} |")
    lines += ["", "Paired ratios of aggregate tokens/s, per round, median (min-max):", ""]
    for r in result["ratios"]:
        text = (f"- {r['clients']} clients: batched / one at a time "
                f"{_fmt(r['vs_one_at_a_time'], 2)}x")
        if "vs_llama" in r:
            text += f"; batched / llama.cpp {_fmt(r['vs_llama'], 2)}x"
        lines.append(text)
    comp = result.get("compile_seconds") or {}
    if comp:
        lines += ["", "Compile seconds per bucket (rows x columns), from the server logs "
                  "(inductor cache and packaged steps: fresh folders for the first server, "
                  "reused by the second):", ""]
        for name, buckets in comp.items():
            total = sum(buckets.values())
            failed = len(result.get("compile_failures", {}).get(name, []))
            lines.append(f"- {name}: {len(buckets)} buckets, {total:.1f} s in all "
                         f"({failed} failed); " +
                         ", ".join(f"{b} {t:.1f}" for b, t in buckets.items()))
    return "\n".join(lines) + "\n"


def summarize(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's rounds -> medians and spreads of its numbers."""
    out: dict[str, Any] = {"clients": levels[0]["clients"],
                           "requests": sum(lv["requests"] for lv in levels)}
    for key in levels[0]:
        if key.endswith("_ms") or key == "tokens_per_s":
            out[key] = spread([lv[key] for lv in levels])
    return out


COMPILE_PROBE = """
import json, sys, time, torch
torch.set_num_threads(1)
from microtransformer.checkpoint import load_run
from microtransformer.serve.engine import Engine
model, tok, _ = load_run(sys.argv[1])
engine = Engine(model, tok, max_batch=int(sys.argv[2]), dtype=sys.argv[3], compile=True)
out, steps = {}, {}
for bucket in json.loads(sys.argv[4]):
    start = time.perf_counter()
    fast = engine.runner.compiled_step(tuple(bucket))
    name = "x".join(map(str, bucket))
    out[name] = time.perf_counter() - start
    eager = engine.runner.steps[tuple(bucket)]
    rows = bucket[0]
    tokens = torch.zeros(rows, dtype=torch.long)
    cols = torch.full((rows,), 50)
    times = {"eager_ms": [], "compiled_ms": []}
    for _ in range(5):  # alternating blocks of 100 steps
        for key, step in (("eager_ms", eager), ("compiled_ms", fast)):
            step.step(tokens, cols, cols)
            t = time.perf_counter()
            for _ in range(100):
                step.step(tokens, cols, cols)
            times[key].append((time.perf_counter() - t) * 10)
    steps[name] = times
print(json.dumps({"compile_s": out, "steps": steps}))
"""


def compile_times(run: Path, max_batch: int, precision: str, buckets: list[list[int]],
                  repeats: int = 2) -> dict[str, Any]:
    """Compile `buckets` in fresh processes with no traffic: first with an empty inductor
    cache (cold), then `repeats - 1` more times over the same cache (cached); in each process
    also the eager and the compiled step of each bucket, 5 alternating blocks of 100 steps
    (ms per step, and compiled / eager per block)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": cache,
               "MICROTRANSFORMER_CACHE_DIR": str(Path(cache) / "packages")}
        runs = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", COMPILE_PROBE, str(run), str(max_batch),
                                  precision, json.dumps(buckets)], capture_output=True,
                                 text=True, env=env, cwd=ROOT, timeout=900, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    ratios = {b: spread([c / e for run in runs for e, c in zip(run["steps"][b]["eager_ms"],
                                                               run["steps"][b]["compiled_ms"],
                                                               strict=True)])
              for b in runs[0]["steps"]}
    return {"precision": precision, "cold": runs[0]["compile_s"],
            "cached": [r["compile_s"] for r in runs[1:]],
            "step_ms": {b: {k: spread([v for run in runs for v in run["steps"][b][k]])
                            for k in ("eager_ms", "compiled_ms")} for b in runs[0]["steps"]},
            "compiled_over_eager": ratios, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run directory (default: random balanced-size "
                   "model in a temporary directory)")
    p.add_argument("--levels", default="1,8,32", help="concurrent clients per level")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32, help="slots of the batched server")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all levels (spreads)")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per level at most")
    p.add_argument("--server-args", default="--compile-after 1",
                   help="extra options for both servers (default: compile every bucket on "
                        "first use)")
    p.add_argument("--baseline-args", default="",
                   help="extra options for the one-at-a-time server only (after "
                        "--server-args), e.g. --no-compile for the eager baseline")
    p.add_argument("--compile-wait", type=float, default=900.0,
                   help="seconds to wait for the warm-up's compiles before measuring")
    p.add_argument("--inductor-cache", default=None,
                   help="TORCHINDUCTOR_CACHE_DIR of the servers (default: a fresh temporary "
                        "folder, so the first server compiles cold)")
    p.add_argument("--no-llama", action="store_true", help="leave out the llama.cpp column")
    p.add_argument("--llama-threads", type=int, default=1)
    p.add_argument("--compile-times", action="store_true",
                   help="only time the compile of buckets 1x64 and 32x128 in fresh processes, "
                        "cold (empty inductor cache) then cached, with no traffic")
    p.add_argument("--precision", default="fp32", help="precision for --compile-times")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_cpu"),
                   help="output path without extension (.json and .md are written)")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else build_random_run(Path(tmp.name) / "balanced-random")
    from microtransformer.tokenizer import Tokenizer

    if args.compile_times:
        times = compile_times(run, args.max_batch, args.precision, [[1, 64], [args.max_batch, 128]],
                              repeats=1 + args.rounds)
        times.update(command="python benchmarks/serve.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), environment=environment())
        print(json.dumps(times, indent=2))
        out = Path(args.out)
        from microtransformer.checkpoint import atomic_write_bytes

        atomic_write_bytes(out.with_suffix(".json"), (json.dumps(times, indent=2) + "\n").encode())
        tmp.cleanup()
        return 0
    prompt_ids = Tokenizer.load(run / "tokenizer.json").encode(PROMPT)
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0.8, "top_k": 50,
            "stream": True, "ignore_eos": True}
    llama = (not args.no_llama and shutil.which("node") is not None
             and (ROOT / "interop" / "node_modules" / "node-llama-cpp").is_dir())
    gguf = Path(tmp.name) / "model-f32.gguf"
    if llama:
        from microtransformer.checkpoint import load_run
        from microtransformer.export_gguf import export_gguf

        model, tok, _ = load_run(run)
        export_gguf(model, gguf, tok, quant="f32")
    cache = args.inductor_cache or str(Path(tmp.name) / "inductor-cache")
    packages = str(Path(tmp.name) / "packages")  # the packaged steps: fresh, like the cache
    result: dict[str, Any] = {
        "command": "python benchmarks/serve.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
        "environment": environment(), "max_tokens": args.max_tokens,
        "prompt_tokens": len(prompt_ids), "server_args": args.server_args,
        "rounds": args.rounds, "llama_threads": args.llama_threads,
        "llama_command": ("node interop/llama_parallel.mjs REQUEST.json (sequences N, tokens "
                          f"{args.max_tokens}, threads {args.llama_threads})" if llama else None),
        "model": (f"{run.name} (random weights, balanced preset size)" if not args.run
                  else str(run.name)),
        "server_commands": {}, "rounds_raw": {}}
    extra = args.server_args.split()
    servers: dict[str, Server] = {}
    try:
        for name, max_batch in ((f"batched (--max-batch {args.max_batch})", args.max_batch),
                                ("one at a time (--max-batch 1)", 1)):
            server = Server(run, max_batch,
                            extra + (args.baseline_args.split() if max_batch == 1 else []),
                            env={"TORCHINDUCTOR_CACHE_DIR": cache,
                                 "MICROTRANSFORMER_CACHE_DIR": packages})
            servers[name] = server
            result["server_commands"][name] = " ".join(
                ["microtransformer", *server.cmd[3:]]).replace(str(run), "RUN")
            start = time.perf_counter()
            # warm-up passes until no new bucket compiles: every level, and every power of two
            # of clients below the largest (a bucket of few rows at 128 columns was otherwise
            # first used, and compiled, during a measured round now and then)
            warm = sorted(set(levels) | {1 << i for i in range(max(levels).bit_length())
                                         if 1 << i < max(levels)})
            for _ in range(3):
                before = len(server.compile_seconds())
                for clients in warm:
                    asyncio.run(run_level(server.url, clients, args.requests_per_client, body,
                                          args.time_limit))
                if not server.wait_compiled(args.compile_wait):
                    print(f"{name}: compiles still running after {args.compile_wait} s",
                          flush=True)
                if len(server.compile_seconds()) == before:
                    break
            print(f"{name}: warm-up and compiles {time.perf_counter() - start:.0f} s, "
                  f"compiled {server.compile_seconds()}, failed {server.compile_failures()}",
                  flush=True)
            result["rounds_raw"][name] = {c: [] for c in levels}
        if llama:
            result["rounds_raw"]["llama.cpp"] = {c: [] for c in levels}
        names = list(result["rounds_raw"])
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for clients in levels:
                for name in order:
                    if name == "llama.cpp":
                        lv = llama_level(gguf, prompt_ids, clients, args.max_tokens,
                                         args.llama_threads)
                    else:
                        lv = asyncio.run(run_level(servers[name].url, clients,
                                                   args.requests_per_client, body,
                                                   args.time_limit))
                    result["rounds_raw"][name][clients].append(lv)
                    print(f"round {r + 1} {name:32s} clients {clients:3d}: "
                          f"{lv['tokens_per_s']:8.0f} tok/s, TTFT p50 {lv['ttft_p50_ms']:7.0f} "
                          f"p99 {lv['ttft_p99_ms']:7.0f} ms", flush=True)
        result["compile_seconds"] = {name: s.compile_seconds() for name, s in servers.items()}
        result["compile_failures"] = {name: s.compile_failures() for name, s in servers.items()}
        result["server_logs"] = {name: [line for line in s.lines if "compil" in line]
                                 for name, s in servers.items()}  # no machine paths
    finally:
        for server in servers.values():
            server.stop()
    result["summary"] = {name: [summarize(per[c]) for c in levels]
                         for name, per in result["rounds_raw"].items()}
    batched, single = (result["rounds_raw"][n] for n in names[:2])
    result["ratios"] = []
    for c in levels:
        entry: dict[str, Any] = {"clients": c, "vs_one_at_a_time": spread(
            [b["tokens_per_s"] / s["tokens_per_s"] for b, s in zip(batched[c], single[c],
                                                                    strict=True)])}
        if llama:
            entry["vs_llama"] = spread(
                [b["tokens_per_s"] / lv["tokens_per_s"]
                 for b, lv in zip(batched[c], result["rounds_raw"]["llama.cpp"][c],
                                  strict=True)])
        result["ratios"].append(entry)
    result["environment"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from microtransformer.checkpoint import atomic_write_bytes

    result["rounds_raw"] = {n: {str(c): v for c, v in per.items()}
                            for n, per in result["rounds_raw"].items()}
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(result, indent=2) + "\n").encode())
    text = markdown(result)
    atomic_write_bytes(out.with_suffix(".md"), text.encode())
    print(text)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
