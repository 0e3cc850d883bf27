"""Greedy decoding speed of one model in several runtimes, on this machine, at batch 1 and 8:

- ours: `AutoPathGenerator` as `microtransformer generate` runs it without flags (the
  ahead-of-time compiled step, `decoding.aot`; its one-off compile is done in the untimed
  warm-up and reported, cold and loaded from disk), `ours_bf16` and `ours_int8wo` the same
  with `precision="bf16"` / `"int8wo"` (int8 weight-only linears), `ours_eager` the eager
  cached decode (`compile=False`, the default before the compiled step),
- Hugging Face GPT-2: the `export --format hf` directory, `model.generate(do_sample=False)`,
- llama.cpp: the `export --format gguf` files (f32 and q8_0) through node-llama-cpp
  (interop/llama.mjs) with its best settings for this size: flash attention off, f32 KV cache,
  `--threads` threads; at batch B, B sequences of one context decoded in parallel. Two
  figures: tokens / wall time of a generation as a Node user sees it (prompt + decoding), and
  llama.cpp's own timer for its one-token decode calls (`*_own`, batch 1 only),
- the web page: `export --format web` in headless Chromium from a loopback static server
  (ONNX Runtime Web, WebAssembly, one thread, a KV cache; the rate the page itself shows;
  batch 1 only).

All get the same weights, the same prompt (repeated over the batch) and the same number of
new tokens; rounds are interleaved (each round times every runtime once, the order reversed
every other round) so background load hits them alike. Reported per batch: median and
min-max tokens/s per runtime and the median (min-max) of the per-round ratios ours / it.
The model is a trained run (`--run`) or, by default, a random-initialised preset shape with a
byte-level BPE tokenizer of `--vocab` tokens trained on Python's standard library sources
(speed does not depend on training).

    flock /tmp/mt-heavy.lock python benchmarks/interop.py --rounds 5
    python benchmarks/interop.py --vocab 2000 --batches 1,8 --new-tokens 256 \
        --runtimes ours,ours_bf16,ours_eager,llama_cpp,llama_cpp_q8_0 --cold-compile

A measurement script, not a test: it asserts nothing about speed. Needs node + `npm ci` in
interop/ (llama.cpp, ONNX Runtime Web), Debian's chromium + chromedriver (web page only),
transformers (HF only), gguf.
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
from microtransformer.device import intra_op_threads  # noqa: E402
from microtransformer.export import export_hf  # noqa: E402
from microtransformer.export_gguf import export_gguf  # noqa: E402
from microtransformer.export_web import export_web  # noqa: E402
from microtransformer.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from model import MicroTransformer  # noqa: E402

RUNTIMES = ("ours", "ours_bf16", "ours_int8wo", "ours_eager", "hf_gpt2", "llama_cpp",
            "llama_cpp_q8_0", "web_chromium")
# what each runtime reports: its wall-clock rate, and llama.cpp's own timer as well
SERIES = {"llama_cpp": ("llama_cpp", "llama_cpp_own"),
          "llama_cpp_q8_0": ("llama_cpp_q8_0", "llama_cpp_q8_0_own")}
BATCH1_ONLY = ("web_chromium",)
LABELS = {"ours": "ours, default path (AutoPathGenerator, fp32, compiled step)",
          "ours_bf16": "ours, bf16 (AutoPathGenerator precision=bf16)",
          "ours_int8wo": "ours, int8 weight-only (AutoPathGenerator precision=int8wo)",
          "ours_eager": "ours, eager decode (compile=False)",
          "hf_gpt2": "HF GPT-2 (transformers)",
          "llama_cpp": "llama.cpp f32 (node-llama-cpp, wall)",
          "llama_cpp_own": "llama.cpp f32 (its own eval timer)",
          "llama_cpp_q8_0": "llama.cpp q8_0 (node-llama-cpp, wall)",
          "llama_cpp_q8_0_own": "llama.cpp q8_0 (its own eval timer)",
          "web_chromium": "web page (Chromium, ORT Web wasm)"}


# ---------------------------------------------------------------------------- the model
def build_model(args: argparse.Namespace) -> tuple[MicroTransformer, Tokenizer, str]:
    """(model, tokenizer, description) from --run or a random-initialised preset."""
    if args.run:
        model, tok, _ = load_run(args.run, "last", "cpu")
        return model.eval(), tok, f"run {Path(args.run).name}"
    sources = sorted(Path(os.__file__).parent.glob("*.py"))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sources]
    tok = train_tokenizer(texts, kind="bpe", vocab_size=args.vocab)
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=tok.vocab_size, max_seq_len=512, dropout=0.0,
                             **PRESETS[args.preset])
    return model.eval(), tok, f"{args.preset} preset, random init"


# ---------------------------------------------------------------------------- runtimes
class Runtimes:
    """Each runtime prepared once; `measure(name, batch)` times one greedy generation and
    returns {series: tokens/s}."""

    def __init__(self, model: MicroTransformer, tok: Tokenizer, args: argparse.Namespace,
                 work: Path) -> None:
        self.args, self.work = args, work
        self.prompt_ids = tok.encode(args.prompt)
        torch.set_num_threads(args.threads)
        self.model = model
        self.compile_notes: list[str] = []
        wanted = set(args.runtimes)
        self.ours: dict[str, AutoPathGenerator] = {
            "ours": AutoPathGenerator(model, threads=args.threads),
            "ours_bf16": AutoPathGenerator(model, precision="bf16", threads=args.threads),
            "ours_int8wo": AutoPathGenerator(model, precision="int8wo", threads=args.threads),
            "ours_eager": AutoPathGenerator(model, compile=False, threads=args.threads)}
        if "hf_gpt2" in wanted:
            from transformers import AutoModelForCausalLM

            export_hf(model, work / "hf", tok)
            self.hf = AutoModelForCausalLM.from_pretrained(work / "hf").eval()
        if wanted & {"llama_cpp", "llama_cpp_q8_0"}:
            export_gguf(model, work / "model-f32.gguf", tok, quant="f32")
            export_gguf(model, work / "model-q8_0.gguf", tok, quant="q8_0")
        self._server = self._browser = None
        if "web_chromium" in wanted:
            export_web(model, work / "site", tok)
            self._server = self._start_server(work)
            self._browser = self._start_browser(work)

    def input_ids(self, batch: int) -> torch.Tensor:
        return torch.tensor([self.prompt_ids] * batch)  # (B, T0)

    def measure(self, name: str, batch: int) -> dict[str, float]:
        if name.startswith("ours"):
            return {name: self.ours_rate(name, batch)}
        if name.startswith("llama_cpp"):
            return self.llama_cpp(batch, "q8_0" if name.endswith("q8_0") else "f32")
        return {name: getattr(self, name)(batch)}

    def warm_up(self, name: str, batch: int) -> None:
        """First call: loads, JIT, and for ours the package (compiled cold or loaded)."""
        if name.startswith("ours") and name != "ours_eager":
            gen = self.ours[name]
            before = gen.compile_seconds
            self.measure(name, batch)
            self.compile_notes.append(
                f"{name} batch {batch}: path {gen.last_path}, package compiled or loaded in "
                f"{gen.compile_seconds - before:.2f} s (untimed warm-up)")
            if gen.last_path == "compiled":  # a fresh generator loads it from disk
                fresh = AutoPathGenerator(self.model, precision=gen.precision, quiet=True)
                start = time.perf_counter()
                fresh.decoder(batch)
                self.compile_notes.append(f"{name} batch {batch}: loaded from disk in "
                                          f"{time.perf_counter() - start:.3f} s")
        else:
            self.measure(name, batch)

    # ours and HF: wall time of one generate call -------------------------------------
    def _time(self, fn: Any, batch: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        return batch * (out.shape[1] - len(self.prompt_ids)) / (time.perf_counter() - start)

    def ours_rate(self, name: str, batch: int) -> float:
        return self._time(lambda: self.ours[name].generate(
            self.input_ids(batch), max_new_tokens=self.args.new_tokens, do_sample=False), batch)

    def hf_gpt2(self, batch: int) -> float:
        n, ids = self.args.new_tokens, self.input_ids(batch)
        with intra_op_threads(self.args.threads):
            return self._time(lambda: self.hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=n, min_new_tokens=n, pad_token_id=0), batch)

    # llama.cpp: node-llama-cpp, wall clock and its own timer ----------------------------
    def llama_cpp(self, batch: int, quant: str = "f32") -> dict[str, float]:
        req = self.work / "llama.json"
        req.write_text(json.dumps({
            "model": str(self.work / f"model-{quant}.gguf"), "threads": self.args.threads,
            "bench": {"prompt": self.prompt_ids, "tokens": self.args.new_tokens, "repeats": 1,
                      "batch": batch}}))
        proc = subprocess.run(["node", str(ROOT / "interop" / "llama.mjs"), str(req)],
                              capture_output=True, text=True, check=True, cwd=ROOT / "interop")
        bench = json.loads(proc.stdout.strip().splitlines()[-1])["bench"]
        name = "llama_cpp" if quant == "f32" else f"llama_cpp_{quant}"
        out = {name: float(bench["tokens_per_s"][0])}
        if bench.get("eval_tokens_per_s"):
            out[f"{name}_own"] = float(bench["eval_tokens_per_s"][0])
        return out

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

    def web_chromium(self, batch: int = 1) -> float:
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
        if self._browser is None:
            return "-"
        return str(self._browser.capabilities.get("browserVersion", "?"))

    def close(self) -> None:
        if self._browser is not None:
            self._browser.quit()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# ---------------------------------------------------------------------------- report
def node_package_version(name: str) -> str:
    pkg = ROOT / "interop" / "node_modules" / name / "package.json"
    return json.loads(pkg.read_text())["version"] if pkg.is_file() else "?"


def report(results: dict[int, dict[str, list[float]]], env: dict[str, Any]) -> str:
    """Markdown: per batch, median (min-max) tokens/s per series and the median (min-max)
    of the per-round ratios ours (default path) / that series."""
    lines = [
        f"Model: {env['model']} ({env['parameters']:,} parameters, vocab {env['vocab']}); "
        f"prompt {env['prompt_tokens']} tokens, {env['new_tokens']} new tokens, greedy, "
        f"{env['threads']} thread(s) everywhere; rounds {env['rounds']} (interleaved).",
        f"CPU: {env['cpu']} ({env['cpus']} CPUs, flags {', '.join(env['cpu_flags'])}); torch "
        f"{env['torch']}, transformers {env['transformers']}, node-llama-cpp "
        f"{env['node_llama_cpp']}, onnxruntime-web {env['onnxruntime_web']}, Chromium "
        f"{env['chromium']}, node {env['node']}.",
        f"Command: `{env['command']}`",
        "",
    ]
    for batch, res in results.items():
        lines += [f"Batch {batch}:", "",
                  "| runtime | tokens/s (median, min-max) | ours / it (median, min-max) |",
                  "| --- | --- | --- |"]
        ours = res.get("ours")
        for name, vals in res.items():
            if not vals:
                continue
            cell = "-"
            if ours and len(ours) == len(vals):
                ratios = [o / v for o, v in zip(ours, vals, strict=True)]
                cell = (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-"
                        f"{max(ratios):.2f})")
            lines.append(f"| {LABELS[name]} | {statistics.median(vals):,.0f} "
                         f"({min(vals):,.0f}-{max(vals):,.0f}) | {cell} |")
        lines.append("")
    lines += [f"- {note}" for note in env["compile_notes"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="a run directory (default: a preset, random)")
    p.add_argument("--preset", default="balanced", choices=sorted(PRESETS))
    p.add_argument("--vocab", type=int, default=5000, help="tokenizer size (preset model)")
    p.add_argument("--prompt", default="def main():\n    ")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", default="1", help="comma-separated batch sizes")
    p.add_argument("--runtimes", default=",".join(RUNTIMES),
                   help=f"comma-separated subset of {', '.join(RUNTIMES)}")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for every runtime (1 is best on a shared 2-core machine)")
    p.add_argument("--cold-compile", action="store_true",
                   help="compile our packages into an empty temporary folder (measures the "
                        "cold compile) instead of using the on-disk cache")
    p.add_argument("--tag", default="interop_cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = sorted(set(args.runtimes) - set(RUNTIMES))
    if unknown:
        p.error(f"unknown runtime(s) {unknown}; choose from {', '.join(RUNTIMES)}")
    batches = [int(b) for b in args.batches.split(",") if b]

    model, tok, desc = build_model(args)
    results: dict[int, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mt-interop-") as tmp:
        if args.cold_compile:
            os.environ["MICROTRANSFORMER_CACHE_DIR"] = str(Path(tmp) / "cache")
        rt = Runtimes(model, tok, args, Path(tmp))
        try:
            for batch in batches:
                names = [n for n in args.runtimes if batch == 1 or n not in BATCH1_ONLY]
                res = results[batch] = {s: [] for n in names for s in SERIES.get(n, (n,))}
                for name in names:  # warm-up: loading, JIT, compiling (untimed)
                    rt.warm_up(name, batch)
                for r in range(args.rounds):
                    for name in (names if r % 2 == 0 else names[::-1]):
                        for series, value in rt.measure(name, batch).items():
                            res[series].append(value)
                    print(f"batch {batch} round {r + 1}: " + ", ".join(
                        f"{n} {v[-1]:.0f}" for n, v in res.items() if v), flush=True)
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
        "python": platform.python_version(), "compile_notes": rt.compile_notes,
        "command": " ".join(["benchmarks/interop.py", *sys.argv[1:]]),
        **cpu_description(),
    }
    text = report(results, env)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.md").write_text(text)
    (out / f"{args.tag}.json").write_text(json.dumps(
        {"env": env, "tokens_per_s": {str(b): r for b, r in results.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
