"""Paragraph-break variety: which training documents get blank lines between their paragraphs.

A model trained on text that puts one paragraph per line (TinyStories' own files, most
generated or scraped prose) never sees a blank line, and pays for every one in a text that
separates paragraphs with them (docs/RESULTS.md, section 6: +0.056 bits/byte on the same stories
with blank lines). `prepare` therefore gives half of such documents, chosen by a hash of their
content, a blank line after every line break, in the training split only. Everything here is a
pure function of the text, so `prepare` stays deterministic.

Which documents: those with at least two lines, no blank (whitespace-only) line, and lines of at
least `MIN_MEAN_LINE_CHARS` characters on average: one paragraph per line. Hard-wrapped prose
(Project Gutenberg: ~70-character lines, blank lines between paragraphs) and code (short lines,
blank lines that mean something) are left exactly as they are.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# Hard-wrapped text wraps at 80 columns or fewer, so its mean line is shorter; a paragraph per
# line is longer (TinyStories: ~190 characters per line).
MIN_MEAN_LINE_CHARS = 80

_INNER_BREAK = re.compile(r"(?<=[^\r\n])(\r?\n)(?=[^\r\n])")
_LAST_BREAK = re.compile(r"(?<=[^\r\n])\r?\n\Z")  # a break after text, ending the piece


@dataclass
class LineShape:
    """Running line statistics of one document, fed piece by piece. Blank lines before its
    first line of text and after its last do not count."""

    text_lines: int = 0       # complete lines holding text
    chars: int = 0            # their characters, line breaks included
    blank: bool = False       # a whitespace-only line between two lines of text
    gap: bool = False         # a blank line since the last line of text
    tail: str = ""            # the last line so far, not ended yet

    def update(self, piece: str) -> None:
        """Add the next piece of the document."""
        lines = (self.tail + piece).split("\n")
        self.tail = lines.pop()
        for line in lines:
            if line.strip():
                self.blank = self.blank or (self.gap and self.text_lines > 0)
                self.text_lines += 1
                self.chars += len(line) + 1
                self.gap = False
            else:
                self.gap = True

    def one_paragraph_per_line(self) -> bool:
        """True for a document whose format is ambiguous: at least two lines of text, no blank
        line between them, `MIN_MEAN_LINE_CHARS` or more characters per line on average."""
        lines, chars, blank = self.text_lines, self.chars, self.blank
        if self.tail.strip():  # a last line without a line break
            blank = blank or (self.gap and lines > 0)
            lines, chars = lines + 1, chars + len(self.tail)
        return not blank and lines >= 2 and chars >= MIN_MEAN_LINE_CHARS * lines


def chosen(doc_key: int) -> bool:
    """Whether a qualifying document gets blank lines: a coin flip keyed by its content hash
    (salted, so it is independent of the val split, which also orders documents by that hash)."""
    digest = hashlib.blake2b(doc_key.to_bytes(8, "little"), digest_size=1,
                             person=b"mt-breaks").digest()
    return digest[0] & 1 == 1


def add_blank_lines(piece: str, carry: str) -> tuple[str, str]:
    """A piece of a chosen document with a blank line after each inner line break.

    `carry` is the line break the previous piece ended with ("" when none): it becomes a blank
    line only now that text follows it. Returns (the new piece, the carry for the next piece); a
    break at the very end of the document's training text stays single.
    """
    if not piece:
        return piece, carry
    varied = (carry if carry else "") + _INNER_BREAK.sub(r"\1\1", piece)
    match = _LAST_BREAK.search(piece)
    return varied, match.group(0) if match else ""
