"""Write a synthetic instruction file for chat fine-tuning: small arithmetic and word tasks.

    python scripts/make_instructions.py --out instructions.jsonl --records 20000 --seed 0
    python scripts/make_instructions.py --out held_out.jsonl --records 200 --seed 1

Each line is a chat record in the format `microtransformer prepare` reads (docs/FINETUNE.md):

    {"messages": [{"role": "user", "content": "What is 12 plus 7?"},
                  {"role": "assistant", "content": "19"}]}

Tasks (one answer each, checkable by code): addition and subtraction of numbers below 100, the
larger of two numbers, a word spelled backwards, in capitals, its first letter, its number of
letters. A tenth of the records start with a system message, a tenth have a second exchange.
`--format prompt` writes {"prompt": "Q: ...\\nA:", "completion": " ..."} records instead.

Licence: every record is made by this code from the word list below (common English words
written for this script) and random numbers; no text is taken from any dataset. The generated
files are dedicated to the public domain (CC0 1.0); the script is under the repository's licence.
Output is a pure function of --records, --seed and --format.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

_WORD_TEXT = (
    "apple river stone cloud garden window bread candle forest pencil rabbit summer winter "
    "yellow orange basket bridge castle dragon flower kitten letter market mirror needle "
    "pocket rocket silver spoon table tiger tomato turtle violin wagon water zebra anchor "
    "button carpet doctor engine feather guitar hammer island jacket ladder monkey night ocean "
    "pepper queen rain sail shadow ticket umbrella valley whistle yarn bottle cookie desk egg "
    "frog glass hat ink jam kite lamp moon nest owl pear quilt ring sun tree "
)
WORDS = tuple(_WORD_TEXT.split())
SYSTEM = "You are a helpful assistant. Answer with the answer only."


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randrange(100), r.randrange(100)
    return r.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"{a} + {b} = ?"]), str(a + b)


def _subtract(r: random.Random) -> tuple[str, str]:
    a, b = sorted((r.randrange(100), r.randrange(100)), reverse=True)
    return r.choice([f"What is {a} minus {b}?", f"Subtract {b} from {a}."]), str(a - b)


def _larger(r: random.Random) -> tuple[str, str]:
    a, b = r.sample(range(1000), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _backwards(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return r.choice([f"Spell '{w}' backwards.", f"Reverse the word {w}."]), w[::-1]


def _capitals(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f"Write '{w}' in capital letters.", w.upper()


def _first_letter(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f"What is the first letter of '{w}'?", w[0]


def _length(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f"How many letters are in '{w}'?", str(len(w))


TASKS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _add, _subtract, _larger, _backwards, _capitals, _first_letter, _length)


def make_record(r: random.Random, fmt: str) -> dict:
    """One record: a task's question and answer, as chat messages or prompt/completion."""
    question, answer = r.choice(TASKS)(r)
    if fmt == "prompt":
        return {"prompt": f"Q: {question}\nA:", "completion": f" {answer}"}
    messages = []
    if r.random() < 0.1:
        messages.append({"role": "system", "content": SYSTEM})
    if r.random() < 0.1:  # an earlier exchange, so the template's multi-turn form is learned
        q0, a0 = r.choice(TASKS)(r)
        messages += [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}]
    messages += [{"role": "user", "content": question},
                 {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="the .jsonl file to write")
    p.add_argument("--records", type=int, default=20000, help="records to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (another seed: other "
                   "questions, e.g. a held-out set)")
    p.add_argument("--format", choices=("messages", "prompt"), default="messages")
    args = p.parse_args(argv)
    if args.records < 1:
        p.error(f"--records={args.records} must be at least 1")
    r = random.Random(args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for _ in range(args.records):
            f.write(json.dumps(make_record(r, args.format)) + "\n")
    print(f"wrote {args.records:,} {args.format} records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
