"""Benchmark `microtransformer serve`: continuous batching vs one request at a time.

Starts the real server (a subprocess on 127.0.0.1, a free port) twice on the same run: with
`--max-batch B` (continuous batching) and with `--max-batch 1` (one sequence at a time, what a
server without batching does), and at each concurrency level (default 1, 8, 32 streaming
clients, each sending requests back to back) measures:

- TTFT: time to first token (request sent -> first chunk with text), p50 / p99
- TPOT: time per output token after the first, per request ((e2e - ttft) / (tokens - 1)), p50 / p99
- end-to-end latency per request, p50 / p99
- aggregate output tokens/s (all tokens received / wall time of the level)

Every request asks for the same number of tokens (`ignore_eos`), so both servers do the same
work. Loopback only; bounded by --requests-per-client and --time-limit per level. Without
--run it builds a run directory with a model of the balanced preset's size (2.43M parameters,
vocab 5000, context 512) and RANDOM weights, with a BPE tokenizer trained on this repository's
own text: speed does not depend on the weights.

    python benchmarks/serve.py                     # writes benchmarks/results/serve_cpu.{json,md}
    python benchmarks/serve.py --run runs/my-run --levels 1,8,32 --max-tokens 64

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
import statistics
import subprocess
import sys
import tempfile
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
    """`microtransformer serve RUN --port 0 ...` as a subprocess; the URL from its banner."""

    def __init__(self, run: Path, max_batch: int, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "microtransformer", "serve", str(run), "--port", "0",
               "--no-ui", "--max-batch", str(max_batch), "--max-queue", "4096", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, env=env, cwd=ROOT)
        self.url = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            match = re.search(r"serving on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                return
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, float]:
    """One streamed completion -> ttft, e2e (seconds) and tokens received."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"]:
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
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
    env: dict[str, Any] = {"python": platform.python_version(), "cores": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        env["cpu"] = info.get("Model name", "?").strip()
        flags = Path("/proc/cpuinfo").read_text()
        env["avx512_bf16"] = "avx512_bf16" in flags
        env["amx_bf16"] = "amx_bf16" in flags
    except (OSError, ValueError):
        pass
    env["loadavg_start"] = os.getloadavg()
    return env


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"CPU: {env.get('cpu', '?')} ({env.get('cores')} cores; avx512_bf16 "
             f"{env.get('avx512_bf16')}, amx_bf16 {env.get('amx_bf16')}); torch "
             f"{env.get('torch')}; load average (1 min) at start "
             f"{env['loadavg_start'][0]:.1f}, at end {env['loadavg_end'][0]:.1f}. Servers: "
             "`microtransformer serve` defaults (1 torch thread on CPU) plus "
             f"`{result['server_args'] or '-'}`; clients in the benchmark process, same machine.",
             f"Model: {result['model']}. Each request: {result['prompt_tokens']} prompt "
             f"tokens, {result['max_tokens']} output tokens (ignore_eos), temperature 0.8, "
             "top-k 50, streamed.",
             f"Command: `{result['command']}`", "",
             "| server | clients | requests | tokens/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
             "| e2e p50 / p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, levels in result["servers"].items():
        for lv in levels:
            lines.append(
                f"| {name} | {lv['clients']} | {lv['requests']} | {lv['tokens_per_s']:,.0f} | "
                f"{lv['ttft_p50_ms']:,.0f} / {lv['ttft_p99_ms']:,.0f} | "
                f"{lv['tpot_p50_ms']:.1f} / {lv['tpot_p99_ms']:.1f} | "
                f"{lv['e2e_p50_ms']:,.0f} / {lv['e2e_p99_ms']:,.0f} |")
    lines.append("")
    for lv in result["ratios"]:
        lines.append(f"- {lv['clients']} clients: batched / one-at-a-time throughput "
                     f"{lv['throughput_ratio']:.2f}x; batched TTFT p99 {lv['ttft_p99_ms']:,.0f}"
                     " ms")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run directory (default: random balanced-size "
                   "model in a temporary directory)")
    p.add_argument("--levels", default="1,8,32", help="concurrent clients per level")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32, help="slots of the batched server")
    p.add_argument("--time-limit", type=float, default=180.0, help="seconds per level at most")
    p.add_argument("--server-args", default="", help="extra options for both servers")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_cpu"),
                   help="output path without extension (.json and .md are written)")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else build_random_run(Path(tmp.name) / "balanced-random")
    from microtransformer.tokenizer import Tokenizer

    prompt_tokens = len(Tokenizer.load(run / "tokenizer.json").encode(PROMPT))
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0.8, "top_k": 50,
            "stream": True, "ignore_eos": True}
    result: dict[str, Any] = {
        "command": "python benchmarks/serve.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
        "environment": environment(), "max_tokens": args.max_tokens,
        "prompt_tokens": prompt_tokens, "server_args": args.server_args,
        "model": (f"{run.name} (random weights, balanced preset size)" if not args.run
                  else str(run.name)),
        "servers": {}}
    extra = args.server_args.split()
    for name, max_batch in ((f"batched (--max-batch {args.max_batch})", args.max_batch),
                            ("one at a time (--max-batch 1)", 1)):
        server = Server(run, max_batch, extra)
        try:
            asyncio.run(run_level(server.url, 2, 1, body, args.time_limit))  # warm-up
            levels_out = []
            for clients in levels:
                lv = asyncio.run(run_level(server.url, clients, args.requests_per_client, body,
                                           args.time_limit))
                levels_out.append(lv)
                print(f"{name:32s} clients {clients:3d}: {lv['tokens_per_s']:8.0f} tok/s, "
                      f"TTFT p50 {lv['ttft_p50_ms']:7.0f} p99 {lv['ttft_p99_ms']:7.0f} ms, "
                      f"TPOT p50 {lv['tpot_p50_ms']:6.1f} ms, e2e p99 {lv['e2e_p99_ms']:7.0f} "
                      "ms", flush=True)
            result["servers"][name] = levels_out
        finally:
            server.stop()
    batched, single = result["servers"].values()
    result["ratios"] = [{"clients": b["clients"],
                         "throughput_ratio": b["tokens_per_s"] / s["tokens_per_s"],
                         "ttft_p99_ms": b["ttft_p99_ms"]} for b, s in zip(batched, single,
                                                                           strict=True)]
    result["environment"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from microtransformer.checkpoint import atomic_write_bytes

    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(result, indent=2) + "\n").encode())
    text = markdown(result)
    atomic_write_bytes(out.with_suffix(".md"), text.encode())
    print(text)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
