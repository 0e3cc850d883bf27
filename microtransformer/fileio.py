"""Atomic file writes for the whole toolkit: one writer, one behaviour.

The implementation is `model.io`'s (the bottom of the project: the network writes its own
config and weights with it, and `model/` may not import the toolkit). Every file the toolkit
writes goes through these names: a temp file in the target's directory, fsynced, mode 0644,
`os.replace`d over the target, the directory fsynced; a failed write raises `WriteError`, one
line naming the file, the reason and the fix, with the previous version left untouched.

    atomic_write(path)             context manager yielding a binary file (streamed writes)
    AtomicFile(path)               the same with explicit .commit() / .abort()
    atomic_write_bytes(path, data)
    atomic_write_json(path, obj, sort_keys=False)
    remove_stale_temp_files(dir)   temp files a crash left behind (`.NAME.XXXX.tmp`)
"""

from __future__ import annotations

from model.io import (
    TMP_SUFFIX,
    AtomicFile,
    WriteError,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    remove_stale_temp_files,
    write_error,
)

__all__ = [
    "TMP_SUFFIX",
    "AtomicFile",
    "WriteError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "fsync_dir",
    "remove_stale_temp_files",
    "write_error",
]
