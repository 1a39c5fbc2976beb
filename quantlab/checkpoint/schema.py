"""The checkpoint contract: quantlab schemes and tensors <-> compressed-tensors config and tensors.

This is the only module that knows compressed-tensors' vocabulary (format strings, QuantizationArgs keys,
tensor suffixes); docs/checkpoint.md states the same contract in prose. Both directions live here, so the
writer and the reader cannot disagree: ``compress_linear`` turns a ``QuantLinear`` into its stored
tensors and ``decompress_weight`` turns them back into the identical ``QTensor``. A module holds its
scales as the checkpoint stores them, so both directions are plain translations: no scale is derived
from a range on writing, and no range searched for on reading.

Matching follows compressed-tensors 0.20 (``utils/match.py``, ``lifecycle/apply.py``): a target is an
exact module name, ``re:<regex>`` (``re.match``, a prefix match) or a class name anywhere in the module's
MRO, and a module that several targets match takes the most specific one (exact name, then regex, then
class). quantlab's own matching is first-match with full-match regexes and last-component names, so
``config_targets`` writes the recipe's targets as given only when every module is claimed by exactly one
group under compressed-tensors' rules and that claim is the one quantlab made; otherwise it writes each
group's explicit module names, which every reader resolves the same way.
"""

from __future__ import annotations

import re

import torch

from .. import formats
from ..errors import CheckpointError
from ..fake_quant import KVCacheQuant, QuantLinear
from ..formats.pack import pack_int32, pack_nibbles, unpack_int32, unpack_nibbles
from ..recipe.schema import ActivationScheme, KVCacheScheme, SchemeGroup, WeightScheme

QUANT_METHOD = "compressed-tensors"
# The compressed-tensors release whose layout (dense int32 packing, tensor names) these checkpoints follow.
FORMAT_VERSION = "0.20.0"
MIXED_PRECISION = "mixed-precision"
PACKED_INT = "pack-quantized"  # int4 codes packed eight per int32, with weight_shape
CT_FORMATS = {
    "int8": "int-quantized",
    "int4": PACKED_INT,
    "int4_asym": PACKED_INT,
    "fp8_e4m3": "float-quantized",
    "nvfp4": "nvfp4-pack-quantized",
    "mxfp4": "mxfp4-pack-quantized",
}
# quantlab observer -> compressed-tensors/llm-compressor observer of the same method (informational:
# vLLM ignores it); a method with no counterpart (percentile) is left out.
_WEIGHT_OBSERVERS = {"minmax": "minmax", "mse": "mse"}
_STATIC_OBSERVERS = {"minmax": "static_minmax"}
# compressed-tensors' strategy and scale dtype of each fp4 format (block sizes come from formats.spec).
_FP4_ARGS = {"nvfp4": ("tensor_group", "torch.float8_e4m3fn"), "mxfp4": ("group", "torch.uint8")}
# An fp4 format is told apart by its block length, the only QuantizationArgs field where they differ.
_FP4_BY_BLOCK = {formats.get_spec(f).block_size: f for f in _FP4_ARGS}


# --- quantization_config --------------------------------------------------------------------------------

def _args(num_bits: int, type_: str, symmetric: bool, strategy: str, group_size: int | None, dynamic,
          observer: str | None = None, scale_dtype: str | None = None) -> dict:
    """A QuantizationArgs dict with the keys and order compressed-tensors' ``model_dump`` writes."""
    d = {"num_bits": num_bits, "type": type_, "symmetric": symmetric, "group_size": group_size,
         "strategy": strategy, "dynamic": dynamic}
    if scale_dtype is not None:
        d["scale_dtype"] = scale_dtype
    if observer is not None:
        d["observer"] = observer
    return d


def _unsupported(what: str, fmt: str) -> CheckpointError:
    return CheckpointError(f"{what} format {fmt} has no compressed-tensors equivalent, "
                           "so it cannot be written to a checkpoint")


def weight_args(w: WeightScheme) -> dict:
    """QuantizationArgs of a weight scheme (``config_groups.*.weights``)."""
    if w.format not in CT_FORMATS:
        raise _unsupported("weight", w.format)
    spec = formats.get_spec(w.format)
    observer = _WEIGHT_OBSERVERS.get(w.observer)
    if w.format in _FP4_ARGS:
        strategy, scale_dtype = _FP4_ARGS[w.format]
        return _args(spec.bits, "float", True, strategy, spec.block_size, False, observer, scale_dtype)
    # quantlab's granularity names (tensor, channel, group) are compressed-tensors' strategy names.
    return _args(spec.bits, "float" if spec.family == "fp8" else "int", spec.symmetric, w.granularity, w.group_size,
                 False, observer)


def activation_args(a: ActivationScheme) -> dict:
    """QuantizationArgs of an input-activation scheme (``config_groups.*.input_activations``)."""
    if a.format not in CT_FORMATS:
        raise _unsupported("activation", a.format)
    spec = formats.get_spec(a.format)
    if a.format in _FP4_ARGS:
        strategy, scale_dtype = _FP4_ARGS[a.format]
        # nvfp4: dynamic per block with a calibrated global scale, which compressed-tensors calls "local"
        dynamic, observer = ("local", "static_minmax") if a.format == "nvfp4" else (True, None)
        return _args(spec.bits, "float", True, strategy, spec.block_size, dynamic, observer, scale_dtype)
    observer = None if a.dynamic else _STATIC_OBSERVERS.get(a.observer)
    return _args(spec.bits, "float" if spec.family == "fp8" else "int", True, a.granularity, None, a.dynamic, observer)


def kv_cache_args(kv: KVCacheScheme) -> dict:
    """``kv_cache_scheme``: static symmetric FP8 k/v scales, per tensor or per KV head (``attn_head``)."""
    if kv.format != "fp8_e4m3":
        raise _unsupported("KV-cache", kv.format)
    return _args(8, "float", True, "attn_head" if kv.granularity == "head" else "tensor", None, False)


def scheme_dict(group: SchemeGroup, targets: list[str]) -> dict:
    """One ``config_groups`` entry (a QuantizationScheme dict) carrying its own ``format``."""
    return {"targets": targets, "weights": weight_args(group.weights),
            "input_activations": None if group.activations is None else activation_args(group.activations),
            "output_activations": None, "format": CT_FORMATS[group.weights.format]}


def quantization_config(groups: list[tuple[SchemeGroup, list[str]]], ignore: list[str],
                        kv: KVCacheScheme | None) -> dict:
    """config.json's ``quantization_config``, keyed as compressed-tensors' ``update_config`` writes it.

    Args:
        groups: (scheme group, targets) in recipe order; they become ``group_0``, ``group_1`` ...
        ignore: explicit names of every Linear left unquantized.
        kv: the FP8 KV-cache scheme, or None.
    """
    config_groups = {f"group_{i}": scheme_dict(g, t) for i, (g, t) in enumerate(groups)}
    fmts = {s["format"] for s in config_groups.values()}
    top = MIXED_PRECISION if len(fmts) > 1 else (fmts.pop() if fmts else "dense")
    return {"version": FORMAT_VERSION, "quant_method": QUANT_METHOD, "sparsity_config": {}, "transform_config": {},
            "config_groups": config_groups, "kv_cache_scheme": None if kv is None else kv_cache_args(kv),
            "format": top, "quantization_status": "compressed", "global_compression_ratio": None,
            "ignore": ignore, "moe_sparsity_config": None}


def check_config(qcfg: object, where: str) -> None:
    """Raise CheckpointError unless ``qcfg`` is a compressed, compressed-tensors quantization_config."""
    if not isinstance(qcfg, dict):
        raise CheckpointError(f"{where} has no quantization_config")
    for key, want in (("quant_method", QUANT_METHOD), ("quantization_status", "compressed")):
        if qcfg.get(key) != want:
            raise CheckpointError(f"{where}: quantization_config.{key} must be {want} (got {qcfg.get(key)!r})")
    if not isinstance(qcfg.get("config_groups"), dict):
        raise CheckpointError(f"{where}: quantization_config.config_groups is missing")


# --- matching ---------------------------------------------------------------------------------------

def class_names(module: torch.nn.Module) -> tuple[str, ...]:
    """Class names compressed-tensors matches a module by; a QuantLinear stands for the Linear it replaced."""
    cls = torch.nn.Linear if isinstance(module, QuantLinear) else type(module)
    return tuple(c.__name__ for c in cls.__mro__)


def _name_hit(name: str, target: str) -> bool:
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def _hit(name: str, classes: tuple[str, ...], target: str) -> bool:
    return _name_hit(name, target) or (not target.startswith("re:") and target in classes)


def resolve(name: str, classes: tuple[str, ...], config_groups: dict, ignore: list[str]) -> str | None:
    """The ``config_groups`` key compressed-tensors gives a module, or None (unmatched or ignored)."""
    target_to_group = {}
    for key, scheme in config_groups.items():
        for t in scheme["targets"]:
            target_to_group[t] = key  # a later group redefining a target wins, as in apply.py
    if not any(_hit(name, classes, t) for t in target_to_group) or any(_hit(name, classes, i) for i in ignore):
        return None
    ordered = sorted(target_to_group, key=lambda t: ("re:" in t, t))
    by_name = [t for t in ordered if _name_hit(name, t)]
    matched = by_name + [t for t in ordered if t in classes and t not in by_name]
    return target_to_group[matched[0]]


def config_targets(modules: list[tuple[str, tuple[str, ...]]], assigned: dict[str, int],
                   groups: list[SchemeGroup], ignore: list[str]) -> list[list[str]]:
    """Targets for each group: the recipe's own if they reproduce ``assigned`` unambiguously, else names.

    Args:
        modules: (name, class names) of every module of the model, root included.
        assigned: quantized module name -> index into ``groups``.
        groups: the scheme groups that quantized at least one module.
        ignore: the explicit ignore list (unquantized Linears).
    """
    written = [list(g.targets) for g in groups]
    for name, classes in modules:
        claims = {i for i, ts in enumerate(written) for t in ts if _hit(name, classes, t)}
        if any(_hit(name, classes, i) for i in ignore):
            claims = set()
        if claims != ({assigned[name]} if name in assigned else set()):
            return [[n for n, _ in modules if assigned.get(n) == i] for i in range(len(groups))]
    return written


# --- tensors ----------------------------------------------------------------------------------------

def compress_linear(name: str, module: QuantLinear) -> dict[str, torch.Tensor]:
    """A QuantLinear's stored tensors under their local names (``weight_packed``, ``weight_scale`` ...).

    Codes and scales are stored exactly as the QTensor holds them (scale dtypes per ``formats.spec``), so
    decompressing gives the same QTensor bit for bit; ``input_scale`` [1] and ``input_global_scale`` [1]
    are the module's own. The bias, if any, is not included (the writer stores it like any float tensor).
    """
    q = module.qweight
    out: dict[str, torch.Tensor] = {}
    if CT_FORMATS.get(q.fmt) == PACKED_INT:
        out["weight_packed"] = pack_int32(q.codes, dim=1)
        out["weight_scale"] = q.scale
        out["weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
        if q.zero_point is not None:
            out["weight_zero_point"] = pack_int32(q.zero_point, dim=0)
    elif q.fmt in _FP4_ARGS:
        out["weight_packed"] = pack_nibbles(q.codes)
        out["weight_scale"] = q.scale
        if q.global_scale is not None:
            out["weight_global_scale"] = q.global_scale.float().reshape(1)
    elif q.fmt in CT_FORMATS:
        out["weight"] = q.codes
        out["weight_scale"] = q.scale
        if q.zero_point is not None:
            out["weight_zero_point"] = q.zero_point
    else:
        raise _unsupported("weight", q.fmt)
    act = module.act
    if act is not None and act.granularity == "tensor" and not act.dynamic and module.input_scale is None:
        raise CheckpointError(f"{name} has static {act.format} activations but no calibrated input_scale")
    if module.input_scale is not None:
        out["input_scale"] = module.input_scale.float().reshape(1)
    if module.input_global_scale is not None:
        out["input_global_scale"] = module.input_global_scale.float().reshape(1)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def weight_format(w: dict) -> str:
    """The quantlab format name of a weights QuantizationArgs dict."""
    kind = (w.get("type"), w.get("num_bits"), w.get("symmetric", True), w.get("group_size"))
    if kind[:2] == ("int", 8) and kind[2]:
        return "int8"
    if kind[:2] == ("int", 4):
        return "int4" if kind[2] else "int4_asym"
    if kind[:2] == ("float", 8):
        return "fp8_e4m3"
    if kind[:2] == ("float", 4) and kind[3] in _FP4_BY_BLOCK:
        return _FP4_BY_BLOCK[kind[3]]
    raise CheckpointError(f"quantlab cannot read weights quantized as {w}")


def activation_scheme(a: dict | None) -> ActivationScheme | None:
    """The ActivationScheme that ``input_activations`` describes (None for weight-only)."""
    if a is None:
        return None
    fmt = weight_format({**a, "symmetric": True})
    granularity = {"tensor": "tensor", "token": "token"}.get(a.get("strategy"), "group")
    return ActivationScheme(fmt, granularity, dynamic=a.get("dynamic") is not False)


def describe(scheme: dict) -> str:
    """A short human description of a ``config_groups`` entry, e.g. ``group 64 asym, act fp8_e4m3 token``."""
    w, a = scheme["weights"], scheme.get("input_activations")
    strategy = w.get("strategy")
    text = f"group {w.get('group_size')}" if strategy in ("group", "tensor_group") else str(strategy)
    text += "" if w.get("symmetric", True) else " asym"
    if a is not None:
        act = activation_scheme(a)
        text += f", act {act.format} {act.granularity} {'dynamic' if act.dynamic else 'static'}"
    return text


def decompress_weight(name: str, tensors: dict[str, torch.Tensor], scheme: dict) -> formats.QTensor:
    """The QTensor a module's stored weight tensors hold (inverse of ``compress_linear``'s weight part).

    Args:
        name: the module's name (for messages).
        tensors: the module's stored tensors by local name.
        scheme: its ``config_groups`` entry.
    """
    w = scheme["weights"]
    fmt = weight_format(w)
    strategy = w.get("strategy")
    per_tensor = strategy == "tensor"
    group_size = w.get("group_size") if strategy in ("group", "tensor_group") else None
    try:
        scale, zp, gs = tensors["weight_scale"], tensors.get("weight_zero_point"), None
        if CT_FORMATS[fmt] == PACKED_INT:
            rows, cols = (int(v) for v in tensors["weight_shape"])
            codes = unpack_int32(tensors["weight_packed"], dim=1)[:, :cols]
            if zp is not None:
                zp = unpack_int32(zp, dim=0)[:rows]
        elif fmt in _FP4_ARGS:
            codes = unpack_nibbles(tensors["weight_packed"])
            gs = tensors.get("weight_global_scale")
        else:
            codes = tensors["weight"]
    except KeyError as e:
        raise CheckpointError(f"{name} is quantized as {fmt} but has no tensor {name}.{e.args[0]}") from None
    return formats.QTensor(fmt, codes, scale, zp, gs, group_size, per_tensor)


def kv_scheme(args: dict | None) -> KVCacheScheme | None:
    """The KVCacheScheme that ``kv_cache_scheme`` describes."""
    if args is None:
        return None
    if (args.get("type"), args.get("num_bits")) != ("float", 8) or args.get("strategy") not in ("tensor", "attn_head"):
        raise CheckpointError(f"quantlab cannot read a KV cache quantized as {args}")
    return KVCacheScheme("fp8_e4m3", "head" if args["strategy"] == "attn_head" else "tensor")


def kv_tensors(kv: KVCacheQuant) -> dict[str, torch.Tensor]:
    """``k_scale``/``v_scale`` (float32) of one attention module: [1] per tensor, [kv_heads, 1, 1] per head."""
    if kv.k_scale is None or kv.v_scale is None:
        raise CheckpointError("a KV-cache state was never calibrated (no key/value ranges observed)")
    shape = (-1, 1, 1) if kv.scheme.granularity == "head" else (1,)
    return {"k_scale": kv.k_scale.float().reshape(shape).cpu(), "v_scale": kv.v_scale.float().reshape(shape).cpu()}
