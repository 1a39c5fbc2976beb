"""Plain recipe data (dicts, lists, scalars) -> a validated, frozen ``Recipe``.

This module knows what a recipe may say, not where it came from: it raises ``Violation`` naming a key
path, and ``quantlab.recipe.load`` turns that into a ``RecipeError`` with the file and line. Field
types come from the schema's annotations; value rules live in ``_CHECKS``; rules that tie several
keys together (format vs granularity, activations vs weights, stage order) are the functions below it.
Anything not given keeps its dataclass default.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from ..formats import FORMATS, INT_GROUP_SIZES
from .stages import ALGORITHMS, ROUNDERS, TRANSFORMS, AWQParams, GPTQParams, SmoothQuantParams
from .schema import (
    ActivationScheme,
    BuildOptions,
    CalibrationConfig,
    EvalConfig,
    Gates,
    KVCacheScheme,
    Recipe,
    SchemeGroup,
    Stage,
    WeightScheme,
)


class Violation(Exception):
    """A recipe rule broken at ``key_path``; the message reads ``{key_path} {expected} (got {got!r})``."""

    def __init__(self, key_path: str, expected: str, got: object = None):
        super().__init__(key_path, expected, got)
        self.key_path, self.expected, self.got = key_path, expected, got


@dataclasses.dataclass(frozen=True, slots=True)
class _Check:
    """A value rule for one field; ``description`` completes "must be ..." in the message."""

    description: str
    accepts: Callable[[Any], bool]


def _one_of(*names: str) -> _Check:
    return _Check(f"one of {', '.join(names)}", lambda v: v in names)


def _either(names: tuple[object, ...]) -> str:
    """``("a", "b", "c")`` -> ``"a, b or c"``, for messages."""
    words = [str(n) for n in names]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


_POSITIVE = _Check("a positive integer", lambda v: v > 0)
_NAME = _Check("a non-empty string", lambda v: v.strip() != "")
_NON_NEGATIVE = _Check("a non-negative number", lambda v: v >= 0)
_FRACTION = _Check("a number in (0, 1]", lambda v: 0 < v <= 1)
_UNIT = _Check("a number between 0 and 1", lambda v: 0 <= v <= 1)
_PERCENTILE = _Check("a number in (50, 100]", lambda v: 50 < v <= 100)

# Weight granularities each format's kernels read: W4A16 kernels take groups or channels, FP8 GEMMs
# per-tensor or per-channel scales, and the fp4 formats carry their own fixed microblock.
WEIGHT_GRANULARITIES = {
    "int8": ("tensor", "channel", "group"),
    "int4": ("group", "channel"),
    "int4_asym": ("group", "channel"),
    "fp8_e4m3": ("tensor", "channel"),
    "fp8_e5m2": ("tensor", "channel"),
    "nvfp4": ("group",),
    "mxfp4": ("group",),
}
# Activation formats and their granularities; each runs only with weights of the same format
# (the W8A8 / W4A4 kernels), so every other weight format is weight-only.
ACTIVATION_GRANULARITIES = {
    "fp8_e4m3": ("token", "tensor"),
    "int8": ("token", "tensor"),
    "nvfp4": ("group",),
    "mxfp4": ("group",),
}
# Formats GPTQ's error compensation is meaningful for; FP8's rounding error is too small to repay it.
GPTQ_FORMATS = ("int4", "int4_asym", "int8", "nvfp4", "mxfp4")

_CHECKS: dict[tuple[type, str], _Check] = {
    (Recipe, "model"): _NAME,
    (Recipe, "output"): _NAME,
    (Recipe, "dtype"): _one_of("auto", "float32", "bfloat16", "float16"),
    (Recipe, "export_dtype"): _one_of("bfloat16", "float16", "float32"),
    (Recipe, "schemes"): _Check("a non-empty list of scheme groups", lambda v: len(v) > 0),
    (CalibrationConfig, "dataset"): _NAME,
    (CalibrationConfig, "num_samples"): _POSITIVE,
    (CalibrationConfig, "seq_len"): _POSITIVE,
    (CalibrationConfig, "text_field"): _NAME,
    (SchemeGroup, "targets"): _Check("a non-empty list of class names or 're:' patterns", lambda v: len(v) > 0),
    (WeightScheme, "format"): _one_of(*FORMATS),
    (WeightScheme, "granularity"): _one_of("tensor", "channel", "group"),
    (WeightScheme, "observer"): _one_of("minmax", "mse", "percentile"),
    (WeightScheme, "percentile"): _PERCENTILE,
    (ActivationScheme, "format"): _one_of(*ACTIVATION_GRANULARITIES),
    (ActivationScheme, "granularity"): _one_of("token", "tensor", "group"),
    (ActivationScheme, "observer"): _one_of("minmax", "percentile"),
    (ActivationScheme, "percentile"): _PERCENTILE,
    (KVCacheScheme, "format"): _one_of("fp8_e4m3", "fp8_e5m2"),
    (KVCacheScheme, "granularity"): _one_of("tensor", "head"),
    (EvalConfig, "dataset"): _NAME,
    (EvalConfig, "context_len"): _POSITIVE,
    (EvalConfig, "stride"): _POSITIVE,
    (EvalConfig, "max_tokens"): _POSITIVE,
    (EvalConfig, "limit"): _POSITIVE,
    (Gates, "max_ppl_increase_pct"): _NON_NEGATIVE,
    (Gates, "min_task_recovery_pct"): _Check("a number between 0 and 100", lambda v: 0 <= v <= 100),
    (Gates, "max_kl"): _NON_NEGATIVE,
    (Gates, "min_top1_agreement"): _UNIT,
    (BuildOptions, "max_batch_size"): _POSITIVE,
    (BuildOptions, "max_seq_len"): _POSITIVE,
    (BuildOptions, "max_num_tokens"): _POSITIVE,
    (BuildOptions, "tokens_per_block"): _POSITIVE,
    (BuildOptions, "kv_cache_dtype"): _one_of("auto", "bf16", "fp8_e4m3"),
    (BuildOptions, "dtype"): _one_of("bfloat16", "float16", "float32"),
    (BuildOptions, "device"): _one_of("auto", "cuda", "cpu"),
    (GPTQParams, "block_size"): _POSITIVE,
    (GPTQParams, "dampening"): _FRACTION,
    (AWQParams, "grid"): _POSITIVE,
    (AWQParams, "clip_grid"): _POSITIVE,
    (AWQParams, "max_shrink"): _FRACTION,
    (SmoothQuantParams, "alpha"): _UNIT,
    (SmoothQuantParams, "alpha_grid"): _Check("a non-empty list of numbers between 0 and 1",
                                              lambda v: len(v) > 0 and all(0 <= a <= 1 for a in v)),
}

_NOUNS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_SCALAR_KEYS = ("model", "output", "dtype", "export_dtype", "trust_remote_code")
_TOP_KEYS = (*_SCALAR_KEYS, "calibration", "quantization", "stages", "eval", "build")


def build_recipe(data: Mapping[str, Any], *, path: str, text: str, sha256: str) -> Recipe:
    """Validate a whole recipe mapping (the YAML layout of ``quantlab.recipe.load``).

    Raises:
        Violation: the first broken rule, in the layout's order: unknown and missing keys first, then
            each section top to bottom (the stage rules see the already-checked schemes).
    """
    _check_keys(data, "", _TOP_KEYS, ("model", "output", "quantization", "stages"))
    given = {k: _field(Recipe, k, data[k], k) for k in _SCALAR_KEYS if k in data}
    calibration = _section(CalibrationConfig, data.get("calibration"), "calibration")
    quantization = _quantization(data["quantization"], "quantization")
    stages = _stages(data["stages"], quantization["schemes"])
    evaluation = _section(EvalConfig, data.get("eval"), "eval")
    if evaluation.stride > evaluation.context_len:
        raise Violation("eval.stride", f"must be at most eval.context_len = {evaluation.context_len}",
                        evaluation.stride)
    return Recipe(path=path, text=text, sha256=sha256, **given, calibration=calibration, **quantization,
                  stages=stages, eval=evaluation, build=build_options(data.get("build")))


def build_options(data: object, path: str = "build") -> BuildOptions:
    """Validate a ``build:`` mapping (or ``quantlab build``'s flags given as one); None keeps the defaults."""
    options = _section(BuildOptions, data, path)
    if options.max_num_tokens < options.max_batch_size:
        raise Violation(f"{_join(path, 'max_num_tokens')}", f"must be at least max_batch_size = {options.max_batch_size}",
                        options.max_num_tokens)
    return options


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_keys(data: object, path: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    """Refuse a non-mapping, unknown keys (listing the allowed ones) and missing required keys."""
    if not isinstance(data, Mapping):
        raise Violation(path, "must be a mapping", data)
    for key in data:
        if key not in allowed:
            raise Violation(_join(path, key), f"is not a known key (allowed: {', '.join(allowed) or 'none'})")
    for key in required:
        if key not in data:
            raise Violation(_join(path, key), "is required")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section(cls: type, data: object, path: str) -> Any:
    """A dataclass from a mapping; an empty section (YAML null) means all defaults."""
    return cls() if data is None else _build(cls, data, path)


def _build(cls: type, data: object, path: str) -> Any:
    """A ``cls`` instance from a mapping, typed and checked field by field; absent fields keep defaults.

    An optional nested section given as null (``gates:`` with nothing under it) also keeps its default.
    """
    fields = dataclasses.fields(cls)
    required = tuple(f.name for f in fields
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    _check_keys(data, path, tuple(f.name for f in fields), required)
    return cls(**{k: _field(cls, k, v, _join(path, k)) for k, v in data.items()
                  if not (v is None and k not in required and dataclasses.is_dataclass(_hints(cls)[k]))})


def _field(cls: type, name: str, value: object, path: str) -> Any:
    return _coerce(value, _hints(cls)[name], path, _CHECKS.get((cls, name)))


def _coerce(value: object, hint: Any, path: str, check: _Check | None) -> Any:
    """``value`` as the annotated type: bool is not an int, ints pass as floats, lists become tuples."""
    given = value  # messages show what the user wrote (5, not 5.0)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise Violation(path, f"must be {check.description if check else 'a list'}", value)
        item = typing.get_args(hint)[0]
        value = tuple(_coerce(v, item, f"{path}[{i}]", None) for i, v in enumerate(value))
    elif hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif not isinstance(value, hint) or (isinstance(value, bool) and hint is not bool):
        raise Violation(path, f"must be {check.description if check else _NOUNS[hint]}", value)
    if check is not None and not check.accepts(value):
        raise Violation(path, f"must be {check.description}", given)
    return value


def _check_patterns(patterns: tuple[str, ...], path: str) -> None:
    for i, pattern in enumerate(patterns):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise Violation(f"{path}[{i}]", f"has an invalid regular expression: {err}", pattern) from None


def _quantization(data: object, path: str) -> dict[str, Any]:
    """``ignore``, ``schemes`` and ``kv_cache`` as keyword arguments of ``Recipe``."""
    _check_keys(data, path, ("ignore", "schemes", "kv_cache"), ("schemes",))
    out = {k: _field(Recipe, k, v, _join(path, k)) for k, v in data.items()}
    if "ignore" in out:
        _check_patterns(out["ignore"], f"{path}.ignore")
    out["schemes"] = tuple(_check_group(g, data["schemes"][i], f"{path}.schemes[{i}]")
                           for i, g in enumerate(out["schemes"]))
    return out


def _check_group(group: SchemeGroup, raw: Mapping[str, Any], path: str) -> SchemeGroup:
    """Apply the format rules to one scheme group; returns it with the fp4 block filled in as group_size."""
    _check_patterns(group.targets, f"{path}.targets")
    weights = _check_weights(group.weights, raw["weights"], f"{path}.weights")
    if group.activations is not None:
        _check_activations(group.activations, raw["activations"], weights, path)
    return dataclasses.replace(group, weights=weights)


def _check_weights(w: WeightScheme, raw: Mapping[str, Any], path: str) -> WeightScheme:
    allowed = WEIGHT_GRANULARITIES[w.format]
    if w.granularity not in allowed:
        raise Violation(f"{path}.granularity", f"must be {_either(allowed)} for {w.format}", w.granularity)
    block = FORMATS[w.format].block_size
    if block is not None and w.group_size in (None, block):
        w = dataclasses.replace(w, group_size=block)
    elif block is not None:
        raise Violation(f"{path}.group_size", f"must be {block} for {w.format}", w.group_size)
    elif w.granularity == "group" and w.group_size not in INT_GROUP_SIZES:
        raise Violation(f"{path}.group_size", f"must be {_either(INT_GROUP_SIZES)} for {w.format}", w.group_size)
    elif w.granularity != "group" and w.group_size is not None:
        raise Violation(f"{path}.group_size", "must be omitted unless granularity is group", w.group_size)
    if "percentile" in raw and w.observer != "percentile":
        raise Violation(f"{path}.percentile", "must be omitted unless observer is percentile", w.percentile)
    return w


def _check_activations(a: ActivationScheme, raw: Mapping[str, Any], weights: WeightScheme, group_path: str) -> None:
    path = f"{group_path}.activations"
    if weights.format not in ACTIVATION_GRANULARITIES:
        raise Violation(path, f"must be omitted for {weights.format} weights, which run weight-only")
    if a.format != weights.format:
        raise Violation(f"{path}.format", f"must be {weights.format} to match the weights", a.format)
    allowed = ACTIVATION_GRANULARITIES[a.format]
    if a.granularity not in allowed:
        raise Violation(f"{path}.granularity", f"must be {_either(allowed)} for {a.format}", a.granularity)
    if a.granularity in ("token", "group") and not a.dynamic:
        raise Violation(f"{path}.dynamic", f"must be true for granularity {a.granularity}", a.dynamic)
    if "percentile" in raw and a.observer != "percentile":
        raise Violation(f"{path}.percentile", "must be omitted unless observer is percentile", a.percentile)


def _stages(data: object, schemes: tuple[SchemeGroup, ...]) -> tuple[Stage, ...]:
    """The stage list: transforms, then exactly one rounder, each algorithm at most once."""
    if not isinstance(data, (list, tuple)) or not data:
        raise Violation("stages", "must be a non-empty list ending with a rounding stage (rtn or gptq)", data)
    stages = tuple(_stage(entry, f"stages[{i}]") for i, entry in enumerate(data))
    names = [s.algorithm for s in stages]
    where = [f"stages[{i}].{n}" for i, n in enumerate(names)]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise Violation(where[i], f"repeats stages[{names.index(name)}]; each algorithm runs at most once")
    rounders = [i for i, n in enumerate(names) if n in ROUNDERS]
    if len(rounders) > 1:
        raise Violation(where[rounders[1]], f"is a second rounding stage after {where[rounders[0]]}; "
                                            "a recipe has exactly one")
    # llm-compressor's rule: a transform only prepares weights for a quantizer that runs after it.
    if not rounders:
        raise Violation(where[0], "must be followed by a rounding stage (rtn or gptq), since a transform only "
                                  "prepares weights for the quantizer after it")
    if rounders[0] != len(names) - 1:
        raise Violation(where[rounders[0]], f"must be the last stage, but {where[rounders[0] + 1]} comes after it; "
                                            f"transforms ({', '.join(sorted(TRANSFORMS))}) go before it")
    for i, name in enumerate(names):
        for j, group in enumerate(schemes):
            if name == "smoothquant" and group.activations is None:
                raise Violation(where[i], "needs every scheme to quantize activations, "
                                          f"but quantization.schemes[{j}] has no activations")
            if name == "gptq" and stages[i].params.act_order and not stages[i].params.static_groups:
                raise Violation(f"{where[i]}.static_groups", "must be true: act_order with dynamic groups needs a "
                                                             "weight_g_idx, which compressed-tensors refuses since 0.19, "
                                                             "where actorder 'group' was removed", False)
            if name == "gptq" and group.weights.format not in GPTQ_FORMATS:
                raise Violation(where[i], f"needs {_either(GPTQ_FORMATS)} weights, but "
                                          f"quantization.schemes[{j}].weights.format is {group.weights.format}")
    return stages


def _stage(entry: object, path: str) -> Stage:
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise Violation(path, "must be a map with one algorithm name as its only key, such as 'rtn: {}'", entry)
    ((name, params),) = entry.items()
    if name not in ALGORITHMS:
        raise Violation(f"{path}.{name}", f"is not a known algorithm (allowed: {', '.join(ALGORITHMS)})")
    return Stage(name, _section(ALGORITHMS[name], params, f"{path}.{name}"))
