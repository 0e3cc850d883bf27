"""Reading a corpus as documents, and the first pass over it (`scan_sources`).

Documents: each text file is one document, except that a line holding only `<|endoftext|>` (the
TinyStories format) ends a document inside a file; each record of a `.jsonl` file is one (a
plain-text record, or an instruction / chat record: `data.instructions`). A long
document is read in pieces of ~256K characters cut where the byte-level BPE pre-tokenizer splits
anyway, so the tokens do not depend on the piece size.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import warnings
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from microtransformer.data.formatting import LineShape
from microtransformer.data.instructions import is_instruction_record, record_segments
from microtransformer.data.sources import Source, file_sha256
from microtransformer.errors import UserError
from microtransformer.tokenizer import EOS_TOKEN

CHUNK_CHARS = 1 << 18  # a long document is read and encoded in pieces of ~256K characters
_BINARY_SNIFF_BYTES = 8192


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(_BINARY_SNIFF_BYTES)


def text_problem(path: str | os.PathLike, chunk: int = 1 << 20) -> str | None:
    """What makes a file unfit as UTF-8 text, or None: the one rule `prepare` and `eval` share.

    Every byte is read (in chunks): a NUL byte anywhere makes it binary (whatever comes
    before it, so the answer does not depend on the chunk size); otherwise the first invalid
    UTF-8 sequence is named with its exact byte offset (from the start of the file), line and
    column. The message completes "FILE ..." (e.g. "is not UTF-8 text (...)").
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes of the file passed to the decoder so far
    line, line_start = 1, 0
    not_utf8 = None  # the first invalid sequence; a NUL later in the file still wins
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            final = not block
            nul = block.find(b"\x00")
            if nul >= 0:
                at = offset + nul
                return (f"is a binary file (it contains NUL bytes: the first at byte {at:,}); "
                        "pass UTF-8 text")
            if not_utf8 is None:
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(block, final=final)
                except UnicodeDecodeError as exc:
                    at = offset - pending + exc.start
                    bad = exc.object[exc.start:exc.end]
                    head = exc.object[:exc.start]
                    nl = head.rfind(b"\n")
                    col_start = offset - pending + nl + 1 if nl >= 0 else line_start
                    bad_line = line + head.count(b"\n")
                    not_utf8 = (f"is not UTF-8 text ({exc.reason}: byte(s) {bad.hex(' ')} at "
                                f"byte {at:,}, line {bad_line}, column "
                                f"{at - col_start + 1}); convert it to UTF-8 (e.g. iconv -f "
                                "latin1 -t utf-8)")
                line += block.count(b"\n")
                nl = block.rfind(b"\n")
                if nl >= 0:
                    line_start = offset + nl + 1
            offset += len(block)
            if final:
                return not_utf8


def read_text(path: str | os.PathLike) -> str:
    """The whole text of a UTF-8 file, checked by `text_problem` (UserError naming the file and
    the first bad byte); FileNotFoundError / UserError for a missing path or a directory."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p} is a directory, not a text file; pass text files")
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; pass an existing UTF-8 text file")
    problem = text_problem(p)
    if problem is not None:
        raise UserError(f"{p} {problem}")
    return p.read_text(encoding="utf-8")


def _iter_file_pieces(source: Source, text_field: str) -> Iterator[tuple[bool, str]]:
    """Yield (starts_new_document, text) pieces of one file, in order.

    Text files: a line equal to `<|endoftext|>` ends a document; a long document comes in pieces
    of ~CHUNK_CHARS cut at line boundaries (preferably where the byte-level pre-tokenizer splits
    anyway, so BPE tokens are unchanged). Empty documents are dropped.
    """
    if source.format == "jsonl":
        for record in iter_jsonl(source, text_field):
            text = record if isinstance(record, str) else "".join(t for t, _ in record)
            if text:
                yield True, text
        return
    buf: list[str] = []
    size = 0
    new_doc = True
    with open(source.path, encoding="utf-8", newline="") as f:  # keep \r\n as it is
        for line in f:
            if line.rstrip("\r\n") == EOS_TOKEN:
                if size:
                    yield new_doc, "".join(buf)
                buf, size, new_doc = [], 0, True
                continue
            cut_ok = _safe_cut(buf[-1], line) if buf else False
            if size >= CHUNK_CHARS and (cut_ok or size >= 4 * CHUNK_CHARS):
                yield new_doc, "".join(buf)
                buf, size, new_doc = [], 0, False
            buf.append(line)
            size += len(line)
    if size:
        yield new_doc, "".join(buf)


def iter_jsonl(source: Source, text_field: str) -> Iterator[str | list[tuple[str, bool]]]:
    """The records of a .jsonl file: a plain-text record's text, or an instruction record's
    (text, learned) pieces (`data.instructions`). Blank lines are skipped; a line that is not a
    JSON object with the text field or an instruction shape is a UserError naming its line."""
    with open(source.path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{source.path}:{lineno}: not valid JSON ({exc.msg}); "
                                "a .jsonl file needs one JSON object per line") from exc
            if isinstance(record, dict) and is_instruction_record(record, text_field):
                yield record_segments(record, f"{source.path}:{lineno}")
                continue
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(
                    f"{source.path}:{lineno}: record has no {text_field!r} field (has "
                    f"{keys}); pass the right field with --text-field, or give instruction "
                    "records {\"prompt\", \"completion\"} or {\"messages\": [...]}"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(f"{source.path}:{lineno}: field {text_field!r} is "
                                f"{type(text).__name__}, expected a string")
            yield text


def iter_records(sources: Sequence[Source], text_field: str
                 ) -> Iterator[tuple[int, list[tuple[str, bool]]]]:
    """(document index, (text, learned) pieces) of instruction sources, numbered as
    `iter_pieces` numbers them (each instruction record is one document)."""
    doc = -1
    for source in sources:
        for record in iter_jsonl(source, text_field):
            if isinstance(record, str):
                raise UserError(f"{source.path}: plain-text records mixed with instruction "
                                "records; prepare them into separate datasets")
            if any(text for text, _ in record):
                doc += 1
                yield doc, record


def _safe_cut(prev_line: str, next_line: str) -> bool:
    """True when cutting between two lines cannot change byte-level BPE pre-tokens: the previous
    line ends "X\\n" and the next starts with Y, X and Y not whitespace."""
    return (len(prev_line) >= 2 and prev_line[-1] == "\n" and not prev_line[-2].isspace()
            and bool(next_line) and not next_line[0].isspace())


@dataclass
class Scan:
    sources: list[Source]            # readable sources, in order
    doc_keys: array                  # per document: 64-bit content hash (for val_fraction)
    doc_chars: array                 # per document: its characters
    chars: int                       # total characters of all documents
    records: list[dict[str, Any]]    # meta.json's per-file entries
    instruction_docs: int = 0        # documents that are instruction / chat records
    paragraph_lines: array = field(default_factory=lambda: array("B"))  # per document: 1 when
    # it puts one paragraph per line (data.formatting.LineShape)


def file_documents(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """The documents of one file exactly as `prepare` reads them (pieces of a long document
    joined back): a text file split at lines holding only `<|endoftext|>`, or a .jsonl file's
    records' `text_field`. For `eval`, so that a file scores the text the model trained on."""
    path = Path(path)
    source = Source(path, "jsonl" if path.suffix == ".jsonl" else "text", str(path))
    docs: list[list[str]] = []
    for new_doc, piece in _iter_file_pieces(source, text_field):
        if new_doc or not docs:
            docs.append([])
        docs[-1].append(piece)
    return ["".join(d) for d in docs]


def iter_pieces(sources: Sequence[Source], text_field: str) -> Iterator[tuple[int, str]]:
    """(document index, text piece) over all sources."""
    doc = -1
    for source in sources:
        for new_doc, text in _iter_file_pieces(source, text_field):
            doc += new_doc
            yield doc, text


def scan_sources(sources: Sequence[Source], text_field: str, progress: bool) -> Scan:
    """First pass: check every file, count characters, hash documents and files."""
    kept: list[Source] = []
    doc_keys = array("Q")  # 8 bytes per document, even for millions of documents
    doc_chars = array("Q")
    records: list[dict[str, Any]] = []
    chars = 0
    instruction_docs = 0
    paragraph_lines = array("B")
    for source in tqdm(sources, desc="scan", unit="file", disable=None if progress else True):
        problem = None
        if _is_binary(source.path):
            problem = text_problem(source.path)
        docs: list[int] = []
        sizes: list[int] = []
        shapes: list[bool] = []
        n_chars = 0
        if problem is None:
            try:
                h = None
                shape = LineShape()
                for new_doc, text in _iter_file_pieces(source, text_field):
                    if new_doc:
                        if h is not None:
                            docs.append(int.from_bytes(h.digest()[:8], "little"))
                            shapes.append(shape.one_paragraph_per_line())
                        h = hashlib.sha256()
                        shape = LineShape()
                        sizes.append(0)
                    if "\x00" in text:
                        problem = (text_problem(source.path)
                                   or "holds a NUL character (\\u0000) in its text")
                        break
                    h.update(text.encode("utf-8", "surrogatepass"))
                    shape.update(text)
                    n_chars += len(text)
                    sizes[-1] += len(text)
                if h is not None:
                    docs.append(int.from_bytes(h.digest()[:8], "little"))
                    shapes.append(shape.one_paragraph_per_line())
            except UnicodeDecodeError:
                problem = text_problem(source.path) or "is not UTF-8 text"
        if problem is not None:
            if source.strict:
                raise UserError(f"{source.path} {problem}")
            warnings.warn(f"skipping {source.path}: it {problem}", stacklevel=2)
            continue
        if source.format == "jsonl":  # instruction records (a second, cheap pass)
            instruction_docs += sum(1 for r in iter_jsonl(source, text_field)
                                    if not isinstance(r, str) and any(t for t, _ in r))
        kept.append(source)
        paragraph_lines.extend(shapes)
        doc_keys.extend(docs)  # duplicates share a key; ties are broken by document index
        doc_chars.extend(sizes)
        chars += n_chars
        records.append({"path": str(source.path), "origin": source.origin,
                        "format": source.format, "bytes": source.path.stat().st_size,
                        "sha256": file_sha256(source.path), "documents": len(docs)})
    return Scan(kept, doc_keys, doc_chars, chars, records, instruction_docs, paragraph_lines)


