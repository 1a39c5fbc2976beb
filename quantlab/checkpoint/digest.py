"""Content digests: one file's SHA-256, and a checkpoint's digest over all its top-level files.

The checkpoint digest is what ``quantlab eval`` records in its report and what ``quantlab build`` checks
before promoting a checkpoint to an engine: any changed byte in any file of the checkpoint (tensors,
config, tokenizer, quantlab.json) changes it. Subdirectories are left out, because evaluation writes its
report into ``<checkpoint>/eval/``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_digest(path: str | Path) -> str:
    """Hex SHA-256 over the sorted ``name sha256`` lines of every top-level file of the directory."""
    path = Path(path)
    lines = [f"{f.name} {file_sha256(f)}\n" for f in sorted(path.iterdir()) if f.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()
