"""A checkpoint's digest changes with any byte of any top-level file and ignores subdirectories; hashing
many files at once gives each file its own SHA-256, in order, and hashes them in parallel threads."""

import hashlib
import os
import threading

from quantlab.checkpoint import digest
from quantlab.checkpoint.digest import checkpoint_digest, file_sha256, files_sha256


def test_digest_changes_with_one_flipped_byte_and_ignores_subdirectories(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "config.json").write_text("{}")
    before = checkpoint_digest(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text("{}")
    assert checkpoint_digest(tmp_path) == before
    (tmp_path / "a.bin").write_bytes(b"\x00" * 99 + b"\x01")
    assert checkpoint_digest(tmp_path) != before


def test_file_sha256_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_files_sha256_gives_each_file_its_own_digest_in_order(tmp_path):
    sizes = [0, 1, 3 << 20, 5, (1 << 20) + 7] * 3  # more files than CPUs here; empty and multi-chunk files
    blobs = [os.urandom(n) for n in sizes]
    paths = []
    for i, blob in enumerate(blobs):
        paths.append(tmp_path / f"f{i:02d}")
        paths[-1].write_bytes(blob)
    assert files_sha256(paths) == [hashlib.sha256(b).hexdigest() for b in blobs]
    assert files_sha256([]) == []


def test_files_are_hashed_concurrently(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    both_running = threading.Barrier(2, timeout=10)  # broken (an error) unless two files hash at once

    def hash_in_step_with_the_other(path):
        both_running.wait()
        return path.name

    monkeypatch.setattr(digest, "file_sha256", hash_in_step_with_the_other)
    assert files_sha256([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
