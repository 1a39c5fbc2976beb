"""The original model's results kept on disk, so evaluating several checkpoints of one model runs the
original once: its next-token log-probs over the evaluation windows, and its lm-eval task scores.

An entry is keyed by everything its numbers depend on: the digest of the original model directory's
files (``quantlab.checkpoint.digest``), the evaluation tokens' digest, the window settings and batch
size, the device type, and the torch / transformers / lm-eval versions. A hit gives the same numbers
the original would compute in this process (a test compares them). A model named by hub id, with no
local directory to digest, is never cached. Entries live under ``<quantlab cache>/eval`` (about
4 bytes x vocabulary per scored token: ~0.5 GB for the default model and settings); deleting the
directory is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from quantlab.checkpoint.digest import checkpoint_digest

from .perplexity import Reference


def cache_root() -> Path:
    """``<quantlab cache>/eval`` (``quantlab.models.cache_dir``)."""
    from quantlab.models import cache_dir

    return cache_dir() / "eval"


def model_fingerprint(model_dir: str | Path) -> str | None:
    """Digest of a model directory's files, or None when ``model_dir`` is not a directory (a hub id)."""
    p = Path(model_dir)
    return checkpoint_digest(p) if p.is_dir() else None


def entry_key(kind: str, **fields) -> str:
    """A cache file stem: ``kind`` plus the sha256 of the sorted fields and the library versions."""
    import importlib.metadata

    import transformers

    try:
        lm_eval_version = importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        lm_eval_version = None
    fields = {**fields, "torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval_version}
    return f"{kind}-" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _write_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StoredLogProbs(Reference):
    """The original's log-probs in ``path`` (a safetensors file holding ``logp`` [num_rows, vocab]):
    read from it when it is there and complete, else collected from the run and written by ``save``."""

    def __init__(self, path: Path, num_rows: int):
        self.path, self.num_rows = path, num_rows
        self._slice, self._fresh = None, {}
        if path.is_file():
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), "pt")
                stored = handle.get_slice("logp")
                if stored.get_shape()[0] == num_rows:
                    self._handle, self._slice = handle, stored
            except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed and replaced
                self._slice = None

    @property
    def hit(self) -> bool:
        """Whether the original's log-probs are read from disk (the original model need not run)."""
        return self._slice is not None

    def rows(self, start: int, stop: int) -> torch.Tensor | None:
        return None if self._slice is None else self._slice[start:stop]

    def put(self, start: int, logp: torch.Tensor) -> None:
        if self._slice is None:
            self._fresh[start] = logp.clone()

    def save(self) -> None:
        """Write the collected rows (all of them, or nothing) as a new cache entry."""
        if self.hit or sum(len(t) for t in self._fresh.values()) != self.num_rows:
            return
        from safetensors.torch import save_file

        logp = torch.cat([self._fresh[k] for k in sorted(self._fresh)]).contiguous()
        _write_atomically(self.path, lambda tmp: save_file({"logp": logp}, tmp))
        self._fresh = {}


def load_json(path: Path) -> dict | None:
    """A cached JSON entry, or None when missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save_json(path: Path, data: dict) -> None:
    """Write a JSON cache entry atomically."""
    _write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))
