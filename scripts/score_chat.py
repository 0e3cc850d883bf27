"""Score a chat fine-tune on held-out instruction records: exact-match accuracy of greedy replies.

    python scripts/score_chat.py runs/chat held_out.jsonl --exclude instructions.jsonl

Each record's conversation up to its last (assistant) message is rendered with the chat
template `serve` uses (`microtransformer.chat_template.render_prompt`); the model replies
greedily until `<|endoftext|>` or a newline (at most --max-new-tokens), and the reply, stripped,
must equal the record's answer. Records whose question is also in --exclude (the training file)
are skipped, so the score is on questions the model never saw. Prints the accuracy overall and
per kind of question (the generator's tasks).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microtransformer.chat_template import render_prompt
from microtransformer.checkpoint import load_run

# the tasks of scripts/make_instructions.py, by the words of their questions
KINDS = (("addition", r"plus|^Add|\+"), ("subtraction", r"minus|^Subtract"),
         ("larger of two", r"larger"), ("backwards", r"backwards|^Reverse"),
         ("capitals", r"capital"), ("first letter", r"first letter"),
         ("letter count", r"How many letters"))


def _turns(record: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in record["messages"]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("records", type=Path, help="held-out chat records (.jsonl)")
    p.add_argument("--exclude", type=Path, help="training records: their questions are skipped")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()
    seen = set()
    if args.exclude:
        for line in args.exclude.read_text(encoding="utf-8").splitlines():
            seen.add(render_prompt(_turns(json.loads(line))[:-1]))
    model, tokenizer, _ = load_run(args.run_dir, which="best")
    right, total = Counter(), Counter()
    for line in args.records.read_text(encoding="utf-8").splitlines():
        turns = _turns(json.loads(line))
        prompt = render_prompt(turns[:-1])
        if prompt in seen:
            continue
        ids = tokenizer.encode(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id)
        reply = tokenizer.decode(out[0, ids.shape[1]:]).split("\n")[0].strip()
        kind = next((name for name, pattern in KINDS if re.search(pattern, turns[-2][1])),
                    "other")
        total[kind] += 1
        right[kind] += reply == turns[-1][1].strip()
    n, k = sum(total.values()), sum(right.values())
    print(f"{args.run_dir}: {k}/{n} = {100 * k / max(n, 1):.1f}% exact answers on held-out "
          "questions")
    for kind in sorted(total):
        print(f"  {kind!r}: {right[kind]}/{total[kind]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
