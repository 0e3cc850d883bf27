"""The engine's compiled bucket steps: the background compile queue (`serve/compiler.py`), the
swap from the eager to the fast step mid-generation (a fake, cheap build: no timing), the
packaged steps against `model.generate` and their fallback, the torch.compile step against it
(slow), precision and the options."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from microtransformer.checkpoint import load_run
from microtransformer.cli import main
from microtransformer.decoding import aot
from microtransformer.decoding.step import DecodeStep
from microtransformer.device import cpu_has_native_bf16
from microtransformer.serve.choice import Choice, Event, SamplingParams
from microtransformer.serve.compiler import BucketCompiler
from microtransformer.serve.engine import Engine
from microtransformer.serve.runner import ModelRunner, PackagedStep
from tests.microtransformer.serve.conftest import write_run
from tests.microtransformer.serve.test_engine import Collector


@pytest.fixture(scope="module")
def loaded(tiny_run):
    model, tok, _ = load_run(tiny_run)
    return model, tok


# ------------------------------------------------------------------ the compile queue
def test_bucket_is_built_once_after_its_steps_and_published():
    built, published, lines = [], {}, []
    compiler = BucketCompiler(lambda b: built.append(b) or f"fast{b}",
                              published.__setitem__, log=lines.append, after=3)
    for _ in range(2):
        compiler.count((1, 64))
    assert compiler.pending == 0 and not built  # 2 of 3 steps: not queued yet
    for _ in range(5):
        compiler.count((1, 64))
    compiler.count((2, 64))
    compiler.request((4, 64))
    assert compiler.wait_idle(30)
    assert built == [(1, 64), (4, 64)]  # (2, 64) served one step only
    assert published == {(1, 64): "fast(1, 64)", (4, 64): "fast(4, 64)"}
    assert set(compiler.seconds) == {(1, 64), (4, 64)}
    assert any("compiled bucket (1, 64) in" in line for line in lines), lines
    compiler.close()


def test_failed_build_is_logged_and_not_published():
    published, lines = {}, []

    def build(bucket):
        raise RuntimeError("no C++ compiler")

    compiler = BucketCompiler(build, published.__setitem__, log=lines.append)
    compiler.count((1, 64))
    assert compiler.wait_idle(30)
    assert published == {} and "no C++ compiler" in compiler.failed[(1, 64)]
    assert "stays eager" in lines[0]
    compiler.close()


def test_close_drops_queued_buckets_and_waits_for_the_running_one():
    started, release, built = threading.Event(), threading.Event(), []

    def build(bucket):
        started.set()
        release.wait(30)
        built.append(bucket)
        return bucket

    compiler = BucketCompiler(build, lambda b, s: None)
    for bucket in ((1, 64), (2, 64), (4, 64)):
        compiler.request(bucket)
    assert started.wait(30)
    closer = threading.Thread(target=compiler.close)
    closer.start()
    release.set()
    closer.join(30)
    assert not closer.is_alive() and built == [(1, 64)] and compiler.pending == 0
    compiler.request((8, 64))  # after close: ignored
    assert compiler.pending == 0


# ------------------------------------------------------------------ the swap
class GatedFastStep:
    """A stand-in for a compiled step: the eager step over the runner's real cache view,
    counting its calls; its build waits until the test opens the gate."""

    def __init__(self, engine: Engine, gate: threading.Event) -> None:
        self.engine, self.gate, self.calls = engine, gate, 0
        self.inner: DecodeStep | None = None

    def build(self, bucket: tuple[int, int]) -> GatedFastStep:
        assert self.gate.wait(60)
        rows, cols = bucket
        runner = self.engine.runner
        self.inner = DecodeStep(runner.model, rows, cols,
                                cache=runner.decoder.cache.view(rows, cols))
        return self

    def step(self, tokens, positions, cols):
        self.calls += 1
        return self.inner.step(tokens, positions, cols)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_swap_mid_generation_keeps_the_tokens(loaded, temperature):
    """The bucket's fast step is swapped in while a request is generating (the build is
    released from the sink once 5 tokens came out, and the engine waits for the swap at the
    next step): the request's tokens are still exactly generate's (greedy, and seeded top-k)."""
    model, tok = loaded
    gate = threading.Event()
    holder: dict[str, GatedFastStep] = {}
    engine = Engine(model, tok, max_batch=1, compile=True, compile_after=1,
                    build_step=lambda b: holder["fast"].build(b))
    holder["fast"] = fast = GatedFastStep(engine, gate)
    engine.runner.precision = None  # no package: the bucket is queued by its step count
    engine.start()
    ids = tok.encode("the dog ran")
    sink = Collector()

    def chain(event: Event) -> None:  # in the engine thread, between two steps
        sink(event)
        if event.completion_tokens == 5:
            gate.set()
            assert engine.runner.compiler.wait_idle(60)  # swapped before the next step

    params = SamplingParams(max_tokens=20, temperature=temperature, top_k=8, ignore_eos=True)
    try:
        engine.submit([Choice(0, ids, params, chain, seed=11)])
        events = sink.wait(1)[0]
    finally:
        engine.shutdown()
    assert fast.calls == 15  # tokens 6..20 came from the fast step, tokens 2..5 eagerly
    assert engine.runner.compiler.uses[(1, 64)] == 4
    ref = model.generate(torch.tensor([ids]), max_new_tokens=20, temperature=temperature,
                         top_k=8, do_sample=temperature > 0,
                         generator=torch.Generator().manual_seed(11))
    assert "".join(e.text for e in events) == tok.decode(ref[0, len(ids):].tolist())


def test_packaged_steps_serve_generates_tokens(tmp_path):
    """On the CPU in fp32 a bucket's fast step is the ahead-of-time package of its row count
    (two packages here, about 10 s each): both column buckets of a row count share it, and two
    greedy requests of different lengths, each crossing from the 64- to the 128-column
    bucket, get model.generate's tokens with every step after the swap on the packages."""
    model, tok, _ = load_run(write_run(tmp_path / "run", max_seq_len=128))
    engine = Engine(model, tok, max_batch=2, compile=True, compile_after=1).start()
    runner = engine.runner
    prompts = [tok.encode("the cat sat on"), tok.encode("the dog ran to the hill, and the")]
    params = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)
    try:
        for bucket in runner.steps:
            runner.compiler.request(bucket)
        assert runner.compiler.wait_idle(600)
        assert set(runner.fast) == {(1, 64), (1, 128), (2, 64), (2, 128)}, runner.compiler.failed
        assert all(isinstance(step, PackagedStep) for step in runner.fast.values())
        assert runner.fast[1, 64] is runner.fast[1, 128]
        assert runner.fast[2, 64] is runner.fast[2, 128]
        assert runner.fast[1, 64] is not runner.fast[2, 64]
        eager_steps = dict(runner.compiler.uses)
        sink = Collector()
        engine.submit([Choice(i, ids, params, sink) for i, ids in enumerate(prompts)])
        events = sink.wait(2)
    finally:
        engine.shutdown()
    assert runner.compiler.uses == eager_steps  # no step ran eagerly
    for i, ids in enumerate(prompts):
        ref = model.generate(torch.tensor([ids]), max_new_tokens=70, do_sample=False)
        assert "".join(e.text for e in events[i]) == tok.decode(ref[0, len(ids):].tolist())
    # on the cache the requests filled: rows at different columns, the packaged step's logits
    # are the eager bucket step's (each writes the same keys and values at those columns)
    tokens, cols = torch.tensor([5, 9]), torch.tensor([80, 47])
    for rows, width in ((2, 128), (2, 64)):  # (the second: columns 16 and 47)
        at = cols % width  # (rows,) inside the bucket
        with torch.no_grad():
            eager = runner.steps[rows, width].step(tokens, at, at)
            packaged = runner.fast[rows, width].step(tokens, at, at)
        torch.testing.assert_close(packaged, eager, rtol=1e-4, atol=1e-5)


def test_requests_served_while_a_package_compiles_keep_their_tokens(tmp_path):
    """The package is exported and compiled in the compiler thread while the engine thread
    decodes eagerly with the same model (export swaps the traced module's parameters for fake
    tensors: it traces a copy). Greedy requests served during the compile, and after it, get
    model.generate's tokens."""
    model, tok, _ = load_run(write_run(tmp_path / "run", max_seq_len=96))  # a shape of its own
    engine = Engine(model, tok, max_batch=1, compile=True, compile_after=1).start()
    ids = tok.encode("the owl flew")
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    want = tok.decode(ref[0, len(ids):].tolist())
    texts, during = [], 0
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            compiling = engine.runner.compiler.pending > 0
            sink = Collector()
            engine.submit([Choice(0, ids, params, sink)])
            texts.append("".join(e.text for e in sink.wait(1)[0]))
            during += compiling
            if not compiling and (engine.runner.fast or engine.runner.compiler.failed):
                break  # built (or failed: reported below), and a request served after it
    finally:
        engine.shutdown()
    assert during >= 1 and (1, 64) in engine.runner.fast, engine.runner.compiler.failed
    assert texts == [want] * len(texts)


def test_failed_packaging_falls_back_to_torch_compile(loaded, monkeypatch):
    """A package that cannot be built (no C++ compiler, an export error) leaves the buckets to
    torch.compile's step, with one log line saying why."""
    model, _ = loaded

    def broken(*args, **kwargs):
        raise aot.AOTCompileError("no C++ compiler")

    monkeypatch.setattr(aot, "AOTDecodeStep", broken)
    lines: list[str] = []
    runner = ModelRunner(model, 2, [1, 2], [64], compile=True, log=lines.append)
    assert runner.precision == "fp32"
    monkeypatch.setattr(runner, "_torch_compiled_step", lambda bucket: f"torch{bucket}")
    assert runner.compiled_step((2, 64)) == "torch(2, 64)"
    assert runner.compiled_step((1, 64)) == "torch(1, 64)"  # not retried
    assert runner.precision is None and len(lines) == 1
    assert "no C++ compiler" in lines[0] and "torch.compile" in lines[0]
    runner.close()


@pytest.mark.parametrize("on_disk", [True, False])
def test_a_package_on_disk_is_loaded_at_first_use(loaded, monkeypatch, on_disk):
    """A bucket whose row count's package is already on disk (built by an earlier server or
    `generate`; loaded in milliseconds) is queued at its first eager step, not after
    `compile_after` of them; without one it is counted as before."""
    model, tok = loaded
    monkeypatch.setattr(aot, "is_cached", lambda model, rows, precision: on_disk)
    gate = threading.Event()
    gate.set()
    holder: dict[str, GatedFastStep] = {}
    engine = Engine(model, tok, max_batch=1, compile=True, compile_after=64,
                    build_step=lambda b: holder["fast"].build(b))
    holder["fast"] = GatedFastStep(engine, gate)
    engine.start()
    sink = Collector()
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    try:
        engine.submit([Choice(0, tok.encode("the dog"), params, sink)])
        sink.wait(1)
        assert engine.runner.compiler.wait_idle(60)
    finally:
        engine.shutdown()
    uses = engine.runner.compiler.uses[(1, 64)]
    if on_disk:
        # queued at once (its count set to 64; eager steps until the swap add to it), built
        assert uses >= 64 and (1, 64) in engine.runner.fast
    else:
        assert uses == 29 and not engine.runner.fast  # 29 eager steps of 64: not queued


@pytest.mark.slow
def test_compiled_bucket_gives_generate_greedy_tokens(loaded, monkeypatch):
    """Where the step is not packaged (CUDA, int8, a failed package), the real torch.compile
    step (inductor C++; two compiles, about 10 s each) serving a lone greedy request gives
    model.generate's tokens, and swapping it in recompiles nothing (its guards hold on the
    real cache and on the engine thread's tensors). Every bucket compiles the same code, which
    dynamo counts as recompiles: with its limit at 1 the second bucket still compiles (the
    runner raises the limit to hold every bucket)."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(dynamo_config, "recompile_limit", 1)
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2, compile=True, compile_after=1)
    engine.runner.precision = None  # torch.compile's step, not the package
    engine.start()
    ids = tok.encode("the cat sat")
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    try:
        engine.runner.compiler.request((2, 64))
        engine.runner.compiler.request((1, 64))
        assert engine.runner.compiler.wait_idle(600)
        assert set(engine.runner.fast) == {(1, 64), (2, 64)}, engine.runner.compiler.failed
        graphs = counters["stats"]["unique_graphs"]
        sink = Collector()
        engine.submit([Choice(0, ids, params, sink)])
        events = sink.wait(1)[0]
        assert counters["stats"]["unique_graphs"] == graphs  # no recompile in the engine
    finally:
        engine.shutdown()
    ref = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)
    assert "".join(e.text for e in events) == tok.decode(ref[0, len(ids):].tolist())


# ------------------------------------------------------------------ precision and options
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_engine_serves_a_bf16_copy(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2, dtype="bf16").start()
    try:
        sink = Collector()
        engine.submit([Choice(0, tok.encode("the"), SamplingParams(max_tokens=8,
                                                                   ignore_eos=True), sink)])
        events = sink.wait(1)[0]
    finally:
        engine.shutdown()
    assert events[-1].completion_tokens == 8
    assert engine.runner.cache.k.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the run's model is untouched


def test_bad_compile_and_precision_options(tiny_run, tmp_path, monkeypatch, capsys):
    assert main(["serve", str(tiny_run), "--compile-after", "0"]) == 2
    assert "--compile-after=0" in capsys.readouterr().err
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse avx2\n")
    monkeypatch.setattr("microtransformer.device.CPUINFO", str(cpuinfo))
    assert main(["serve", str(tiny_run), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "--precision bf16" in err and "avx512_bf16" in err and len(err.splitlines()) == 1
