"""Corpora, their preparation into token files, and the training batch loader.

One module per reason to change:

    sources.py      what a source argument means: files, directories, globs, "stdlib" and the
                    named public datasets (download, sha256 check, cache)
    documents.py    how a file is read as documents (EOS lines, .jsonl records) and scanned
    formatting.py   which training documents get blank lines between paragraphs (pure)
    preparation.py  `prepare`: split, tokenizer, encoding, meta.json
    tokens.py       the on-disk format: train.bin / val.bin (`TokenWriter`, `load_tokens`) and
                    meta.json (`load_meta`)
    loader.py       `BatchLoader` / `iter_eval_batches`: random windows of a prepared split

Every public name is importable from `microtransformer.data` itself.
"""

from microtransformer.data.loader import BatchLoader, derive_seed, iter_eval_batches
from microtransformer.data.preparation import (
    MAX_UNKNOWN,
    META_VERSION,
    TOKENIZER_SAMPLE_CHARS,
    plan_fraction_split,
    plan_tail_split,
    prepare,
)
from microtransformer.data.sources import (
    DATASETS,
    JSONL_SUFFIXES,
    STDLIB_DEFAULT_MAX_BYTES,
    STDLIB_EXCLUDED_DIRS,
    TEXT_SUFFIXES,
    WALK_SUFFIXES,
    Dataset,
    Source,
    cache_dir,
    download_file,
    fetch_dataset,
    file_sha256,
    resolve_sources,
    stdlib_sources,
)
from microtransformer.data.tokens import (
    SPLITS,
    TokenWriter,
    dataset_id,
    load_meta,
    load_tokens,
    token_dtype,
    tokenizer_sha256,
    tokenizer_text_sha256,
    verify_dataset,
)

__all__ = [
    "DATASETS",
    "JSONL_SUFFIXES",
    "MAX_UNKNOWN",
    "META_VERSION",
    "SPLITS",
    "STDLIB_DEFAULT_MAX_BYTES",
    "STDLIB_EXCLUDED_DIRS",
    "TEXT_SUFFIXES",
    "TOKENIZER_SAMPLE_CHARS",
    "WALK_SUFFIXES",
    "BatchLoader",
    "Dataset",
    "Source",
    "TokenWriter",
    "cache_dir",
    "dataset_id",
    "derive_seed",
    "download_file",
    "fetch_dataset",
    "file_sha256",
    "iter_eval_batches",
    "load_meta",
    "load_tokens",
    "plan_fraction_split",
    "plan_tail_split",
    "prepare",
    "resolve_sources",
    "stdlib_sources",
    "token_dtype",
    "tokenizer_sha256",
    "tokenizer_text_sha256",
    "verify_dataset",
]
