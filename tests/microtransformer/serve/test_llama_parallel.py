"""`interop/llama_parallel.mjs`, the llama.cpp column of `benchmarks/serve.py`: N sequences
decoded at once in one llama.cpp context give each the greedy tokens our model gives (so the
benchmark times the same work), and exactly the tokens asked for."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from microtransformer.export_gguf import export_gguf
from tests.microtransformer.interop_helpers import (
    INTEROP,
    greedy_ours,
    need_node_package,
    train_tiny,
)

pytest.importorskip("gguf", reason="pip install 'gguf>=0.19,<0.20'")


def test_parallel_sequences_are_greedy_and_complete(tmp_path: Path) -> None:
    need_node_package("node-llama-cpp")
    model, tok = train_tiny()
    gguf = tmp_path / "m.gguf"
    export_gguf(model, gguf, tok, quant="f32")
    prompt = tok.encode("Once upon a time")
    request = {"model": str(gguf), "prompt": prompt, "sequences": 3, "tokens": 12,
               "repeats": 2, "threads": 1}
    (tmp_path / "req.json").write_text(json.dumps(request))
    proc = subprocess.run(["node", str(INTEROP / "llama_parallel.mjs"),
                           str(tmp_path / "req.json")], capture_output=True, text=True,
                          timeout=300, cwd=INTEROP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["sequences"] == 3 and len(res["runs"]) == 2
    for run in res["runs"]:
        assert run["generated"] == [12, 12, 12] and run["tokens_per_s"] > 0
        assert len(run["ttft_ms"]) == 3
    # ours, without stopping at end-of-text (the script does not stop either)
    want = greedy_ours(model, prompt, 12, eos=None)
    assert res["tokens_out"] == [want] * 3
