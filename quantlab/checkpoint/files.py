"""The files of a checkpoint directory, checked before any tensor is trusted.

Every reader (the fake-quant loader, the streaming reader the engine builds from, ``inspect``) finds its
JSON files, shards and safetensors headers here, so a damaged or wrong input is reported the same way
everywhere: one sentence naming the file. A safetensors header is parsed here, not by trusting its 8-byte
length (a corrupted length once made ``inspect`` allocate exabytes); a shard's bytes are checked against
the SHA-256 the writer recorded in quantlab.json (``shards``) wherever a whole shard is read anyway.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import CheckpointError
from . import schema
from .digest import file_sha256

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PROVENANCE_NAME = "quantlab.json"
# safetensors' own ceiling on a header (100 MB); a longer claimed length is corruption, not a big model.
MAX_HEADER_BYTES = 100_000_000


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file if it is missing or not JSON."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def check_directory(path: Path) -> None:
    """CheckpointError unless ``path`` is a directory (a file is named as not being a checkpoint)."""
    if path.is_dir():
        return
    if path.exists():
        raise CheckpointError(f"{path} is not a checkpoint directory (a checkpoint is a directory "
                              f"holding config.json, {WEIGHTS_NAME} and {PROVENANCE_NAME})")
    raise CheckpointError(f"checkpoint directory {path} does not exist")


def read_quantization_config(path: Path) -> tuple[dict, dict]:
    """(config.json as a dict, its validated quantization_config)."""
    check_directory(path)
    config = read_json(path / "config.json")
    qcfg = config.get("quantization_config")
    schema.check_config(qcfg, str(path / "config.json"))
    return config, qcfg


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or every file the index names."""
    if (path / INDEX_NAME).is_file():
        index = read_json(path / INDEX_NAME)
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise CheckpointError(f"{path / INDEX_NAME} names no files")
        files = [path / n for n in names]
    else:
        files = [path / WEIGHTS_NAME]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
    return files


def read_header(file: Path) -> dict[str, dict]:
    """A safetensors file's tensor entries (``dtype``, ``shape``, ``data_offsets``) by name, checked
    against the file's size; CheckpointError with one sentence naming the file otherwise."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{file} is not a readable safetensors file ({why})")

    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise bad(f"it has {size} bytes, fewer than the 8 of a header length")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"its header length field says {n} bytes but the file has {size}: the file is damaged")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise bad("a header entry has no data_offsets") from None
    if size < 8 + n + end:
        raise bad(f"it is truncated: {size} bytes, its header needs {8 + n + end}")
    return header


def recorded_shard_digests(provenance: dict) -> dict[str, str]:
    """Shard file name -> SHA-256 as quantlab.json records it (empty for checkpoints written before
    quantlab recorded them)."""
    shards = provenance.get("shards")
    return shards if isinstance(shards, dict) else {}


def verify_shard(file: Path, expected: str | None) -> None:
    """CheckpointError naming ``file`` when its SHA-256 differs from ``expected`` (None: not recorded)."""
    if expected is not None and file_sha256(file) != expected:
        raise CheckpointError(f"{file} does not match the SHA-256 recorded in {file.parent / PROVENANCE_NAME}: "
                              "the file is damaged or was changed after it was written")
