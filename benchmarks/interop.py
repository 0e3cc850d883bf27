"""Batch-1 greedy decoding speed of one model in four runtimes, on this machine:

- ours: `AutoPathGenerator`, the path `microtransformer generate` takes (eager, no compile here),
- Hugging Face GPT-2: the `export --format hf` directory, `model.generate(do_sample=False)`,
- llama.cpp: the `export --format gguf` files (f32 and q8_0) through node-llama-cpp
  (interop/llama.mjs) with its best settings for this size: flash attention off, f32 KV cache,
  `--threads` threads (the rate of its own decoding loop, model loading excluded),
- the web page: `export --format web` in headless Chromium from a loopback static server
  (ONNX Runtime Web, WebAssembly, one thread, a KV cache; the rate the page itself shows).

All four get the same weights, the same prompt and the same number of new tokens; rounds are
interleaved (each round times every runtime once) so background load hits them alike. Reported:
median and min-max tokens/s per runtime and the median per-round ratio to ours. The model is a
trained run (`--run`) or, by default, a random-initialised preset shape with a byte-level BPE
tokenizer trained on Python's standard library sources (speed does not depend on training).

    flock /tmp/mt-heavy.lock python benchmarks/interop.py --rounds 5
    python benchmarks/interop.py --run runs/x --threads 2 --new-tokens 256

A measurement script, not a test: it asserts nothing about speed. Needs node + `npm ci` in
interop/ (llama.cpp, ONNX Runtime Web), Debian's chromium + chromedriver, transformers, gguf.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.run import PRESETS, cpu_description  # noqa: E402
from microtransformer.checkpoint import load_run  # noqa: E402
from microtransformer.decoding.generator import AutoPathGenerator  # noqa: E402
from microtransformer.export import export_hf  # noqa: E402
from microtransformer.export_gguf import export_gguf  # noqa: E402
from microtransformer.export_web import export_web  # noqa: E402
from microtransformer.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from model import MicroTransformer  # noqa: E402

RUNTIMES = ("ours", "hf_gpt2", "llama_cpp", "llama_cpp_q8_0", "web_chromium")
LABELS = {"ours": "ours (AutoPathGenerator)", "hf_gpt2": "HF GPT-2 (transformers)",
          "llama_cpp": "llama.cpp (node-llama-cpp, f32)",
          "llama_cpp_q8_0": "llama.cpp (node-llama-cpp, q8_0)",
          "web_chromium": "web page (Chromium, ORT Web wasm)"}


# ---------------------------------------------------------------------------- the model
def build_model(args: argparse.Namespace) -> tuple[MicroTransformer, Tokenizer, str]:
    """(model, tokenizer, description) from --run or a random-initialised preset."""
    if args.run:
        model, tok, _ = load_run(args.run, "last", "cpu")
        return model.eval(), tok, f"run {Path(args.run).name}"
    sources = sorted(Path(os.__file__).parent.glob("*.py"))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sources]
    tok = train_tokenizer(texts, kind="bpe", vocab_size=5000)
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=tok.vocab_size, max_seq_len=512, dropout=0.0,
                             **PRESETS[args.preset])
    return model.eval(), tok, f"{args.preset} preset, random init"


# ---------------------------------------------------------------------------- runtimes
class Runtimes:
    """Each runtime prepared once; `measure(name)` times one greedy generation (tokens/s)."""

    def __init__(self, model: MicroTransformer, tok: Tokenizer, args: argparse.Namespace,
                 work: Path) -> None:
        self.args, self.work = args, work
        self.prompt_ids = tok.encode(args.prompt)
        self.input_ids = torch.tensor([self.prompt_ids])  # (1, T0)
        torch.set_num_threads(args.threads)
        self.fast = AutoPathGenerator(model, compile=False, threads=args.threads)
        self.model = model
        from transformers import AutoModelForCausalLM

        export_hf(model, work / "hf", tok)
        self.hf = AutoModelForCausalLM.from_pretrained(work / "hf").eval()
        export_gguf(model, work / "model-f32.gguf", tok, quant="f32")
        export_gguf(model, work / "model-q8_0.gguf", tok, quant="q8_0")
        export_web(model, work / "site", tok)
        self._server = self._start_server(work)
        self._browser = self._start_browser(work)

    # ours and HF: wall time of one generate call -------------------------------------
    def _time(self, fn: Any) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        return (out.shape[1] - self.input_ids.shape[1]) / (time.perf_counter() - start)

    def ours(self) -> float:
        return self._time(lambda: self.fast.generate(
            self.input_ids, max_new_tokens=self.args.new_tokens, do_sample=False))

    def hf_gpt2(self) -> float:
        n = self.args.new_tokens
        return self._time(lambda: self.hf.generate(
            self.input_ids, attention_mask=torch.ones_like(self.input_ids), do_sample=False,
            max_new_tokens=n, min_new_tokens=n, pad_token_id=0))

    # llama.cpp: node-llama-cpp reports tokens/s of its own loop -------------------------
    def llama_cpp(self, quant: str = "f32") -> float:
        req = self.work / "llama.json"
        req.write_text(json.dumps({
            "model": str(self.work / f"model-{quant}.gguf"), "threads": self.args.threads,
            "bench": {"prompt": self.prompt_ids, "tokens": self.args.new_tokens, "repeats": 1}}))
        proc = subprocess.run(["node", str(ROOT / "interop" / "llama.mjs"), str(req)],
                              capture_output=True, text=True, check=True, cwd=ROOT / "interop")
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["bench"]["tokens_per_s"][0])

    def llama_cpp_q8_0(self) -> float:
        return self.llama_cpp("q8_0")

    # the web page: the rate the page itself shows --------------------------------------
    def _start_server(self, root: Path) -> http.server.ThreadingHTTPServer:
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

        httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd

    def _start_browser(self, work: Path) -> Any:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        from tests.microtransformer.serve.test_playground import CHROMIUM_FLAGS

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        driver = shutil.which("chromedriver")
        if not chromium or not driver:
            raise SystemExit("needs Debian's chromium + chromedriver: apt-get install -y "
                             "chromium chromium-driver")
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={work / 'chromium-profile'}")
        return webdriver.Chrome(service=Service(driver), options=options)

    def web_chromium(self) -> float:
        from selenium.webdriver.support.ui import WebDriverWait

        query = urllib.parse.urlencode({"prompt": self.args.prompt, "temperature": 0,
                                        "max_tokens": self.args.new_tokens, "autorun": 1})
        port = self._server.server_address[1]
        self._browser.get(f"http://127.0.0.1:{port}/site/index.html?{query}")
        WebDriverWait(self._browser, 600, poll_frequency=0.05).until(
            lambda d: d.find_element("id", "output").get_attribute("data-done") == "1")
        error = self._browser.find_element("id", "error").text
        if error:
            raise RuntimeError(f"the page failed: {error}")
        stats = self._browser.find_element("id", "stats")
        return float(stats.get_attribute("data-tokens-per-s"))

    def chromium_version(self) -> str:
        return str(self._browser.capabilities.get("browserVersion", "?"))

    def close(self) -> None:
        self._browser.quit()
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------- report
def node_package_version(name: str) -> str:
    pkg = ROOT / "interop" / "node_modules" / name / "package.json"
    return json.loads(pkg.read_text())["version"] if pkg.is_file() else "?"


def report(results: dict[str, list[float]], env: dict[str, Any]) -> str:
    """Markdown table: median (min-max) tokens/s and the median per-round ratio to ours."""
    lines = [
        f"Model: {env['model']} ({env['parameters']:,} parameters, vocab {env['vocab']}); "
        f"prompt {env['prompt_tokens']} tokens, {env['new_tokens']} new tokens, greedy, "
        f"batch 1, {env['threads']} thread(s) everywhere; rounds {env['rounds']} (interleaved).",
        f"CPU: {env['cpu']} ({env['cpus']} CPUs); torch {env['torch']}, transformers "
        f"{env['transformers']}, node-llama-cpp {env['node_llama_cpp']}, onnxruntime-web "
        f"{env['onnxruntime_web']}, Chromium {env['chromium']}, node {env['node']}.",
        f"Command: `{env['command']}`",
        "",
        "| runtime | tokens/s (median, min-max) | ratio to ours (median of rounds) |",
        "| --- | --- | --- |",
    ]
    ours = results["ours"]
    for name in RUNTIMES:
        vals = results[name]
        ratios = [v / o for v, o in zip(vals, ours, strict=True)]
        lines.append(f"| {LABELS[name]} | {statistics.median(vals):,.0f} "
                     f"({min(vals):,.0f}-{max(vals):,.0f}) | "
                     f"{statistics.median(ratios):.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="a run directory (default: a preset, random)")
    p.add_argument("--preset", default="balanced", choices=sorted(PRESETS))
    p.add_argument("--prompt", default="def main():\n    ")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="threads for every runtime (1 is best on a shared 2-core machine)")
    p.add_argument("--tag", default="interop_cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    model, tok, desc = build_model(args)
    results: dict[str, list[float]] = {name: [] for name in RUNTIMES}
    with tempfile.TemporaryDirectory(prefix="mt-interop-") as tmp:
        rt = Runtimes(model, tok, args, Path(tmp))
        try:
            for name in RUNTIMES:  # warm-up: first calls pay for loading and JIT
                getattr(rt, name)()
            for r in range(args.rounds):
                order = RUNTIMES if r % 2 == 0 else tuple(reversed(RUNTIMES))
                for name in order:
                    results[name].append(getattr(rt, name)())
                print(f"round {r + 1}: " + ", ".join(f"{n} {results[n][-1]:.0f}"
                                                     for n in RUNTIMES), flush=True)
            chromium = rt.chromium_version()
        finally:
            rt.close()
    import transformers

    env = {
        "model": desc, "parameters": sum(q.numel() for q in model.parameters()),
        "vocab": model.config.vocab_size, "prompt_tokens": len(tok.encode(args.prompt)),
        "new_tokens": args.new_tokens, "threads": args.threads, "rounds": args.rounds,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "node_llama_cpp": node_package_version("node-llama-cpp"),
        "onnxruntime_web": node_package_version("onnxruntime-web"), "chromium": chromium,
        "node": subprocess.run(["node", "--version"], capture_output=True,
                               text=True).stdout.strip(),
        "python": platform.python_version(),
        "command": " ".join(["benchmarks/interop.py", *sys.argv[1:]]),
        **cpu_description(),
    }
    text = report(results, env)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.md").write_text(text)
    (out / f"{args.tag}.json").write_text(json.dumps({"env": env, "tokens_per_s": results},
                                                     indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
