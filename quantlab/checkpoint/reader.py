"""Load a quantlab checkpoint back as a fake-quant model whose outputs equal the calibrated model's.

The model is built from config.json (without its quantization_config) by transformers, the plain tensors
are read with safetensors (never pickle), each quantized Linear is rebuilt as a ``QuantLinear`` from its
compressed tensors through ``schema.decompress_linear``, and FP8 KV-cache states get k/v ranges that
reproduce the stored ``k_scale``/``v_scale`` exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..fake_quant import KVCacheQuant, QuantLinear, enable_kv_quant
from . import schema

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


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


def read_quantization_config(path: Path) -> tuple[dict, dict]:
    """(config.json as a dict, its validated quantization_config)."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
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


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the shards; CheckpointError naming a file that safetensors cannot read."""
    from safetensors import safe_open

    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    tensors[key] = sf.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{f} is not a readable safetensors file ({_first_line(e)})") from None
    return tensors


def build_model(path: Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """The float model described by config.json (quantization_config removed), untrained weights.

    ``device="meta"`` gives a shape-only model (used by ``inspect``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        where = path / "config.json"
        raise CheckpointError(f"{where} does not describe a transformers model ({_first_line(e)})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def assign_groups(model: nn.Module, qcfg: dict) -> dict[str, str]:
    """Quantized module name -> its ``config_groups`` key, resolved as compressed-tensors does."""
    groups, ignore = qcfg["config_groups"], qcfg.get("ignore") or []
    out = {}
    for name, module in model.named_modules():
        key = schema.resolve(name, schema.class_names(module), groups, ignore)
        if key is not None and isinstance(module, nn.Linear):
            out[name] = key
    return out


def _by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, local = key.rpartition(".")
        grouped.setdefault(module, {})[local] = t
    return grouped


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, object, dict]:
    """Load a checkpoint as (fake-quant model in eval mode, tokenizer, quantlab.json).

    Args:
        path: the checkpoint directory.
        dtype: compute dtype of the rebuilt model (plain tensors are cast to it, quantized weights are
            dequantized to it).
        device: where the model ends up.

    Raises:
        CheckpointError: a missing or corrupt file (named), or tensors that do not fit the config.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    _, qcfg = read_quantization_config(path)
    provenance = read_json(path / "quantlab.json")
    by_module = _by_module(read_tensors(shard_files(path)))
    model = build_model(path, dtype)

    replaced = set()
    for name, key in assign_groups(model, qcfg).items():
        local = by_module.pop(name, None)
        if local is None:
            raise CheckpointError(f"{path}: the quantized module {name} has no tensors")
        qweight, act, input_amax = schema.decompress_linear(name, local, qcfg["config_groups"][key])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(qweight, local.get("bias"), act, input_amax, dtype))
        replaced.add(name)

    kv = schema.kv_scheme(qcfg.get("kv_cache_scheme"))
    if kv is not None:
        enable_kv_quant(model, kv)
        for name, module in model.named_modules():
            if isinstance(getattr(module, "kv_quant", None), KVCacheQuant):
                local = by_module.get(name, {})
                if "k_scale" not in local or "v_scale" not in local:
                    raise CheckpointError(f"{path}: the KV cache is quantized but {name} has no k_scale/v_scale")
                schema.load_kv_state(module.kv_quant, {k: local.pop(k) for k in ("k_scale", "v_scale")})

    plain = {f"{m}.{k}" if m else k: t for m, local in by_module.items() for k, t in local.items()}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    kv_owners = [n for n, m in model.named_modules() if hasattr(m, "kv_quant")]
    owned = tuple(f"{n}." for n in replaced) + tuple(f"{n}.kv_quant." for n in kv_owners)
    loaded = {id(p) for k, p in model.named_parameters(remove_duplicate=False) if k in plain}
    tied = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in loaded}
    missing = [k for k in missing if not k.startswith(owned) and k not in tied]
    if missing or unexpected:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has unexpected tensors {', '.join(unexpected[:3])}"
        raise CheckpointError(f"{path}: the checkpoint {what}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} has no loadable tokenizer ({_first_line(e)})") from None
    return model.to(device).eval(), tokenizer, provenance
