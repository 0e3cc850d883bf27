"""The browser playground (`GET /`) in a real browser: headless Chromium driven by Selenium
against a live `microtransformer serve` on loopback with two tiny trained models.

It types a prompt, clicks Generate and sees streamed tokens appear, coloured by probability, with
their alternatives in a tooltip on hover and on keyboard focus; checks time to first token and
tokens/s are shown, that the page shows exactly the text the API returns for the same seed, that
API errors are shown, and runs two models side by side. Skips (saying why) without Debian's
chromium + chromedriver or the selenium package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.microtransformer.serve.conftest import write_run

REPO_ROOT = Path(__file__).resolve().parents[3]
API_KEY = "playground-test-key"
WAIT_S = 20  # bound on every wait in the browser
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1400,900"]


def _browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver) or skip, naming what is missing and how to install it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no chromium/chromedriver on PATH; on Debian: "
                    "apt-get install -y chromium chromium-driver")
    return browser, driver


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two tiny random char-level runs: "tiny-a" (context 64) and "tiny-b" (other weights,
    context 1024, long enough to stop a generation halfway)."""
    root = tmp_path_factory.mktemp("playground")
    return [write_run(root / "tiny-a", seed=0),
            write_run(root / "tiny-b", seed=1, max_seq_len=1024)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_server(runs) -> Iterator[str]:
    """`microtransformer serve` on both runs (API key on) in a subprocess; yields its base URL."""
    _browser_paths()  # no server start when the browser test will skip anyway
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MICROTRANSFORMER_API_KEY", None)
    log = runs[0].parent / "server.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "microtransformer", "serve", *map(str, runs), "--host",
             "127.0.0.1", "--port", str(port), "--api-key", API_KEY],
            env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url + "health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy within 60 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chromium_driver(profile: Path):
    """Headless Debian Chromium through its chromedriver (Selenium Manager never runs), with
    its profile in `profile`; skips where chromium, chromedriver or selenium is missing."""
    chromium, chromedriver = _browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(chromedriver), options=options)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """The playground's browser: `chromium_driver` with a fixed window size."""
    driver = chromium_driver(tmp_path_factory.mktemp("chromium-profile"))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1400, "height": 900, "deviceScaleFactor": 1,
                            "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
        lambda d: condition(d), message=f"waited {WAIT_S} s for {what}")


def _css(root, selector: str):
    from selenium.webdriver.common.by import By

    return root.find_elements(By.CSS_SELECTOR, selector)


def _set_slider(driver, slider_id: str, value: float) -> None:
    driver.execute_script(
        "const s = document.getElementById(arguments[0]); s.value = arguments[1];"
        "s.dispatchEvent(new Event('input', {bubbles: true}));"
        "s.dispatchEvent(new Event('change', {bubbles: true}));", slider_id, str(value))


def _column_done(driver, col: str) -> bool:
    finish = _css(driver, f"#col-{col} .stat-finish")[0].text
    return finish in ("length", "stop", "cancelled") or bool(
        _css(driver, f"#col-{col} .error:not([hidden])"))


def _generated(driver, col: str) -> str:
    """The column's generated text: the token spans after the echoed prompt, joined."""
    return driver.execute_script(
        "const sel = `#col-${arguments[0]} .text .tok:not(.special)`;"
        "return Array.from(document.querySelectorAll(sel)).map((s) => s.textContent).join('');",
        col)


def _check_token_count(driver, col: str, max_tokens: int) -> None:
    """One token span per generated token (the usage count); `max_tokens` of them unless the
    model ended the text, shown as a last special-token marker."""
    spans = _css(driver, f"#col-{col} .text .tok")
    n_tokens = int(_css(driver, f"#col-{col} .stat-tokens")[0].text)
    finish = _css(driver, f"#col-{col} .stat-finish")[0].text
    assert len(spans) == n_tokens > 0
    if finish == "length":
        assert n_tokens == max_tokens
    else:
        assert finish == "stop"
        assert n_tokens <= max_tokens
        assert "special" in spans[-1].get_attribute("class").split()


def _metric(base: str, name: str, model: str) -> float:
    with urllib.request.urlopen(base + "metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', text, re.MULTILINE)
    assert found, f"{name} for {model} not in /metrics"
    return float(found.group(1))


def _generated_by_server(base: str, model: str) -> float:
    return _metric(base, "microtransformer_generation_tokens_total", model)


def _server_idle(base: str, model: str) -> bool:
    return (_metric(base, "microtransformer_running_sequences", model) == 0
            and _metric(base, "microtransformer_queue_depth", model) == 0)


def _api_completion(base: str, body: dict) -> dict:
    req = urllib.request.Request(
        base + "v1/completions", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_playground_streams_colours_and_compares(page_server, browser, tmp_path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    d = browser
    server = page_server
    d.get(server)
    assert "playground" in d.title

    # API key on and none typed: the 401's message is shown; typing the key loads the models.
    status = _css(d, "#status")[0]
    _wait(d, lambda _: status.get_attribute("data-kind") == "error", "the 401 to be shown")
    assert "API key" in status.text
    key = _css(d, "#api-key")[0]
    assert key.is_displayed()  # the auth panel opened itself
    key.send_keys(API_KEY, Keys.TAB)
    _wait(d, lambda _: len(_css(d, "#model-a option")) == 2, "the model list")
    assert status.get_attribute("data-kind") == "ok"
    assert "2 models" in status.text
    assert "context 64" in _css(d, "#info-a")[0].text
    assert _css(d, "#max_tokens")[0].get_attribute("max") == "64"  # follows the model

    # Sliders show their values live.
    _set_slider(d, "temperature", 0.9)
    _set_slider(d, "max_tokens", 24)
    _set_slider(d, "top_k", 0)
    assert _css(d, "#temperature-out")[0].text == "0.90"
    assert _css(d, "#max_tokens-out")[0].text == "24"
    assert _css(d, "#top_k-out")[0].text == "off"
    prompt = _css(d, "#prompt")[0]
    prompt.clear()
    prompt.send_keys("To be")
    seed = _css(d, "#seed")[0]
    # The models are random, so a seed can end the text (<|endoftext|>) early: take the
    # first seed that gives the few tokens the hover and keyboard checks below step through.
    for seed_value in range(1234, 1244):
        seed.clear()
        seed.send_keys(str(seed_value))
        _css(d, "#generate")[0].click()
        _wait(d, lambda _: _column_done(d, "a"), "generation in column A to finish")
        assert not _css(d, "#col-a .error:not([hidden])"), _css(d, "#col-a .error")[0].text
        if len(_css(d, "#col-a .text .tok")) >= 4:
            break

    # Streamed token by token: one coloured span per token (a char model holds no text back;
    # special tokens an untrained model may pick, such as <|endoftext|>, are marker spans).
    toks = _css(d, "#col-a .text .tok")
    _check_token_count(d, "a", 24)
    bins = {"p0", "p1", "p2", "p3", "p4"}  # the legend's probability bins
    assert all(len(bins & set(t.get_attribute("class").split())) == 1 for t in toks)
    background = toks[0].value_of_css_property("background-color")
    assert background not in ("rgba(0, 0, 0, 0)", "transparent")
    assert _css(d, "#col-a .prompt-echo")[0].text == "To be"

    # The page shows exactly what the API answers for the same request and seed.
    text = _generated(d, "a")
    expected = _api_completion(server, {"model": "tiny-a", "prompt": "To be", "max_tokens": 24,
                                        "temperature": 0.9, "top_p": 0.95,
                                        "seed": seed_value})
    assert text == expected["choices"][0]["text"]

    # Time to first token and tokens/s are shown.
    assert re.fullmatch(r"\d+ ms", _css(d, "#col-a .stat-ttft")[0].text)
    assert float(_css(d, "#col-a .stat-tps")[0].text) > 0

    # Hover: the tooltip lists the alternatives with their probabilities.
    hovered = next(t for t in toks[1:] if t.text.strip())  # a visible token to point at
    ActionChains(d).move_to_element(hovered).perform()
    tip = _css(d, "#tooltip")[0]
    _wait(d, lambda _: tip.is_displayed(), "the tooltip on hover")
    # The token's colour is the legend's bin of the probability the tooltip states (to the
    # shown precision: a value printed as 20.0% may lie just under the 20% edge).
    shown = _css(tip, ".tip-prob")[0].text
    p = 0.0005 if shown == "<0.1%" else float(shown.rstrip("%")) / 100
    bins_near = {"p" + str(sum(q >= edge for edge in (0.05, 0.2, 0.5, 0.8)))
                 for q in (p - 0.0005, p + 0.0005)}
    assert bins_near & set(hovered.get_attribute("class").split())
    rows = _css(tip, ".alts li")
    assert 2 <= len(rows) <= 6
    assert all(re.search(r"\d%$|<0\.1%$", r.text) for r in rows)
    assert _css(tip, "code")[0].text  # the token itself, whitespace made visible
    # Keyboard: focus a token and step with the arrow key; the tooltip follows the focus.
    d.execute_script("arguments[0].focus();", toks[0])
    ActionChains(d).send_keys(Keys.ARROW_RIGHT).perform()
    assert d.switch_to.active_element == toks[1]
    assert tip.is_displayed()
    assert toks[1].get_attribute("aria-describedby") == "tooltip"
    ActionChains(d).send_keys(Keys.ESCAPE).perform()
    assert not tip.is_displayed()

    # An API error is shown in the page with the message from its body: a prompt longer than
    # the 64-token context.
    prompt.clear()
    prompt.send_keys("t" * 80)
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)
    _wait(d, lambda _: _column_done(d, "a"), "the error in column A")
    error = _css(d, "#col-a .error")[0]
    assert error.is_displayed()
    assert "context" in error.text

    # Side by side: both models on the same prompt and settings, streamed into two columns.
    _css(d, "#compare")[0].click()
    assert _css(d, "#col-b")[0].is_displayed()
    Select(_css(d, "#model-b")[0]).select_by_value("tiny-b")
    prompt.clear()
    prompt.send_keys("Whether")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # keyboard shortcut
    _wait(d, lambda _: _column_done(d, "a") and _column_done(d, "b"), "both columns to finish")
    for col, model in (("a", "tiny-a"), ("b", "tiny-b")):
        assert _css(d, f"#col-{col} .col-model")[0].text == model
        assert not _css(d, f"#col-{col} .error:not([hidden])")
        _check_token_count(d, col, 24)
        assert re.fullmatch(r"\d+ ms", _css(d, f"#col-{col} .stat-ttft")[0].text)
        body = {"model": model, "prompt": "Whether", "max_tokens": 24, "temperature": 0.9,
                "top_p": 0.95, "seed": seed_value}
        assert _generated(d, col) == _api_completion(server, body)["choices"][0]["text"]

    # No model output was ever parsed as HTML: every token span holds text only.
    assert not _css(d, ".text .tok *")
    assert not d.execute_script(
        "return window.performance.getEntriesByType('resource')"
        ".some((e) => !e.name.startsWith(location.origin));")
    d.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000

    # Stop aborts the fetch and the server cancels the request at once: a 1000-token request
    # on tiny-b, stopped as soon as its first token is on the page, ends with far fewer
    # tokens generated, in the page and by the server. Greedy, and on a prompt whose greedy
    # continuation runs the full length (checked through the API), so that only Stop can
    # end it early.
    long_prompt = next((p for p in ("To be", "Whether", "the", "o", "a", "T")
                        if _api_completion(server, {"model": "tiny-b", "prompt": p,
                                                    "max_tokens": 1000, "temperature": 0}
                                           )["choices"][0]["finish_reason"] == "length"), None)
    assert long_prompt, "every candidate prompt's greedy continuation ends early on tiny-b"
    _css(d, "#compare")[0].click()
    Select(_css(d, "#model-a")[0]).select_by_value("tiny-b")
    _set_slider(d, "max_tokens", 1000)
    _set_slider(d, "temperature", 0)
    assert _css(d, "#max_tokens-out")[0].text == "1000"
    assert _css(d, "#temperature-out")[0].text == "0 · greedy"
    prompt.clear()
    prompt.send_keys(long_prompt)
    before = _generated_by_server(server, "tiny-b")
    d.set_script_timeout(WAIT_S)
    d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "document.getElementById('generate').click();"
        "const t = setInterval(() => {"
        "  if (!document.querySelector('#col-a .text .tok')) return;"
        "  clearInterval(t); document.getElementById('stop').click(); done(); }, 2);")
    _wait(d, lambda _: _column_done(d, "a"), "the stopped generation to end")
    assert _css(d, "#col-a .stat-finish")[0].text == "cancelled"
    assert _css(d, "#generate")[0].is_enabled() and not _css(d, "#stop")[0].is_enabled()
    shown = len(_css(d, "#col-a .text .tok"))
    assert 1 <= shown < 1000
    _wait(d, lambda _: _server_idle(server, "tiny-b"), "the server to free the slot")
    assert _generated_by_server(server, "tiny-b") - before < 1000

    # No script error all along (network errors for the expected 401 and 400 are not these).
    script_errors = [e for e in d.get_log("browser") if e.get("source") == "javascript"]
    assert not script_errors, script_errors
