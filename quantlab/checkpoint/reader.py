"""Load a quantlab checkpoint back as a fake-quant model whose outputs equal the calibrated model's.

The model is built from config.json (without its quantization_config) by transformers; tensors are read
through ``stream.open_checkpoint`` (safetensors, never pickle) one module at a time. Each quantized Linear
becomes a ``QuantLinear`` holding its stored codes and scales as they are, and each FP8 KV-cache state its
stored ``k_scale``/``v_scale``: the model computes with exactly the numbers the checkpoint holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..fake_quant import KVCacheQuant, QuantLinear, enable_kv_quant
from . import schema
# shard_files is re-exported: evaluation sizes a checkpoint by its shards.
from .files import shard_files  # noqa: F401
from .stream import StoredCheckpoint, open_checkpoint


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


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


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, object, dict]:
    """Load a checkpoint as (fake-quant model in eval mode, tokenizer, quantlab.json).

    Tensors are read one module at a time through ``stream.open_checkpoint`` and copied into the model,
    so host memory holds the model and one module's stored tensors, never a whole shard besides.

    Args:
        path: the checkpoint directory.
        dtype: compute dtype of the rebuilt model (plain tensors are cast to it, quantized weights are
            dequantized to it).
        device: where the model ends up.

    Raises:
        CheckpointError: a missing, corrupt or changed file (named), or tensors that do not fit the config.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    ckpt = open_checkpoint(path)
    ckpt.verify()  # every tensor is read below, so each shard's bytes are checked first
    qcfg = ckpt.quantization_config
    model = build_model(path, dtype)
    stored_modules = {k.rpartition(".")[0] for k in ckpt.names()}

    replaced = set()
    for name in assign_groups(model, qcfg):
        if name not in stored_modules:
            raise CheckpointError(f"{path}: the quantized module {name} has no tensors")
        stored = ckpt.linear(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(stored.qweight, stored.bias, stored.act, dtype, stored.input_scale,
                                           stored.input_global_scale))
        replaced.add(name)

    kv_owners = []
    if ckpt.kv_cache is not None:
        enable_kv_quant(model, ckpt.kv_cache)
        for name, module in model.named_modules():
            if isinstance(getattr(module, "kv_quant", None), KVCacheQuant):
                module.kv_quant.k_scale, module.kv_quant.v_scale = ckpt.kv_scales(name)
                kv_owners.append(name)

    owned = [f"{n}." for n in replaced] + [f"{n}.{s}" for n in kv_owners for s in ("k_scale", "v_scale")]
    _copy_plain_tensors(ckpt, model, skip=tuple(owned))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} has no loadable tokenizer ({_first_line(e)})") from None
    return model.to(device).eval(), tokenizer, ckpt.provenance


def _copy_plain_tensors(ckpt: StoredCheckpoint, model: nn.Module, skip: tuple[str, ...]) -> None:
    """Copy every stored tensor not named by ``skip`` (prefixes) into the model's parameter or buffer of
    that name, one tensor at a time; CheckpointError on missing, unexpected or misshapen tensors."""
    state = {k: t for k, t in model.state_dict(keep_vars=True).items() if not k.startswith(skip)}
    loaded, unexpected = set(), []
    for key in ckpt.names():
        if key.startswith(skip):
            continue
        target = state.get(key)
        if target is None:
            unexpected.append(key)
            continue
        t = ckpt.tensor(key)
        if t.shape != target.shape:
            raise CheckpointError(f"{ckpt.path}: {key} has shape {tuple(t.shape)}, the model needs {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(t)
        loaded.add(id(target))
    missing = [k for k, t in state.items() if id(t) not in loaded]  # a tied tensor counts once loaded
    if missing or unexpected:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has unexpected tensors {', '.join(unexpected[:3])}"
        raise CheckpointError(f"{ckpt.path}: the checkpoint {what}")
