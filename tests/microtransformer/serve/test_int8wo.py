"""`serve --precision int8wo`: int8 weight-only linears (`microtransformer.quantization`, what
`generate --dtype int8wo` runs). The served greedy tokens are the int8wo model's own greedy
tokens, and against the fp32 model they stay within the tolerance the generate tests use for
int8wo (`tests/microtransformer/decoding/test_generator.py`: every logit within 0.25 x the
fp32 logits' standard deviation)."""

from __future__ import annotations

import httpx
import pytest
import torch

from microtransformer.checkpoint import load_run
from microtransformer.device import prepare_model
from tests.microtransformer.serve.conftest import start_server

TOLERANCE = 0.25  # x std of the fp32 logits, as test_lower_precision_logits_within_tolerance


@pytest.mark.parametrize("process", [False, True])
def test_int8wo_greedy_tokens_match_generate_and_fp32_within_tolerance(tiny_run, process):
    model, tok, _ = load_run(tiny_run)
    low = prepare_model(model, "int8wo")
    live = start_server([tiny_run], precision="int8wo", process=process)
    try:
        card = httpx.get(live.url + "/v1/models").json()["data"][0]
        assert card["precision"] == "int8wo"
        for prompt in ("the cat", "owl", "the dog ran to the"):
            body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 0,
                    "ignore_eos": True}
            served = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()
            logprobs = served["choices"][0]["logprobs"]["token_logprobs"]
            ids = torch.tensor([tok.encode(prompt)])
            with torch.no_grad():
                want = low.generate(ids, max_new_tokens=16, do_sample=False,
                                    eos_token_id=None)[0, ids.size(1):]
                assert served["choices"][0]["text"] == tok.decode(want.tolist())
                # the fp32 model over the same tokens: each int8wo choice is fp32's greedy
                # token or within the tolerance of it, and so is its log-probability
                full = torch.cat([ids[0], want])[None]
                ref = model(full)[0, ids.size(1) - 1:-1]  # (16, V): fp32 logits
            bound = TOLERANCE * float(ref.std())
            chosen = ref.gather(-1, want[:, None]).squeeze(-1)
            assert float((ref.amax(-1) - chosen).max()) <= 2 * bound
            fp32_logprobs = torch.log_softmax(ref, -1).gather(-1, want[:, None]).squeeze(-1)
            assert float((torch.tensor(logprobs) - fp32_logprobs).abs().max()) <= 2 * bound
    finally:
        live.stop()
