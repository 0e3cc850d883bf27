"""A chat fine-tune, served: after `train --init-from` on chat records, `/v1/chat/completions`
answers in the trained format through the official `openai` client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microtransformer.cli import main
from tests.microtransformer.serve.conftest import start_server

openai = pytest.importorskip("openai")

QA = {"What color is the sky?": "blue", "What color is grass?": "green",
      "What does a cow say?": "moo", "What is two plus two?": "four"}
# the parent's text: ordinary sentences with every character the chat template needs
STORY = ("User and Assistant sat by the window. What a day! The sky was blue, the grass was "
         "green, a cow said moo, and two plus two is four. Why? Note: it is so.\n") * 40
TINY = ["--model.max_seq_len", "64", "--model.embed_dim", "48", "--model.num_heads", "2",
        "--model.num_layers", "2", "--model.ff_dim", "96", "--model.dropout", "0",
        "--train.batch_size", "8", "--train.eval_steps", "2", "--train.cpu_threads", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A parent trained a few steps on plain text, then fine-tuned on four chat exchanges."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("chatft")
    (root / "story.txt").write_text(STORY)
    assert main(["prepare", str(root / "story.txt"), "--out", str(root / "text"),
                 "--tokenizer", "char", "--val-tail", "0.1"]) == 0
    assert main(["train", "--data", str(root / "text"), "--out", str(root / "parent"), *TINY,
                 "--train.max_steps", "20"]) == 0
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
               for q, a in QA.items()] * 10
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["prepare", str(root / "chat.jsonl"), "--out", str(root / "chat"),
                 "--tokenizer-from", str(root / "parent")]) == 0
    assert main(["train", "--init-from", str(root / "parent"), "--data", str(root / "chat"),
                 "--out", str(root / "run"), *TINY, "--train.max_steps", "250",
                 "--train.lr", "3e-3", "--train.eval_interval", "250"]) == 0
    return root / "run"


def test_the_chat_fine_tune_answers_through_the_openai_client(chat_run: Path) -> None:
    live = start_server([chat_run], names=["chat"], max_batch=4)
    try:
        with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0,
                           timeout=30) as client:
            for question, answer in QA.items():
                out = client.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": question}],
                    max_completion_tokens=12, temperature=0)
                choice = out.choices[0]
                # the trained format: " {answer}" then <|endoftext|>, which ends the reply
                assert choice.message.content == f" {answer}", (question, choice.message)
                assert choice.finish_reason == "stop"
    finally:
        live.stop()
