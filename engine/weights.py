"""Read an engine's safetensors shards without recomputing or copying anything that need not be copied.

On the CPU each tensor is a view of the memory-mapped file (copy-on-write mapping, so the file is never
modified and pages are read on first touch). On CUDA, safetensors reads each tensor from its mapping
straight into device memory. Either way load is reading ready tensors: the builder did the work.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from .config import EngineError

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def shard_paths(directory: Path) -> list[Path]:
    shards = sorted(directory.glob("weights*.safetensors"))
    if not shards:
        raise EngineError(f"{directory} holds no weights*.safetensors; rebuild the engine")
    return shards


def _mmap_file(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    (header_len,) = struct.unpack("<Q", mm[:8])
    header = json.loads(mm[8:8 + header_len])
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start) if count else torch.empty(0, dtype=dtype)
        out[name] = t.view(info["shape"])
    return out


def load_weights(directory: Path, device: str) -> dict[str, torch.Tensor]:
    """Every tensor of the engine, on ``device`` (``cpu``: memory-mapped views; ``cuda``: device copies)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in shard_paths(directory):
        if device == "cpu":
            tensors.update(_mmap_file(path))
            continue
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors
