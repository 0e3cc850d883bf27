"""Formatting variants of a TinyStories-style text file, to measure what formatting costs.

    python benchmarks/format_variants.py variants ../shared/data/tinystories/valid.txt --out VDIR
    python benchmarks/format_variants.py augment ../shared/data/tinystories/train.txt --out F

`variants` writes VDIR/<name>.txt for: original; blank_lines (a blank line between
paragraphs); straight_quotes (curly quotes folded to ASCII); no_separators (stories joined by a
blank line instead of `<|endoftext|>` lines); all_three. Score each with `microtransformer eval
RUN --data VDIR/<name>.txt` (docs/RESULTS.md, section 6).

`augment` writes a training file in which each story, independently with probability 1/2, gets
blank lines between its paragraphs and, with probability 1/2, ASCII quotes (seed 0).
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

SEP = "<|endoftext|>"


def stories(text: str) -> list[str]:
    """The stories of a TinyStories .txt file (split at separator lines), outer newlines off."""
    return [s.strip("\n") for s in text.split(SEP) if s.strip()]


def straight(text: str) -> str:
    return (text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"')
            .replace("\u201d", '"'))


def joined(parts: list[str]) -> str:
    return f"\n{SEP}\n".join(parts) + f"\n{SEP}\n"


def variants(text: str) -> dict[str, str]:
    """name -> the text reformatted one way (the content unchanged)."""
    st = stories(text)
    trimmed = [re.sub(r"[ \t]+\n", "\n", s) for s in st]
    return {
        "original": text,
        "blank_lines": joined([s.replace("\n", "\n\n") for s in st]),
        "straight_quotes": straight(text),
        "no_separators": "\n\n".join(st) + "\n",
        "all_three": "\n\n".join(straight(s).replace("\n", "\n\n") for s in trimmed) + "\n",
    }


def augment(text: str, seed: int = 0) -> str:
    """Each story with blank lines between paragraphs (p = 1/2) and ASCII quotes (p = 1/2)."""
    rng = random.Random(seed)
    out = []
    for s in stories(text):
        s = re.sub(r"[ \t]+\n", "\n", s)
        if rng.random() < 0.5:
            s = s.replace("\n", "\n\n")
        if rng.random() < 0.5:
            s = straight(s)
        out.append(s)
    return joined(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("variants", "augment"))
    p.add_argument("path", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    text = args.path.read_text(encoding="utf-8")
    if args.mode == "augment":
        args.out.write_text(augment(text), encoding="utf-8")
        print(f"wrote {args.out}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name, body in variants(text).items():
        (args.out / f"{name}.txt").write_text(body, encoding="utf-8")
        print(f"{name}: {len(body.encode('utf-8')):,} bytes")


if __name__ == "__main__":
    main()
