"""`export --format web`: the static page in headless Debian Chromium (served from a loopback
static file server) prints exactly what `microtransformer generate --temperature 0` prints; its
JavaScript tokenizer gives our ids (checked in node); its ONNX decoding step (KV cache) gives
our logits."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from microtransformer import export_web
from microtransformer.cli import main
from microtransformer.tokenizer import train_tokenizer
from tests.microtransformer.interop_helpers import (
    CORPUS,
    PROMPTS,
    need_node_package,
    train_tiny,
    write_run,
)
from tests.microtransformer.serve.test_playground import chromium_driver

pytestmark = pytest.mark.usefixtures("one_thread")
STATIC = Path(export_web.__file__).parent / "web" / "static"
NEW_TOKENS = 40
WAIT_S = 60


def _need_ort_web() -> None:
    try:
        export_web.find_ort_web()
    except ValueError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small trained runs: byte-level BPE, character level, and byte-level BPE with a context
    of 24 tokens ("slide": 40 new tokens outgrow it, so the window slides)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("web")
    out = {}
    for name, kind, shape in (("bpe", "bpe", {}), ("char", "char", {}),
                              ("slide", "bpe", {"max_seq_len": 24})):
        model, tok = train_tiny(kind=kind, **shape)
        out[name] = write_run(root / name, model, tok)
    return out


@pytest.fixture(scope="module")
def sites(runs: dict[str, Path]) -> dict[str, Path]:
    """Each run exported through the CLI."""
    _need_ort_web()
    sites = {}
    for kind, run in runs.items():
        sites[kind] = run.parent / f"site-{kind}"
        assert main(["export", str(run), "--format", "web", "--out", str(sites[kind])]) == 0
    return sites


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def static_server(sites: dict[str, Path]) -> Iterator[str]:
    """A plain static file server on loopback over the sites' parent folder; its base URL."""
    root = next(iter(sites.values())).parent
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Headless Debian Chromium through its chromedriver, launched as the playground test
    launches it."""
    driver = chromium_driver(tmp_path_factory.mktemp("chromium-web"))
    try:
        yield driver
    finally:
        driver.quit()


def page_generate(browser, url: str, **params: object) -> tuple[str, str, str]:
    """Open the page with URL parameters and autorun; (output text, stats, error) when done."""
    from selenium.webdriver.support.ui import WebDriverWait

    query = urllib.parse.urlencode({**params, "autorun": 1})
    browser.get(f"{url}/index.html?{query}")
    WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(
        lambda d: d.find_element("id", "output").get_attribute("data-done") == "1",
        message="the page did not finish generating")
    return tuple(browser.execute_script(
        f"return document.getElementById('{el}').textContent") for el in
        ("output", "stats", "error"))


def cli_generate(run: Path, prompt: str, capsys: pytest.CaptureFixture) -> str:
    """What `microtransformer generate RUN --temperature 0` prints (without the last newline)."""
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS),
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


# ============================================================================ the browser
@pytest.mark.parametrize("kind", ["bpe", "char", "slide"])
def test_page_greedy_equals_cli_generate(kind: str, runs, sites, static_server, browser,
                                         capsys: pytest.CaptureFixture) -> None:
    url = f"{static_server}/{sites[kind].name}"
    prompts = {"bpe": [*PROMPTS[:4], ""], "char": ["Once upon a time", "The sun", ""],
               "slide": ["Once upon a time", "The bear said"]}[kind]
    for prompt in prompts:
        expected = cli_generate(runs[kind], prompt, capsys)
        text, stats, error = page_generate(browser, url, prompt=prompt,
                                           max_tokens=NEW_TOKENS, temperature=0)
        assert error == ""
        assert text == expected, prompt
        assert "tokens/s" in stats
    logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not logs, logs  # nothing failed to load (no CDN, nothing missing)


def test_page_sampling_is_seeded_and_shareable(sites, static_server, browser) -> None:
    url = f"{static_server}/{sites['bpe'].name}"
    params = {"prompt": "The bear", "max_tokens": 30, "temperature": 1.0, "seed": 7,
              "top_k": 20, "top_p": 0.9}
    first = page_generate(browser, url, **params)
    again = page_generate(browser, url, **params)
    assert first[2] == "" and first[0] == again[0] and first[0].startswith("The bear")
    other = page_generate(browser, url, **{**params, "seed": 8})
    assert other[2] == "" and other[0].startswith("The bear")
    share = browser.find_element("id", "share").get_attribute("href")
    query = urllib.parse.parse_qs(urllib.parse.urlparse(share).query)
    assert query["prompt"] == ["The bear"] and query["seed"] == ["8"]
    assert query["autorun"] == ["1"]
    assert browser.find_element("id", "stats").get_attribute("data-tokens") == "30"
    bad = page_generate(browser, url, prompt="x", top_p=0)
    assert "top-p" in bad[2]


# ============================================================================ without a browser
def test_site_files_and_onnx_logits(runs, sites) -> None:
    ort = pytest.importorskip("onnxruntime")
    from microtransformer.checkpoint import load_run

    site = sites["bpe"]
    for name in ("index.html", "app.js", "tokenizer.js", "tokenizer.json", "model.json",
                 "model.onnx", "ort/ort.wasm.min.mjs", "ort/ort-wasm-simd-threaded.wasm"):
        assert (site / name).is_file(), name
    html = (site / "index.html").read_text() + (site / "app.js").read_text()
    assert "http://" not in html and "https://" not in html  # nothing from a CDN
    info = json.loads((site / "model.json").read_text())
    model, tok, _ = load_run(runs["bpe"], "last", "cpu")
    assert info["max_seq_len"] == model.config.max_seq_len
    assert info["eos_token_id"] == tok.eos_token_id
    assert info["onnxruntime_web"] == export_web.ORT_VERSION
    sess = ort.InferenceSession(str(site / "model.onnx"), providers=["CPUExecutionProvider"])
    cfg = model.config
    torch.manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (1, cfg.max_seq_len))
    past = np.zeros((cfg.num_layers, 2, 1, cfg.num_heads, 0, cfg.embed_dim // cfg.num_heads),
                    dtype=np.float32)  # an empty cache
    worst = 0.0
    # the prompt in one step, then one token per step with the cache, as the page decodes
    for start, end in [(0, 17), *((t, t + 1) for t in range(17, cfg.max_seq_len))]:
        logits, past = sess.run(["logits", "present"],
                                {"input_ids": ids[:, start:end].numpy(), "past": past})
        with torch.no_grad():
            ref = model(ids[:, :end])[:, -1].numpy()  # (1, V)
        assert logits.shape == (1, model.vocab_size) and past.shape[4] == end
        worst = max(worst, float(np.abs(logits - ref).max()))
    assert worst <= 1e-4


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_js_tokenizer_gives_our_ids(kind: str, tmp_path: Path) -> None:
    need_node_package("onnxruntime-web")  # only node itself is needed; same skip message
    tok = train_tokenizer(CORPUS * 10, kind=kind, vocab_size=320 if kind == "bpe" else 64)
    texts = [*PROMPTS, *CORPUS, "", " ", "a  b   c\n\n\n d", "<|pad|><|endoftext|>x<|endoftext",
             "日本語のテキスト、and ümlauts", "tab\there", "x" * 50, "don't 123 4567 it's",
             "\u00a0nbsp\u2003em", "zebra~quartz`", "🎉🎉"]
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = (
        "import { readFileSync } from 'node:fs';"
        f"const {{ Tokenizer }} = await import({json.dumps((STATIC / 'tokenizer.js').as_uri())});"
        "const t = new Tokenizer(JSON.parse(readFileSync(process.argv[1], 'utf8')));"
        "const texts = JSON.parse(readFileSync(process.argv[2], 'utf8'));"
        "console.log(JSON.stringify(texts.map((s) => { const ids = t.encode(s);"
        " return [ids, t.decode(ids)]; })));"
    )
    proc = subprocess.run(["node", "--input-type=module", "-e", script,
                           str(tmp_path / "tokenizer.json"), str(tmp_path / "texts.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for text, (ids, decoded) in zip(texts, json.loads(proc.stdout), strict=True):
        assert ids == tok.encode(text), text
        assert decoded == tok.decode(ids), text


def test_refusals_are_one_line(runs, tmp_path: Path, capsys: pytest.CaptureFixture,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    run = runs["bpe"]
    site = tmp_path / "site"
    site.mkdir()
    (site / "keep.txt").write_text("x")
    monkeypatch.setattr(export_web, "_search_roots", lambda _: [tmp_path])
    monkeypatch.delenv(export_web.ORT_ENV, raising=False)
    assert main(["export", str(run), "--format", "web", "--out", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err
    assert "npm ci" in err and "interop/" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s2").exists()
    monkeypatch.undo()
    _need_ort_web()
    # a folder of other files is never replaced, --force or not (docs/RELIABILITY.md)
    assert main(["export", str(run), "--format", "web", "--out", str(site), "--force"]) == 2
    err = capsys.readouterr().err
    assert "not a web page export" in err and len(err.strip().splitlines()) == 1
    assert (site / "keep.txt").read_text() == "x"
    page = tmp_path / "page"
    assert main(["export", str(run), "--format", "web", "--out", str(page)]) == 0
    (page / "extra.txt").write_text("old")
    assert main(["export", str(run), "--format", "web", "--out", str(page)]) == 2
    err = capsys.readouterr().err
    assert "already holds a web page export" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(run), "--format", "web", "--out", str(page), "--force"]) == 0
    assert (page / "index.html").is_file() and not (page / "extra.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_node_skip_reason_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(pytest.skip.Exception, match="node is not installed"):
        need_node_package("node-llama-cpp")


def test_the_pages_decoding_step_holds_the_architecture_variants(tmp_path: Path) -> None:
    """Rotary positions, squared ReLU and QK-norm in the page's ONNX step: the prompt in one
    step, then one token per step with the cache (positions continue from the past's
    length), each giving the model's logits."""
    ort = pytest.importorskip("onnxruntime")
    from model import MicroTransformer

    torch.manual_seed(4)
    model = MicroTransformer(vocab_size=70, max_seq_len=24, embed_dim=32, num_heads=4,
                             num_layers=2, ff_dim=48, dropout=0.0, position="rotary",
                             activation="relu2", qk_norm=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = export_web.export_decode_step(model, tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 70, (1, 24), generator=torch.Generator().manual_seed(1))
    past = np.zeros((2, 2, 1, 4, 0, 8), dtype=np.float32)
    for start, end in [(0, 9), *((t, t + 1) for t in range(9, 24))]:
        logits, past = sess.run(["logits", "present"],
                                {"input_ids": ids[:, start:end].numpy(), "past": past})
        with torch.no_grad():
            ref = model(ids[:, :end])[:, -1].numpy()
        assert float(np.abs(logits - ref).max()) <= 1e-4, end
