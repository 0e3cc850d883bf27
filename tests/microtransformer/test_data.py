"""Corpus sources, downloads, prepare (train.bin / val.bin / meta.json) and the BatchLoader."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from microtransformer import data
from microtransformer.data import (
    BatchLoader,
    Dataset,
    TokenWriter,
    download_file,
    fetch_dataset,
    iter_eval_batches,
    load_meta,
    load_tokens,
    plan_fraction_split,
    prepare,
    resolve_sources,
    stdlib_sources,
    token_dtype,
)
from microtransformer.errors import UserError
from microtransformer.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- sources


def test_directory_and_glob_resolution(tiny_corpus_dir: Path) -> None:
    (tiny_corpus_dir / "sub").mkdir()
    (tiny_corpus_dir / "sub" / "notes.md").write_text("# notes\n")
    (tiny_corpus_dir / "sub" / "data.jsonl").write_text('{"text": "x"}\n')
    (tiny_corpus_dir / "image.png").write_bytes(b"\x89PNG\x00")
    (tiny_corpus_dir / ".hidden").mkdir()
    (tiny_corpus_dir / ".hidden" / "secret.txt").write_text("no")
    found = resolve_sources([str(tiny_corpus_dir)])
    names = [s.path.relative_to(tiny_corpus_dir).as_posix() for s in found]
    assert names == [*(f"doc{i}.txt" for i in range(5)), "sub/data.jsonl", "sub/notes.md"]
    assert [s.format for s in found][-2:] == ["jsonl", "text"]
    assert not any(s.strict for s in found)
    globbed = resolve_sources([str(tiny_corpus_dir / "doc[13].txt")])
    assert [s.path.name for s in globbed] == ["doc1.txt", "doc3.txt"]
    one = resolve_sources([str(tiny_corpus_dir / "doc0.txt")])
    assert len(one) == 1 and one[0].strict


@pytest.mark.parametrize("arg", ["missing.txt", "nothing-*.txt"])
def test_missing_sources(tmp_path: Path, arg: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.txt|nothing-"):
        resolve_sources([str(tmp_path / arg)])


def test_default_corpus_is_stdlib_capped() -> None:
    capped = resolve_sources([], stdlib_max_bytes=200_000)
    assert capped and all(s.origin == "stdlib" and s.path.suffix == ".py" for s in capped)
    assert sum(s.path.stat().st_size for s in capped) <= 200_000
    assert [s.path for s in capped] == sorted(s.path for s in capped)
    assert capped == stdlib_sources(200_000)  # deterministic
    parts = {p for s in capped for p in s.path.parts}
    assert not parts & {"test", "tests", "site-packages", "idle_test"}
    # the cap samples across the library rather than its alphabetical start
    assert len({s.path.parent for s in capped}) > 1


# ----------------------------------------------------------------------------- downloads


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_download_file_url_with_right_and_wrong_sha(tmp_path: Path) -> None:
    src = tmp_path / "upstream.txt"
    src.write_bytes(b"To be, or not to be\n" * 50)
    target = tmp_path / "cache" / "ts.txt"
    got = download_file(src.as_uri(), target, sha256=_sha(src.read_bytes()), progress=False)
    assert got == target and target.read_bytes() == src.read_bytes()
    target.unlink()
    with pytest.raises(UserError, match=r"sha256 mismatch.*was deleted"):
        download_file(src.as_uri(), target, sha256="0" * 64, progress=False)
    assert not target.exists() and not list(target.parent.iterdir())  # no partial file left


def test_download_unreachable_names_url_and_manual_alternative(tmp_path: Path) -> None:
    url = (tmp_path / "nowhere" / "input.txt").as_uri()
    with pytest.raises(UserError) as info:
        download_file(url, tmp_path / "c" / "x.txt", progress=False)
    msg = str(info.value)
    assert url in msg and "pass the file's path" in msg
    assert not list((tmp_path / "c").iterdir())


def test_fetch_dataset_uses_cache_env_and_verifies(tmp_path: Path, monkeypatch) -> None:
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    src = tmp_path / "input.txt"
    src.write_bytes(payload)
    monkeypatch.setenv("MICROTRANSFORMER_CACHE", str(tmp_path / "cache"))
    toy = Dataset("toy", src.as_uri(), "toy.txt", _sha(payload))
    monkeypatch.setitem(data.DATASETS, "toy", toy)
    path = fetch_dataset("toy")
    assert path == tmp_path / "cache" / "toy.txt" and path.read_bytes() == payload
    src.unlink()  # now "offline": the cached, verified copy is used
    assert fetch_dataset("toy") == path
    path.write_bytes(b"corrupted")  # a bad cached copy is re-downloaded; upstream is gone
    with pytest.warns(UserWarning, match="does not match"), \
            pytest.raises(UserError, match="cannot download"):
        fetch_dataset("toy")
    assert not path.exists()
    with pytest.raises(FileNotFoundError, match=r"download .* yourself"):
        fetch_dataset("toy", download=False)


def test_tinyshakespeare_pin_matches_shared_copy(shared_data: Path) -> None:
    local = shared_data / "tinyshakespeare" / "input.txt"
    if not local.is_file():
        pytest.skip("tinyshakespeare not in shared data")
    assert data.file_sha256(local) == data.DATASETS["tinyshakespeare"].sha256


# ----------------------------------------------------------------------------- prepare


def _ids(out: Path, split: str) -> list[int]:
    return load_tokens(out, split).tolist()


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_prepare_counts_separators_and_files(tiny_corpus_dir: Path, tmp_path: Path,
                                             kind: str) -> None:
    out = tmp_path / "out"
    meta = prepare([str(tiny_corpus_dir)], out, tokenizer=kind, vocab_size=300,
                   val_fraction=0.2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin",
                                                     "val.bin"]
    assert load_meta(out) == json.loads(json.dumps(meta))
    tok = Tokenizer.load(out / "tokenizer.json")
    assert meta["vocab_size"] == tok.vocab_size and meta["kind"] == kind
    assert meta["dtype"] == "uint16"
    # five short files, each over a tenth of the val fraction: each is cut, its tail in val
    assert meta["documents"] == {"train": 5, "val": 5}
    assert meta["split"]["documents_cut"] == 5
    docs = [(tiny_corpus_dir / f"doc{i}.txt").read_text() for i in range(5)]
    parts = {}
    for split in ("train", "val"):
        ids = _ids(out, split)
        assert len(ids) == meta["tokens"][split]
        assert (out / f"{split}.bin").stat().st_size == 2 * len(ids)
        # documents separated by exactly one EOS, none at the ends
        assert ids.count(tok.eos_token_id) == meta["documents"][split] - 1
        assert ids[0] != tok.eos_token_id and ids[-1] != tok.eos_token_id
        pieces = tok.decode(ids, skip_special_tokens=False).split("<|endoftext|>")
        parts[split] = pieces
        n_bytes = sum(len(p.encode()) for p in pieces)
        assert meta["bytes"][split] == n_bytes
        assert meta["bytes_per_token"][split] == pytest.approx(n_bytes / len(ids))
    assert [a + b for a, b in zip(parts["train"], parts["val"], strict=True)] == docs
    for doc, tail in zip(docs, parts["val"], strict=True):  # the last 20% of each
        assert len(tail) == len(doc) - int(len(doc) * 0.8)
    assert {s["sha256"] for s in meta["sources"]} == {_sha(d.encode()) for d in docs}


def test_prepare_is_deterministic(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        prepare([str(tiny_corpus_dir)], out, vocab_size=300, progress=False)
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_val_tail_reproduces_char_split(tmp_path: Path) -> None:
    text = "".join(f"line {i}: the quick brown fox ~ {i * i}\n" for i in range(300))
    src = tmp_path / "one.txt"
    src.write_text(text)
    meta = prepare([str(src)], tmp_path / "out", tokenizer="char", val_tail=0.1, progress=False)
    tok = Tokenizer.load(tmp_path / "out")
    n = len(text)
    assert tok.decode(_ids(tmp_path / "out", "val")) == text[int(n * 0.9):]
    assert tok.decode(_ids(tmp_path / "out", "train")) == text[: int(n * 0.9)]
    assert meta["tokens"] == {"train": int(n * 0.9), "val": n - int(n * 0.9)}
    assert meta["split"]["documents_cut"] == 1


def test_val_fraction_cuts_one_document_at_its_tail(tmp_path: Path) -> None:
    src = tmp_path / "one.txt"
    src.write_text("abcdefghij" * 20)
    meta = prepare([str(src)], tmp_path / "out", tokenizer="char", progress=False)
    assert meta["split"]["method"] == "val_fraction" and meta["split"]["documents_cut"] == 1
    assert meta["tokens"] == {"train": 180, "val": 20}


def test_files_of_very_different_sizes_each_give_val_their_tail(tmp_path: Path) -> None:
    """The README's `prepare input.txt more_texts/`: a large file and a short one must not make
    either all validation (by whole files one of the two would be)."""
    big, short = tmp_path / "input.txt", tmp_path / "more" / "book.txt"
    short.parent.mkdir()
    big.write_text("".join(f"line {i} of the big play.\n" for i in range(4000)))
    short.write_text("".join(f"a short book, line {i}.\n" for i in range(500)))
    meta = prepare([str(big), str(short.parent)], tmp_path / "out", tokenizer="char",
                   progress=False)
    assert meta["split"]["documents_cut"] == 2
    assert meta["split"]["val_share_of_chars"] == pytest.approx(0.1, abs=0.001)
    assert meta["documents"] == {"train": 2, "val": 2}


def test_many_small_documents_go_to_val_whole_near_the_fraction() -> None:
    sizes = [50 + (i * 37) % 400 for i in range(2000)]
    keys = [(i * 2654435761) % (1 << 64) for i in range(2000)]
    plan = plan_fraction_split(sizes, keys, 0.1)
    assert set(plan.values()) == {0}  # whole documents only
    share = sum(sizes[d] for d in plan) / sum(sizes)
    assert 0.1 <= share <= 0.11  # f, within a tenth of f
    order = list(reversed(range(2000)))  # independent of the order of the files
    again = plan_fraction_split([sizes[i] for i in order], [keys[i] for i in order], 0.1)
    assert {order[d] for d in again} == set(plan)
    # a large document among small ones is cut, the small ones still go whole
    mixed = plan_fraction_split([*sizes, 200_000], [*keys, 7], 0.1)
    assert mixed[2000] == 180_000 and {mixed[d] for d in mixed if d < 2000} == {0}


def test_lopsided_tail_split_warns(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x" * 1000)
    (tmp_path / "b.txt").write_text("y" * 300)
    with pytest.warns(UserWarning, match=r"lopsided split: all of .*b\.txt \(77% of val\) is "
                                         r"validation text, none of it trained on"):
        prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tmp_path / "out",
                tokenizer="char", val_tail=0.3, progress=False)


def test_tinyshakespeare_char_matches_nanogpt_split(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "tinyshakespeare" / "input.txt"
    if not src.is_file():
        pytest.skip("tinyshakespeare not in shared data")
    text = src.read_text(encoding="utf-8")
    n = len(text)
    meta = prepare([str(src)], tmp_path / "ts", tokenizer="char", val_tail=0.1, progress=False)
    assert meta["vocab_size"] == len(set(text)) + 3  # 65 characters + eos, pad, unk
    assert meta["tokens"] == {"train": int(n * 0.9), "val": n - int(n * 0.9)}
    tok = Tokenizer.load(tmp_path / "ts")
    assert tok.decode(_ids(tmp_path / "ts", "val")) == text[int(n * 0.9):]


def test_jsonl_text_field_and_eos_marker_lines(tmp_path: Path) -> None:
    rows = [{"body": "first story", "id": 1}, {"body": "second one", "id": 2},
            {"body": "", "id": 3}, {"body": "third tale here", "id": 4}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "b.txt").write_text("story four\n<|endoftext|>\nstory five\n<|endoftext|>\n")
    out = tmp_path / "out"
    meta = prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], out, tokenizer="char",
                   text_field="body", val_fraction=0.2, progress=False)
    # empty record dropped, markers split b.txt: 5 short documents, each cut in two
    assert meta["documents"] == {"train": 5, "val": 5}
    tok = Tokenizer.load(out)
    train, val = (tok.decode(_ids(out, split), skip_special_tokens=False).split("<|endoftext|>")
                  for split in ("train", "val"))
    assert [a + b for a, b in zip(train, val, strict=True)] == [
        "first story", "second one", "third tale here", "story four\n", "story five\n"]
    with pytest.raises(UserError, match=r"no 'text' field.*--text-field"):
        prepare([str(tmp_path / "a.jsonl")], tmp_path / "o2", progress=False)


def test_binary_files_error_when_named_skipped_when_walked(tiny_corpus_dir: Path,
                                                          tmp_path: Path) -> None:
    (tiny_corpus_dir / "blob.txt").write_bytes(b"abc\x00\x01\x02")
    (tiny_corpus_dir / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=r"blob\.txt is a binary file"):
        prepare([str(tiny_corpus_dir / "blob.txt")], tmp_path / "o1", progress=False)
    with pytest.raises(UserError, match=r"latin1\.txt is not UTF-8"):
        prepare([str(tiny_corpus_dir / "latin1.txt")], tmp_path / "o1", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = prepare([str(tiny_corpus_dir)], tmp_path / "o2", tokenizer="char", progress=False)
    skipped = " ".join(str(w.message) for w in caught)
    assert "blob.txt" in skipped and "latin1.txt" in skipped
    assert len(meta["sources"]) == 5
    assert not (tmp_path / "o1").exists() or not list((tmp_path / "o1").glob("*.bin"))


def test_empty_and_too_small_corpora(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="corpus is empty"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "o", progress=False)
    (tmp_path / "tiny.txt").write_text("a")
    with pytest.raises(UserError, match="too small"):
        prepare([str(tmp_path / "tiny.txt")], tmp_path / "o", tokenizer="char", val_tail=0.1,
                progress=False)
    assert not list((tmp_path / "o").glob("*")) if (tmp_path / "o").exists() else True
    with pytest.raises(UserError, match=r"val_tail=1\.5"):
        prepare([str(tmp_path / "tiny.txt")], tmp_path / "o", val_tail=1.5, progress=False)


def test_prepare_reuses_tokenizer_path(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    first = prepare([str(tiny_corpus_dir)], tmp_path / "a", tokenizer="char", progress=False)
    second = prepare([str(tiny_corpus_dir / "doc0.txt"), str(tiny_corpus_dir / "doc1.txt")],
                     tmp_path / "b", tokenizer="bpe",
                     tokenizer_path=tmp_path / "a" / "tokenizer.json", progress=False)
    assert second["kind"] == "char" and second["vocab_size"] == first["vocab_size"]
    saved = [(tmp_path / d / "tokenizer.json").read_bytes() for d in ("a", "b")]
    assert saved[0] == saved[1]


def test_token_dtype_and_writer_uint32(tmp_path: Path) -> None:
    assert token_dtype(5000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    path = tmp_path / "train.bin"
    with TokenWriter(path, vocab_size=70_000) as w:
        w.append([0, 65535, 65536, 69_999])
        assert not path.exists()  # only the temp file exists until commit
    assert np.fromfile(path, dtype=np.uint32).tolist() == [0, 65535, 65536, 69_999]
    with pytest.raises(UserError, match="outside"), TokenWriter(tmp_path / "v.bin", 10) as w:
        w.append([3, 10])
    assert not (tmp_path / "v.bin").exists() and not list(tmp_path.glob(".*.tmp"))


def test_long_document_pieces_give_same_bpe_tokens(tmp_path: Path, monkeypatch) -> None:
    text = "".join(f"Line {i} says hello  world.\n\n  indented {i}\n" for i in range(200))
    src = tmp_path / "long.txt"
    src.write_text(text)
    tok_path = tmp_path / "tok"
    prepare([str(src)], tok_path, vocab_size=300, val_tail=0.1, progress=False)
    whole = _ids(tok_path, "train")
    from microtransformer.data import documents, preparation

    monkeypatch.setattr(documents, "CHUNK_CHARS", 100)  # force many pieces
    monkeypatch.setattr(preparation, "BATCH_CHARS", 1000)
    meta = prepare([str(src)], tmp_path / "pieces", val_tail=0.1,
                   tokenizer_path=tok_path / "tokenizer.json", progress=False)
    assert _ids(tmp_path / "pieces", "train") == whole
    assert meta["documents"]["train"] == 1


# ----------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    root = out / "src"
    root.mkdir()
    for i in range(4):
        (root / f"d{i}.txt").write_text(f"document {i}: " + "some words here. " * 60)
    prepare([str(root)], out / "data", tokenizer="char", val_fraction=0.25, progress=False)
    return out / "data"


def test_loader_shapes_and_content(prepared: Path) -> None:
    loader = BatchLoader(prepared, "train", batch_size=3, seq_len=16, seed=1)
    batch = loader.next_batch()
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for v in batch.values():
        assert v.shape == (3, 16) and v.dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert bool((batch["attention_mask"] == 1).all())
    tokens = load_tokens(prepared, "train")
    row = batch["input_ids"][0].numpy()
    starts = [s for s in range(len(tokens) - 15) if np.array_equal(tokens[s:s + 16], row)]
    assert starts  # every row is a real window of the split


def test_loader_seeding_and_resume(prepared: Path) -> None:
    def draw(loader, n):
        return [loader.next_batch()["input_ids"] for _ in range(n)]

    a = draw(BatchLoader(prepared, "train", 4, 8, seed=7), 3)
    b = draw(BatchLoader(prepared, "train", 4, 8, seed=7), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    other_seed = draw(BatchLoader(prepared, "train", 4, 8, seed=8), 1)
    assert not torch.equal(a[0], other_seed[0])
    # resume: a fresh loader restored from the state after 2 batches draws batch 3
    first = BatchLoader(prepared, "train", 4, 8, seed=7)
    draw(first, 2)
    state = first.state_dict()
    torch.save(state, prepared.parent / "state.pt")
    resumed = BatchLoader(prepared, "train", 4, 8, seed=123)
    resumed.load_state_dict(torch.load(prepared.parent / "state.pt", weights_only=True))
    assert torch.equal(resumed.next_batch()["input_ids"], a[2])
    assert resumed.batches_drawn == 3


def test_eval_batches_repeat(prepared: Path) -> None:
    one = [b["input_ids"] for b in iter_eval_batches(prepared, "val", 2, 8, num_batches=3)]
    two = [b["input_ids"] for b in iter_eval_batches(prepared, "val", 2, 8, num_batches=3)]
    assert len(one) == 3 and all(torch.equal(x, y) for x, y in zip(one, two, strict=True))


def test_loader_errors(prepared: Path, tmp_path: Path) -> None:
    n_val = load_meta(prepared)["tokens"]["val"]
    BatchLoader(prepared, "val", 1, n_val - 1)  # exactly seq_len + 1 tokens is enough
    with pytest.raises(UserError, match="shorter than one context window"):
        BatchLoader(prepared, "val", 1, n_val)
    with pytest.raises(FileNotFoundError, match="microtransformer prepare"):
        BatchLoader(tmp_path, "train", 1, 4)
    with pytest.raises(TypeError):  # no per-rank arguments: the loader draws the global batch
        BatchLoader(prepared, "train", 1, 4, rank=1, world_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_on_cuda_matches_cpu(prepared: Path) -> None:
    cpu = BatchLoader(prepared, "train", 4, 8, seed=3)
    gpu = BatchLoader(prepared, "train", 4, 8, seed=3, device="cuda")
    for _ in range(3):
        a, b = cpu.next_batch(), gpu.next_batch()
        assert b["input_ids"].is_cuda and b["labels"].is_cuda and b["attention_mask"].is_cuda
        assert torch.equal(a["input_ids"], b["input_ids"].cpu())
