"""The continuous-batching engine on its own (no HTTP): equality with generate, stop strings,
cancellation and the bounded queue."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from microtransformer.checkpoint import load_run
from microtransformer.serve.choice import Choice, Event, SamplingParams
from microtransformer.serve.engine import Engine
from microtransformer.serve.scheduler import QueueFullError
from tests.microtransformer.serve.conftest import write_run


@pytest.fixture(scope="module")
def loaded(tiny_run):
    model, tok, _ = load_run(tiny_run)
    return model, tok


class Collector:
    """A thread-safe sink: events by sequence index, and a flag per finished sequence."""

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()

    def __call__(self, event: Event) -> None:
        self.events.put(event)

    def wait(self, count: int, timeout: float = 30.0) -> dict[int, list[Event]]:
        out: dict[int, list[Event]] = {}
        done = 0
        deadline = time.monotonic() + timeout
        while done < count:
            ev = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            out.setdefault(ev.index, []).append(ev)
            done += ev.finish_reason is not None
        return out


def test_staggered_joins_match_generate(loaded):
    """Sequences that join a running batch at different steps (and outnumber the slots), and
    leave it at different steps (their rows are repacked: the last busy row moves into a freed
    one, cache included), each draw exactly the tokens model.generate draws with the same
    seed. Deterministic: sequence i+1 is submitted from the engine thread when sequence i
    has drawn its second token, so every run has the same joins at the same steps (a step's
    batch composition changes float rounding, so it must not depend on timing)."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=3, max_queue=16).start()
    prompts = [tok.encode(p) for p in ("the cat", "a", "the dog ran to", "owl", "hill",
                                       "the mat")]
    sink = Collector()

    def submit(i: int) -> None:
        params = SamplingParams(max_tokens=15 - 2 * (i % 3), temperature=0.9, top_k=8,
                                repetition_penalty=1.2, ignore_eos=True)
        engine.submit([Choice(i, prompts[i], params, chain, seed=100 + i)])

    def chain(event: Event) -> None:  # in the engine thread, between two steps
        sink(event)
        if event.completion_tokens == 2 and event.index + 1 < len(prompts):
            submit(event.index + 1)  # joins at the next step, mid-generation of the others

    try:
        submit(0)
        events = sink.wait(len(prompts))
    finally:
        engine.shutdown()
    for i, ids in enumerate(prompts):
        n_new = 15 - 2 * (i % 3)
        ref = model.generate(torch.tensor([ids]), max_new_tokens=n_new, temperature=0.9, top_k=8,
                             repetition_penalty=1.2,
                             generator=torch.Generator().manual_seed(100 + i))
        text = "".join(e.text for e in events[i])
        assert text == tok.decode(ref[0, len(ids):].tolist()), i
        assert events[i][-1].finish_reason == "length"
        assert events[i][-1].completion_tokens == n_new


def test_eos_stops_with_stop_reason(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2).start()
    try:
        sink = Collector()
        # greedy from many prompts: at least one reaches EOS on this random model, or none does
        params = SamplingParams(max_tokens=40, temperature=0)
        for i in range(4):
            engine.submit([Choice(i, [tok.eos_token_id, *tok.encode("the " * i)], params,
                                    sink)])
        events = sink.wait(4)
    finally:
        engine.shutdown()
    for evs in events.values():
        last = evs[-1]
        assert last.finish_reason in ("stop", "length")
        assert (last.finish_reason == "length") == (last.completion_tokens == 40)


def test_cancel_frees_slot_and_queue(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=1, max_queue=1).start()
    try:
        sink = Collector()
        long = SamplingParams(max_tokens=60, ignore_eos=True)
        running = Choice(0, [1, 2], long, sink)
        engine.submit([running])
        while engine.running == 0:
            time.sleep(0.001)
        waiting = Choice(1, [1], long, sink)
        engine.submit([waiting])
        with pytest.raises(QueueFullError):
            engine.submit([Choice(2, [1], long, sink)])
        engine.cancel([waiting, running])
        deadline = time.monotonic() + 10
        while (engine.running or engine.queue_depth) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.running == 0 and engine.queue_depth == 0
        assert len(running.generated) < 60 and not waiting.generated
    finally:
        engine.shutdown()


def test_shutdown_fails_unfinished(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=1)
    sink = Collector()
    engine.submit([Choice(0, [1], SamplingParams(max_tokens=5), sink)])
    engine.start()
    threading.Thread(target=engine.shutdown).start()
    ev = sink.wait(1)[0][-1]
    assert ev.finish_reason in ("stop", "length", "error")


def test_column_buckets_match_generate(tmp_path):
    """Sequences whose steps move up column buckets (64 -> 128 -> 256: the step attends over
    a wider view of the same cache) still draw generate's tokens."""
    model, tok, _ = load_run(write_run(tmp_path / "long", max_seq_len=256))
    engine = Engine(model, tok, max_batch=2).start()
    assert engine.scheduler.col_buckets == [64, 128, 256]
    try:
        sink = Collector()
        prompts = [[(7 * i + j) % (tok.vocab_size - 2) + 2 for j in range(n)]
                   for i, n in enumerate((50, 5, 120))]
        params = SamplingParams(max_tokens=90, temperature=1.0, ignore_eos=True)
        for i, ids in enumerate(prompts):
            engine.submit([Choice(i, ids, params, sink, seed=7 + i)])
        events = sink.wait(len(prompts))
    finally:
        engine.shutdown()
    for i, ids in enumerate(prompts):
        ref = model.generate(torch.tensor([ids]), max_new_tokens=90,
                             generator=torch.Generator().manual_seed(7 + i))
        assert "".join(e.text for e in events[i]) == tok.decode(ref[0, len(ids):].tolist()), i


def test_invalid_logits_fail_only_their_choice(loaded):
    """A row whose probabilities hold nan (where torch.multinomial raises) fails its choice
    with that error; the other rows of the same batched sampling go on."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2)
    step, calls = engine.runner.step, []

    def nan_in_row_0_once(*args, **kwargs):
        logits = step(*args, **kwargs)
        if not calls:
            logits = logits.clone()
            logits[0] = float("nan")
        calls.append(1)
        return logits

    engine.runner.step = nan_in_row_0_once
    engine.start()
    sink = Collector()
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    try:
        with engine.admission_paused():
            engine.submit([Choice(i, [1, 2], params, sink, seed=i) for i in range(2)])
        events = sink.wait(2)
    finally:
        engine.shutdown()
    assert events[0][-1].finish_reason == "error"
    assert "`nan`" in events[0][-1].error and events[0][-1].completion_tokens == 1
    assert events[1][-1].finish_reason == "length" and events[1][-1].completion_tokens == 5


def test_prompts_of_one_length_admitted_together_are_prefilled_as_one_batch(loaded):
    """Equal-length prompts admitted at the same step go through one batched prefill
    (`ModelRunner.prefill_rows`): the cache rows and first logits are those of one-by-one
    prefills (up to float rounding), and each choice still draws `generate`'s tokens."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=4, max_queue=16)
    runner = engine.runner
    prompts = [[5, 9, 2, 7], [3, 3, 8, 1], [6, 2, 4, 9]]
    with torch.inference_mode():
        one = torch.stack([runner.prefill(r, p) for r, p in zip((0, 2, 3), prompts,
                                                                strict=True)])
        k_one = runner.decoder.cache.k[:, [0, 2, 3], :, :4].clone()
        runner.decoder.cache.k.zero_()
        many = runner.prefill_rows([0, 2, 3], prompts)
        k_many = runner.decoder.cache.k[:, [0, 2, 3], :, :4]
    torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_many, k_one, atol=1e-5, rtol=1e-5)
    assert float(runner.decoder.cache.k[:, 1].abs().max()) == 0.0  # row 1 untouched
    with pytest.raises(ValueError, match="one length"):
        runner.prefill_rows([0, 1], [[1, 2], [1, 2, 3]])
    sink = Collector()
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
    ids = [*prompts, [4, 4]]  # three of one length (one batch) and one alone
    engine.start()
    try:
        with engine.admission_paused():  # all admitted at one step
            engine.submit([Choice(i, ids[i], params, sink) for i in range(len(ids))])
        events = sink.wait(len(ids))
    finally:
        engine.shutdown()
    for i, prompt in enumerate(ids):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
        assert "".join(e.text for e in events[i]) == tok.decode(ref[0, len(prompt):].tolist())
        assert events[i][-1].completion_tokens == 8
