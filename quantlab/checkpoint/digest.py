"""Content digests: one file's SHA-256, many files' concurrently, and a checkpoint's digest over all its
top-level files.

The checkpoint digest is what ``quantlab eval`` records in its report and what ``quantlab build`` checks
before promoting a checkpoint to an engine: any changed byte in any file of the checkpoint (tensors,
config, tokenizer, quantlab.json) changes it. Subdirectories are left out, because evaluation writes its
report into ``<checkpoint>/eval/``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Measured on the 2-core CPU machine (SHA-NI, a 1 GiB file in the page cache): chunks of 256 KiB to 4 MiB
# hash alike, 8 MiB slightly slower and 16 MiB markedly so (a chunk that no longer fits the CPU cache is
# read from memory twice: once by the copy out of the page cache, once by the hash).
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_sha256(paths: Iterable[str | Path]) -> list[str]:
    """``file_sha256`` of each path, in order, one thread per file up to the CPU count.

    Threads run in parallel here: file reads and hashlib's update of a large buffer release the GIL. One
    file's SHA-256 is sequential, so the speed-up is bounded by the largest file (hence sharded weights).
    """
    paths = list(paths)
    workers = min(len(paths), os.cpu_count() or 1)
    if workers <= 1:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(workers, thread_name_prefix="sha256") as pool:
        return list(pool.map(file_sha256, paths))


def checkpoint_digest(path: str | Path) -> str:
    """Hex SHA-256 over the sorted ``name sha256`` lines of every top-level file of the directory."""
    files = [f for f in sorted(Path(path).iterdir()) if f.is_file()]
    lines = [f"{f.name} {digest}\n" for f, digest in zip(files, files_sha256(files))]
    return hashlib.sha256("".join(lines).encode()).hexdigest()
