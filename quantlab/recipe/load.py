"""Recipe YAML -> a validated ``Recipe``: the only code in quantlab that sees raw YAML.

The YAML is composed (not loaded) so every key keeps its line, and any mistake is reported as one
sentence naming the file, the line and the key path, e.g.
``recipes/x.yaml:12: stages[1].gptq.block_size must be a positive integer (got 'x')``.
Unknown keys are refused everywhere, listing the allowed ones. Layout (``#`` marks the defaults):

.. code-block:: yaml

    model: smollm2-135m              # required: the embedded default, a local HF directory or a hub id
    output: out/smollm2-135m-w4a16   # required: checkpoint directory
    dtype: auto                      # auto | float32 | bfloat16 | float16 (calibration dtype)
    export_dtype: bfloat16           # bfloat16 | float16 | float32 (unquantized tensors)
    trust_remote_code: false
    calibration: {dataset: calib_data/gpl-3.txt, num_samples: 32, seq_len: 256, seed: 0, text_field: text}
    quantization:
      ignore: [lm_head]              # module names or "re:<regex>"; default [lm_head]
      schemes:                       # required, non-empty; the first group whose targets match wins
        - targets: [Linear]          # class names or "re:<regex>" (re.fullmatch on module names)
          weights: {format: int4_asym, granularity: group, group_size: 64, observer: mse}
          activations: {format: fp8_e4m3, granularity: token, dynamic: true}   # optional
      kv_cache: {format: fp8_e4m3, granularity: tensor}                      # optional
    stages:                          # required: single-key maps, algorithm -> parameters ({} or null)
      - smoothquant: {alpha: 0.8}    # transforms first ...
      - gptq: {block_size: 128, dampening: 0.01, act_order: true, static_groups: true, true_sequential: true}  # ... then one rounder
    eval: {dataset: calib_data/heldout/apache-2.0.txt, context_len: 512, stride: 256, max_tokens: 4096,
           tasks: [], limit: null, seed: 1234,
           gates: {max_ppl_increase_pct: 5, min_task_recovery_pct: 95, max_kl: 0.1, min_top1_agreement: 0.8}}
    build: {max_batch_size: 64, max_seq_len: 2048, max_num_tokens: 2048, tokens_per_block: 16,
            kv_cache_dtype: auto, dtype: bfloat16, device: auto}

A section left empty (``eval:`` with nothing under it) keeps all its defaults. Which formats,
granularities, activation schemes and stage orders combine is spelled out in
``quantlab.recipe.validate``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from .schema import Recipe
from .validate import Violation, build_recipe


def load_recipe(path: str | Path, overrides: Mapping[str, object] | None = None) -> Recipe:
    """Read, validate and freeze a recipe.

    Args:
        path: the recipe file; kept as given in ``Recipe.path`` and in messages.
        overrides: dotted key paths to values, e.g. ``{"calibration.num_samples": 8}``, applied before
            validation so command-line flags meet the same rules as the file. Errors about them say
            ``(command line)`` where a line number would be.

    Raises:
        RecipeError: the file is missing, unreadable or not YAML, or the first rule it breaks.
    """
    file = str(path)
    raw = _read(file)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(file, None, "recipe", "must be UTF-8 text") from None
    data, lines = _compose(text, file)
    overridden = _apply_overrides(data, dict(overrides or {}), file)
    try:
        return build_recipe(data, path=file, text=text, sha256=hashlib.sha256(raw).hexdigest())
    except Violation as v:
        if any(v.key_path == o or v.key_path.startswith((f"{o}.", f"{o}[")) for o in overridden):
            raise RecipeError(f"{file} (command line)", None, v.key_path, v.expected, v.got) from None
        raise RecipeError(file, _line(v.key_path, lines), v.key_path, v.expected, v.got) from None


def _read(file: str) -> bytes:
    try:
        return Path(file).read_bytes()
    except FileNotFoundError:
        raise RecipeError(file, None, "recipe file", "does not exist") from None
    except OSError as err:
        raise RecipeError(file, None, "recipe file", f"cannot be read: {err.strerror}") from None


def _compose(text: str, file: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Plain data from YAML text, plus the 1-based line of every key path (``a.b[0].c``)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            raise RecipeError(file, None, "recipe", "is empty")
        if not isinstance(root, yaml.MappingNode):
            raise RecipeError(file, root.start_mark.line + 1, "recipe", "must be a mapping of keys to values")
        lines: dict[str, int] = {}
        return _plain(root, "", lines, yaml.constructor.SafeConstructor(), file), lines
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = None if mark is None else mark.line + 1
        raise RecipeError(file, line, "recipe", f"is not valid YAML: {err.problem or err.context}") from None
    except RecursionError:  # `a: &x [*x]` composes into a cycle
        raise RecipeError(file, None, "recipe", "must not use an alias inside the node it names") from None


_MAP_TAG, _SEQ_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"


def _plain(node: yaml.Node, path: str, lines: dict[str, int], scalars: yaml.constructor.SafeConstructor,
           file: str) -> Any:
    """Walk a composed node into dicts, lists and scalars, recording each key's and item's line.

    Only plain maps, lists and the safe scalar types pass: an explicit tag such as ``!!python/object``
    or ``!!set`` is refused rather than ignored.
    """
    kind = {yaml.MappingNode: _MAP_TAG, yaml.SequenceNode: _SEQ_TAG}.get(type(node))
    if node.tag != kind and (kind is not None or node.tag not in scalars.yaml_constructors):
        raise RecipeError(file, node.start_mark.line + 1, path or "recipe", "has an unsupported YAML tag", node.tag)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError(file, line, path or "recipe", "must have plain names as keys")
            key_path = f"{path}.{key_node.value}" if path else key_node.value
            if key_node.value in out:
                raise RecipeError(file, line, key_path, f"is given twice (first on line {lines[key_path]})")
            lines[key_path] = line
            out[key_node.value] = _plain(value_node, key_path, lines, scalars, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            lines[f"{path}[{i}]"] = item.start_mark.line + 1
            items.append(_plain(item, f"{path}[{i}]", lines, scalars, file))
        return items
    return scalars.construct_object(node)


def _apply_overrides(data: dict[str, Any], overrides: dict[str, object], file: str) -> set[str]:
    """Set each dotted key path in ``data`` (creating sections as needed); returns the paths set."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = data
        for i, key in enumerate(parents):
            if section.get(key) is None:
                section[key] = {}
            section = section[key]
            if not isinstance(section, dict):
                raise RecipeError(f"{file} (command line)", None, dotted,
                                  f"cannot be set because {'.'.join(parents[:i + 1])} is not a mapping")
        section[leaf] = value
    return set(overrides)


def _line(key_path: str, lines: dict[str, int]) -> int | None:
    """The line of ``key_path``, or of its nearest ancestor present in the file (for missing keys)."""
    while key_path:
        if key_path in lines:
            return lines[key_path]
        cut = max(key_path.rfind("."), key_path.rfind("["))
        key_path = key_path[:cut] if cut > 0 else ""
    return None
