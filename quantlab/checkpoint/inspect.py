"""What a checkpoint holds and how much it saves: per quantized module, its format and scheme and the
bytes of its stored tensors against the BF16 size of the weight it replaces; totals for the quantized
Linear weights and for the whole checkpoint against an all-BF16 copy of the model.

Sizes come from the safetensors headers (no tensor is loaded); the BF16 baseline comes from the model
that config.json describes, built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import schema
from .files import read_header, read_quantization_config, shard_files
from .reader import assign_groups, build_model

BF16_BYTES = 2


@dataclass(frozen=True)
class ModuleEntry:
    """One quantized Linear.

    Attributes:
        name: module name.
        format: quantlab format of its weight.
        scheme: granularity and activation scheme, e.g. ``group 64 asym``.
        stored_bytes: bytes of its stored tensors (codes, scales, zero points, global scales, shapes,
            input scales; not the bias).
        bf16_bytes: bytes of its weight in BF16.
    """

    name: str
    format: str
    scheme: str
    stored_bytes: int
    bf16_bytes: int

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.bf16_bytes


@dataclass(frozen=True)
class InspectReport:
    """A checkpoint's sizes. ``quantized_*`` cover the quantized Linears; ``total_*`` every tensor
    (tied tensors once), against every tensor of the model in BF16."""

    path: Path
    format: str
    modules: tuple[ModuleEntry, ...]
    quantized_stored: int
    quantized_bf16: int
    total_stored: int
    total_bf16: int
    kv_cache: str | None

    @property
    def quantized_ratio(self) -> float:
        return self.quantized_stored / max(self.quantized_bf16, 1)

    @property
    def total_ratio(self) -> float:
        return self.total_stored / max(self.total_bf16, 1)


def tensor_bytes(file: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, read from its checked header."""
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in read_header(file).items()}


def inspect_checkpoint(path: str | Path) -> InspectReport:
    """Sizes and ratios of the checkpoint at ``path``; CheckpointError if a file is missing or corrupt."""
    path = Path(path)
    _, qcfg = read_quantization_config(path)
    sizes: dict[str, int] = {}
    for f in shard_files(path):
        sizes.update(tensor_bytes(f))
    model = build_model(path, torch.bfloat16, device="meta")
    modules = []
    for name, key in assign_groups(model, qcfg).items():
        scheme = qcfg["config_groups"][key]
        stored = sum(b for k, b in sizes.items() if k.startswith(f"{name}.") and k != f"{name}.bias")
        weight = model.get_submodule(name).weight
        modules.append(ModuleEntry(name, schema.weight_format(scheme["weights"]), schema.describe(scheme), stored,
                                   weight.numel() * BF16_BYTES))
    keys = set(model.state_dict())
    tensors = [*model.named_parameters(), *model.named_buffers()]  # tied tensors appear once
    total_bf16 = sum(t.numel() * BF16_BYTES for n, t in tensors if n in keys)
    kv = schema.kv_scheme(qcfg.get("kv_cache_scheme"))
    return InspectReport(
        path=path, format=qcfg.get("format", "?"), modules=tuple(modules),
        quantized_stored=sum(m.stored_bytes for m in modules), quantized_bf16=sum(m.bf16_bytes for m in modules),
        total_stored=sum(sizes.values()), total_bf16=total_bf16,
        kv_cache=None if kv is None else f"{kv.format} per {kv.granularity}",
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_report(report: InspectReport) -> str:
    """A plain-text table of ``report`` (one line per quantized module, then totals)."""
    width = max([len(m.name) for m in report.modules] + [6])
    lines = [f"{report.path}  (format {report.format})", "",
             f"{'module':<{width}}  {'format':<10} {'scheme':<36} {'stored':>10} {'bf16':>10} {'ratio':>6}"]
    for m in report.modules:
        lines.append(f"{m.name:<{width}}  {m.format:<10} {m.scheme:<36} {m.stored_bytes:>10} {m.bf16_bytes:>10} "
                     f"{m.ratio:>6.3f}")
    lines += ["",
              f"quantized linear weights: {_mib(report.quantized_stored)} vs {_mib(report.quantized_bf16)} BF16 "
              f"(ratio {report.quantized_ratio:.3f}, {len(report.modules)} modules)",
              f"whole checkpoint: {_mib(report.total_stored)} vs {_mib(report.total_bf16)} all-BF16 "
              f"(ratio {report.total_ratio:.3f})",
              f"kv cache: {report.kv_cache or 'not quantized'}"]
    return "\n".join(lines)
