"""Write a calibrated model as a compressed-tensors checkpoint directory, atomically.

The directory holds safetensors shards (``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
plus ``model.safetensors.index.json`` past the shard size), ``config.json`` with ``quantization_config``,
the tokenizer files and ``quantlab.json`` (provenance). docs/checkpoint.md is the contract.

Nothing incomplete ever sits at the output path: everything is written into a temporary directory next
to it (same filesystem), fsynced, and renamed into place. An existing output is replaced only when asked,
and only once the new checkpoint is complete. Tensors are compressed module by module while walking the
model and written one shard at a time, so at most one shard exists in memory besides the model.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .. import __version__, atomic
from ..errors import CheckpointError
from ..fake_quant import KVCacheQuant, QuantLinear
from ..recipe.schema import Recipe
from ..result import CalibrationResult
from . import schema
from .digest import file_sha256
from .files import INDEX_NAME, PROVENANCE_NAME, WEIGHTS_NAME

DEFAULT_SHARD_BYTES = 2 * 2**30
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WriteSummary:
    """What ``write_checkpoint`` wrote.

    Attributes:
        path: the checkpoint directory.
        files: file names in it.
        bytes: bytes of tensor data over all shards.
        num_shards: number of safetensors files.
        num_quantized: number of quantized Linears.
    """

    path: Path
    files: tuple[str, ...]
    bytes: int
    num_shards: int
    num_quantized: int


def check_output(output: str | Path, overwrite: bool) -> Path:
    """The output path, refused if it exists and ``overwrite`` is off (checked before calibrating, too)."""
    return atomic.check_output(output, overwrite, error=CheckpointError)


def _plan(model: nn.Module, recipe: Recipe, result: CalibrationResult) -> tuple[dict, int]:
    """quantization_config for the model as calibrated, and the number of quantized Linears."""
    modules, group_of, ignore = [], {}, []
    for name, module in model.named_modules():
        modules.append((name, schema.class_names(module)))
        if isinstance(module, QuantLinear):
            group = result.schemes.get(name)
            if group is None or group.weights.format != module.qweight.fmt:
                raise CheckpointError(f"{name} is quantized as {module.qweight.fmt}, "
                                      f"but the calibration result gives it no scheme group of {recipe.path} in that format")
            group_of[name] = group
        elif isinstance(module, nn.Linear):
            ignore.append(name)
    # Groups that quantized something, in recipe order (compressed-tensors' group names are positional).
    groups = [g for g in recipe.schemes if any(g is used for used in group_of.values())]
    assigned = {name: next(i for i, g in enumerate(groups) if g is group) for name, group in group_of.items()}
    targets = schema.config_targets(modules, assigned, groups, ignore)
    return schema.quantization_config(list(zip(groups, targets)), ignore, recipe.kv_cache), len(assigned)


def _config_dict(model: nn.Module, export: str, qcfg: dict) -> dict:
    d = model.config.to_diff_dict()
    d["architectures"] = [type(model).__name__]
    d["dtype"] = export
    if isinstance(model.get_output_embeddings(), QuantLinear):
        d["tie_word_embeddings"] = False  # a quantized lm_head is no longer the embedding matrix
    d["quantization_config"] = qcfg
    return d


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _provenance(model: nn.Module, recipe: Recipe, calib, result: CalibrationResult) -> dict:
    # transformers records the directory a model was loaded from; quantlab.models resolved it.
    resolved = getattr(model, "name_or_path", None) or None
    return {
        "quantlab_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),
        "compressed_tensors_version": _version("compressed-tensors"),
        "recipe": {"path": recipe.path, "sha256": recipe.sha256, "text": recipe.text},
        "model": {"name": recipe.model, "path": resolved},
        "calibration": {"source": calib.source, "digest": calib.digest, "num_samples": int(calib.input_ids.shape[0]),
                        "seq_len": int(calib.input_ids.shape[1]), "seed": recipe.calibration.seed},
        "layers": [{"name": s.name, "rel_mse": s.rel_mse, "seconds": s.seconds, "peak_mem_mib": s.peak_mem_mib}
                   for s in result.layers],
        "calibration_seconds": result.seconds,
        "peak_mem_mib": result.peak_mem_mib,
        "notes": list(result.notes),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _module_tensors(name: str, module: nn.Module, dtype: torch.dtype, seen: set[int]) -> dict[str, torch.Tensor]:
    """One module's own tensors as stored: compressed for a QuantLinear, else cast to the export dtype.

    A tensor already written under another name (tied embeddings) is skipped, as save_pretrained does.
    """
    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        return (t.to(dtype) if t.is_floating_point() else t).contiguous()

    if isinstance(module, KVCacheQuant):
        return {}  # stored on the attention module as k_scale / v_scale
    if isinstance(module, QuantLinear):
        out = schema.compress_linear(name, module)
        if module.bias is not None:
            out["bias"] = cast(module.bias)
        return out
    out = {}
    for local, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if local in module._non_persistent_buffers_set or id(t) in seen:
            continue
        seen.add(id(t))
        out[local] = cast(t)
    kv = getattr(module, "kv_quant", None)
    if isinstance(kv, KVCacheQuant):
        out.update(schema.kv_tensors(kv))
    return out


def _write_tensors(model: nn.Module, dtype: torch.dtype, tmp: Path, max_shard_bytes: int) -> tuple[list[str], int]:
    """Stream the model into shards under ``tmp``; returns (file names, tensor bytes)."""
    parts: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        path = tmp / f".part-{len(parts) + 1:05d}.safetensors"
        safetensors.torch.save_file(shard, str(path), metadata={"format": "pt"})
        parts.append((path, list(shard)))

    seen: set[int] = set()
    for name, module in model.named_modules():
        tensors = {f"{name}.{k}" if name else k: v for k, v in _module_tensors(name, module, dtype, seen).items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if shard and size + nbytes > max_shard_bytes:  # a module's tensors stay in one shard
            flush()
            shard, size = {}, 0
        shard.update(tensors)
        size, total = size + nbytes, total + nbytes
    flush()
    if len(parts) == 1:
        parts[0][0].rename(tmp / WEIGHTS_NAME)
        return [WEIGHTS_NAME], total
    names, weight_map = [], {}
    for i, (path, keys) in enumerate(parts, 1):
        names.append(f"model-{i:05d}-of-{len(parts):05d}.safetensors")
        path.rename(tmp / names[-1])
        weight_map.update(dict.fromkeys(keys, names[-1]))
    _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, INDEX_NAME], total


def _write_json(path: Path, data: dict, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_checkpoint(model: nn.Module, tokenizer, recipe: Recipe, calib, result: CalibrationResult,
                     output: str | Path, overwrite: bool = False, *,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> WriteSummary:
    """Write the calibrated ``model`` (its targeted Linears are QuantLinears) as a checkpoint at ``output``.

    Args:
        model: the model ``pipeline.calibrate`` quantized in place.
        tokenizer: its tokenizer (saved alongside).
        recipe, calib, result: what made it, recorded in quantlab.json (``calib`` is a
            ``quantlab.data.CalibrationSet``: its source, digest and shape are read).
        output: the checkpoint directory to create.
        overwrite: replace an existing ``output`` (only after the new checkpoint is complete).
        max_shard_bytes: start a new safetensors shard past this many bytes of tensors.

    Raises:
        CheckpointError: ``output`` exists without ``overwrite``, or the model holds something
            compressed-tensors cannot express (e.g. fp8_e5m2).
    """
    out = check_output(output, overwrite)
    qcfg, num_quantized = _plan(model, recipe, result)
    config = _config_dict(model, recipe.export_dtype, qcfg)
    provenance = _provenance(model, recipe, calib, result)
    with atomic.atomic_directory(out, overwrite, error=CheckpointError) as tmp:
        shards, nbytes = _write_tensors(model, EXPORT_DTYPES[recipe.export_dtype], tmp, max_shard_bytes)
        # Readers that read a whole shard check it against this (files.verify_shard).
        provenance["shards"] = {s: file_sha256(tmp / s) for s in shards if s.endswith(".safetensors")}
        tokenizer.save_pretrained(tmp)
        _write_json(tmp / "config.json", config, sort_keys=True)  # as save_pretrained writes it
        _write_json(tmp / PROVENANCE_NAME, provenance)
        files = tuple(sorted(p.name for p in tmp.iterdir()))
    return WriteSummary(out, files, nbytes, len([s for s in shards if s.endswith(".safetensors")]), num_quantized)
