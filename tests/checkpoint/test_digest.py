"""A checkpoint's digest changes with any byte of any top-level file and ignores subdirectories."""

from quantlab.checkpoint.digest import checkpoint_digest, file_sha256


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
    import hashlib

    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
