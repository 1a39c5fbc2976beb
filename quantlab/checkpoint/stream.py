"""Read a checkpoint one module at a time, as stored: the engine builder's view of a checkpoint.

``open_checkpoint`` reads only the JSON files and the safetensors headers; tensors are read on demand
through ``safe_open`` (memory-mapped), so building an engine from a checkpoint larger than host memory
never holds more than one module's tensors. Nothing here builds a torch model or imports the pipeline.

A quantized Linear comes back as a ``StoredLinear``: its weight as the ``formats.QTensor`` the checkpoint
encodes, and its activation scales exactly as stored (``input_scale``, ``input_global_scale``), so a
kernel reads the same numbers vLLM would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import formats
from ..errors import CheckpointError
from ..recipe.schema import ActivationScheme, KVCacheScheme
from . import schema
from .files import (INDEX_NAME, PROVENANCE_NAME, WEIGHTS_NAME, read_header, read_json, read_quantization_config,
                    recorded_shard_digests, shard_files, verify_shard)

# Every class a quantized module of a causal LM can be matched by in ``config_groups``: only Linears are
# quantized, and compressed-tensors matches class names along the MRO.
_LINEAR_CLASSES = ("Linear", "Module")
# Local tensor names that mark a module as quantized (see docs/checkpoint.md, "Tensors").
_QUANTIZED_MARKERS = ("weight_scale",)


@dataclass(frozen=True)
class StoredLinear:
    """One quantized Linear as the checkpoint stores it.

    Attributes:
        name: module name, e.g. ``model.layers.0.self_attn.q_proj``.
        qweight: the weight's codes and scales (``formats.QTensor``, codes unpacked, shape [out, in]).
        act: the input-activation scheme, or None for weight-only.
        input_scale: static per-tensor activation scale (float32 [1]) for fp8/int8, else None.
        input_global_scale: nvfp4 activations' calibrated global scale (float32 [1]), else None.
        bias: the bias, or None.
    """

    name: str
    qweight: formats.QTensor
    act: ActivationScheme | None
    input_scale: torch.Tensor | None
    input_global_scale: torch.Tensor | None
    bias: torch.Tensor | None


class StoredCheckpoint:
    """A checkpoint directory opened for streaming reads (``open_checkpoint``).

    Attributes:
        path: the directory.
        config: config.json without ``quantization_config`` (the model's shape).
        quantization_config: the validated compressed-tensors block.
        provenance: quantlab.json.
        kv_cache: the FP8 KV-cache scheme, or None.
    """

    def __init__(self, path: Path):
        self.path = path
        config, qcfg = read_quantization_config(path)
        self.config = {k: v for k, v in config.items() if k != "quantization_config"}
        self.quantization_config = qcfg
        self.provenance = read_json(path / PROVENANCE_NAME)
        self.kv_cache: KVCacheScheme | None = schema.kv_scheme(qcfg.get("kv_cache_scheme"))
        self.files = shard_files(path)
        self._file_of: dict[str, Path] = {}
        for f in self.files:
            for key in read_header(f):
                self._file_of[key] = f
        self._groups = qcfg["config_groups"]
        self._ignore = qcfg.get("ignore") or []

    def verify(self) -> None:
        """Check every shard against the SHA-256 quantlab.json records; CheckpointError naming the first
        shard that differs. Reads each shard once: call it where the whole checkpoint is read anyway."""
        digests = recorded_shard_digests(self.provenance)
        for f in self.files:
            verify_shard(f, digests.get(f.name))

    def names(self) -> list[str]:
        """Every stored tensor name, sorted."""
        return sorted(self._file_of)

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor, read from its shard; CheckpointError naming it if absent."""
        from safetensors import safe_open

        f = self._file_of.get(name)
        if f is None:
            raise CheckpointError(f"{self.path}: the checkpoint has no tensor {name}")
        try:
            with safe_open(str(f), framework="pt") as sf:
                return sf.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for a corrupt file
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{f} is not a readable safetensors file ({first})") from None

    def module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """Every tensor directly under ``module`` (``module.<local>``), by local name."""
        prefix = f"{module}."
        return {k[len(prefix):]: self.tensor(k) for k in self._file_of
                if k.startswith(prefix) and "." not in k[len(prefix):]}

    def quantized_modules(self) -> dict[str, str]:
        """Quantized module name -> its ``config_groups`` key, resolved as compressed-tensors does."""
        modules = sorted({k.rpartition(".")[0] for k in self._file_of if k.rpartition(".")[2] in _QUANTIZED_MARKERS})
        out = {}
        for name in modules:
            key = schema.resolve(name, _LINEAR_CLASSES, self._groups, self._ignore)
            if key is None:
                raise CheckpointError(f"{self.path}: {name} stores quantized tensors but no config group covers it")
            out[name] = key
        return out

    def linear(self, name: str) -> StoredLinear:
        """The quantized Linear ``name`` (a key of ``quantized_modules()``)."""
        key = schema.resolve(name, _LINEAR_CLASSES, self._groups, self._ignore)
        if key is None:
            raise CheckpointError(f"{self.path}: {name} is not a quantized module")
        local = self.module_tensors(name)
        scheme = self._groups[key]
        qweight = schema.decompress_weight(name, local, scheme)
        act = schema.activation_scheme(scheme.get("input_activations"))
        scales = {k: local[k].float().reshape(1) if k in local else None for k in ("input_scale", "input_global_scale")}
        if act is not None and not act.dynamic and act.granularity == "tensor" and scales["input_scale"] is None:
            raise CheckpointError(f"{self.path}: {name} has static {act.format} activations but no input_scale")
        return StoredLinear(name, qweight, act, scales["input_scale"], scales["input_global_scale"], local.get("bias"))

    def kv_scales(self, attention: str) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (k_scale, v_scale) of an attention module (``model.layers.N.self_attn``), flattened:
        [1] per tensor, [kv_heads] per head."""
        if self.kv_cache is None:
            raise CheckpointError(f"{self.path} has no FP8 KV-cache scheme")
        local = self.module_tensors(attention)
        if "k_scale" not in local or "v_scale" not in local:
            raise CheckpointError(f"{self.path}: the KV cache is quantized but {attention} has no k_scale/v_scale")
        return local["k_scale"].float().reshape(-1), local["v_scale"].float().reshape(-1)


def is_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a compressed-tensors config.json and safetensors weights."""
    path = Path(path)
    if not (path / "config.json").is_file() or not ((path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file()):
        return False
    try:
        return isinstance(read_json(path / "config.json").get("quantization_config"), dict)
    except CheckpointError:
        return False


def open_checkpoint(path: str | Path) -> StoredCheckpoint:
    """Open a quantlab checkpoint for streaming reads; CheckpointError naming what is missing or corrupt."""
    return StoredCheckpoint(Path(path))
