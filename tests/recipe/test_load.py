"""The recipe loader: shipped recipes load, defaults and overrides land, and mistakes are named exactly."""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from pathlib import Path

import pytest

from quantlab.algorithms import ALGORITHMS, GPTQParams, SmoothQuantParams
from quantlab.errors import RecipeError
from quantlab.formats import FORMATS
from quantlab.recipe import BuildOptions, CalibrationConfig, EvalConfig, Gates, load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# Line numbers matter: the expected messages below point into this text.
BASE = """\
model: smollm2-135m
output: out/test
quantization:
  schemes:
    - targets: [Linear]
      weights: {format: int4_asym, granularity: group, group_size: 64}
stages:
  - gptq: {block_size: 128}
"""
W8A8 = BASE.replace("int4_asym, granularity: group, group_size: 64}", "int8, granularity: channel}\n"
                    "      activations: {format: int8, granularity: token, dynamic: true}")


def edit(old: str, new: str, text: str = BASE) -> str:
    assert old in text, f"{old!r} not in the base recipe"
    return text.replace(old, new)


@pytest.fixture
def write(tmp_path, monkeypatch):
    """Write a recipe as ``r.yaml`` in a fresh working directory, so messages read ``r.yaml:LINE: ...``."""
    monkeypatch.chdir(tmp_path)

    def _write(text: str) -> str:
        Path("r.yaml").write_text(text)
        return "r.yaml"

    return _write


# (stages, weights format, granularity, group_size, activations (format, granularity, dynamic) or None, kv cache)
SHIPPED = {
    "fp8-dynamic": (("rtn",), "fp8_e4m3", "channel", None, ("fp8_e4m3", "token", True), False),
    "fp8-static": (("rtn",), "fp8_e4m3", "tensor", None, ("fp8_e4m3", "tensor", False), True),
    "w8a8-smoothquant": (("smoothquant", "gptq"), "int8", "channel", None, ("int8", "token", True), False),
    "w8a8-int8": (("rtn",), "int8", "channel", None, ("int8", "token", True), False),
    "w4a16-rtn": (("rtn",), "int4_asym", "group", 64, None, False),
    "w4a16-awq": (("awq", "rtn"), "int4_asym", "group", 64, None, False),
    "w4a16-gptq": (("gptq",), "int4_asym", "group", 64, None, False),
    "nvfp4": (("rtn",), "nvfp4", "group", 16, ("nvfp4", "group", True), False),
    "nvfp4a16": (("rtn",), "nvfp4", "group", 16, None, False),
    "mxfp4": (("rtn",), "mxfp4", "group", 32, None, False),
}


def test_shipped_recipes_are_exactly_the_documented_set():
    assert {p.stem for p in RECIPES.glob("*.yaml")} == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_loads_with_its_documented_scheme(name):
    path = RECIPES / f"{name}.yaml"
    r = load_recipe(path)
    stages, fmt, granularity, group_size, acts, kv = SHIPPED[name]
    assert (r.model, r.output) == ("smollm2-135m", f"out/{name}")
    cal = r.calibration
    assert (cal.dataset, cal.num_samples, cal.seq_len) == ("calib_data/gpl-3.txt", 32, 256)
    assert r.eval.dataset == "calib_data/heldout/apache-2.0.txt"
    assert tuple(s.algorithm for s in r.stages) == stages
    (group,) = r.schemes
    w, a = group.weights, group.activations
    assert (w.format, w.granularity, w.group_size) == (fmt, granularity, group_size)
    assert (a and (a.format, a.granularity, a.dynamic)) == acts
    assert (r.kv_cache is not None) == kv
    # A user copying the recipe finds the KV-cache switch right there.
    assert kv or "# kv_cache: {format: fp8_e4m3}" in r.text
    assert r.eval.gates.max_ppl_increase_pct is not None and r.eval.gates.min_top1_agreement is not None
    assert r.text == path.read_text() and r.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_absent_keys_take_the_schema_defaults(write):
    r = load_recipe(write(BASE))
    assert r.calibration == CalibrationConfig() and r.eval == EvalConfig() and r.build == BuildOptions()
    assert (r.ignore, r.kv_cache, r.dtype, r.export_dtype) == (("lm_head",), None, "auto", "bfloat16")
    assert r.trust_remote_code is False
    assert r.stages[0].params == GPTQParams(block_size=128)
    assert r.schemes[0].activations is None and r.schemes[0].weights.observer == "minmax"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.model = "other"


def test_empty_sections_and_null_stage_params_mean_defaults(write):
    r = load_recipe(write(edit("- gptq: {block_size: 128}", "- gptq:") + "eval:\n  gates:\nbuild:\n"))
    assert r.stages[0].params == GPTQParams() and r.eval == EvalConfig() and r.build == BuildOptions()


def test_values_take_their_annotated_types(write):
    text = edit("- gptq", "- smoothquant: {alpha_grid: [0, 0.5, 1]}\n  - gptq", W8A8)
    r = load_recipe(write(text + "eval: {tasks: [arc_easy], gates: {max_ppl_increase_pct: 5}}\n"))
    assert r.stages[0].params == SmoothQuantParams(alpha_grid=(0.0, 0.5, 1.0))
    assert type(r.eval.gates.max_ppl_increase_pct) is float and r.eval.gates == Gates(max_ppl_increase_pct=5.0)
    assert r.eval.tasks == ("arc_easy",) and r.schemes[0].targets == ("Linear",)


@pytest.mark.parametrize(("fmt", "block"), [("nvfp4", 16), ("mxfp4", 32)])
def test_fp4_group_size_defaults_to_the_format_block(write, fmt, block):
    r = load_recipe(write(edit("int4_asym, granularity: group, group_size: 64", f"{fmt}, granularity: group")))
    assert r.schemes[0].weights.group_size == block


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_loads_as_weight_only_rtn(write, fmt):
    granularity = "group" if FORMATS[fmt].block_size else "channel"
    text = edit("int4_asym, granularity: group, group_size: 64", f"{fmt}, granularity: {granularity}")
    assert load_recipe(write(edit("gptq: {block_size: 128}", "rtn: {}", text))).schemes[0].weights.format == fmt


def test_overrides_apply_before_validation(write):
    r = load_recipe(write(BASE), {"model": "x", "output": "out/y", "calibration.num_samples": 8})
    assert (r.model, r.output, r.calibration) == ("x", "out/y", CalibrationConfig(num_samples=8))


def test_bad_override_is_reported_as_from_the_command_line(write):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(BASE), {"calibration.num_samples": 0})
    assert str(err.value) == "r.yaml (command line): calibration.num_samples must be a positive integer (got 0)"


NUMERIC_PARAMS = [(name, field) for name, cls in ALGORITHMS.items()
                  for field, hint in typing.get_type_hints(cls).items() if hint in (int, float)]


@pytest.mark.parametrize(("name", "field"), NUMERIC_PARAMS)
def test_algorithm_number_out_of_range_is_refused(write, name, field):
    # Every numeric parameter is a count (positive) or a fraction/strength (non-negative), so -1 must fail.
    stage = f"- {name}: {{{field}: -1}}" + ("" if name in ("rtn", "gptq") else "\n  - rtn: {}")
    with pytest.raises(RecipeError) as err:
        load_recipe(write(edit("- gptq: {block_size: 128}", stage, W8A8)))
    assert str(err.value).startswith(f"r.yaml:9: stages[0].{name}.{field} must be ")
    assert str(err.value).endswith("(got -1)")


ALLOWED_TOP = "model, output, dtype, export_dtype, trust_remote_code, calibration, quantization, stages, eval, build"
MISTAKES = {
    "unknown top-level key": (
        BASE + "calibraton: {num_samples: 8}\n",
        f"r.yaml:9: calibraton is not a known key (allowed: {ALLOWED_TOP})"),
    "unknown nested key": (
        edit("group_size: 64", "group_sz: 64"),
        "r.yaml:6: quantization.schemes[0].weights.group_sz is not a known key "
        "(allowed: format, granularity, group_size, observer, percentile)"),
    "wrong type": (
        edit("block_size: 128", "block_size: x"),
        "r.yaml:8: stages[0].gptq.block_size must be a positive integer (got 'x')"),
    "string where bool expected": (
        edit("block_size: 128", "true_sequential: 'yes'"),
        "r.yaml:8: stages[0].gptq.true_sequential must be true or false (got 'yes')"),
    "act order without static groups": (
        edit("block_size: 128", "act_order: true, static_groups: false"),
        "r.yaml:8: stages[0].gptq.static_groups must be true: act_order with dynamic groups needs a weight_g_idx, which "
        "compressed-tensors refuses since 0.19, where actorder 'group' was removed (got False)"),
    "bool where int expected": (
        BASE + "calibration: {seq_len: true}\n",
        "r.yaml:9: calibration.seq_len must be a positive integer (got True)"),
    "section not a mapping": (
        BASE + "build: 64\n",
        "r.yaml:9: build must be a mapping (got 64)"),
    "missing required key": (
        edit("model: smollm2-135m\n", ""),
        "r.yaml: model is required"),
    "missing nested required key": (
        edit("format: int4_asym, ", ""),
        "r.yaml:6: quantization.schemes[0].weights.format is required"),
    "unknown format": (
        edit("int4_asym", "int3"),
        "r.yaml:6: quantization.schemes[0].weights.format must be one of "
        "int8, int4, int4_asym, fp8_e4m3, fp8_e5m2, nvfp4, mxfp4 (got 'int3')"),
    "nvfp4 with group_size 32": (
        edit("int4_asym, granularity: group, group_size: 64", "nvfp4, granularity: group, group_size: 32"),
        "r.yaml:6: quantization.schemes[0].weights.group_size must be 16 for nvfp4 (got 32)"),
    "int4 group_size 100": (
        edit("group_size: 64", "group_size: 100"),
        "r.yaml:6: quantization.schemes[0].weights.group_size must be 32, 64 or 128 for int4_asym (got 100)"),
    "int4 per-tensor": (
        edit("granularity: group, group_size: 64", "granularity: tensor"),
        "r.yaml:6: quantization.schemes[0].weights.granularity must be group or channel for int4_asym (got 'tensor')"),
    "group_size without groups": (
        edit("granularity: group", "granularity: channel"),
        "r.yaml:6: quantization.schemes[0].weights.group_size must be omitted unless granularity is group (got 64)"),
    "token activations not dynamic": (
        edit("dynamic: true", "dynamic: false", W8A8),
        "r.yaml:7: quantization.schemes[0].activations.dynamic must be true for granularity token (got False)"),
    "activations on int4 weights": (
        edit("64}", "64}\n      activations: {format: int8, granularity: token, dynamic: true}"),
        "r.yaml:7: quantization.schemes[0].activations must be omitted for int4_asym weights, which run weight-only"),
    "activations not matching weights": (
        edit("{format: int8, granularity: token", "{format: fp8_e4m3, granularity: token", W8A8),
        "r.yaml:7: quantization.schemes[0].activations.format must be int8 to match the weights (got 'fp8_e4m3')"),
    "bad regex target": (
        edit("[Linear]", "[Linear, 're:(q|k_proj']"),
        "r.yaml:5: quantization.schemes[0].targets[1] has an invalid regular expression: "
        "missing ), unterminated subpattern at position 0 (got 're:(q|k_proj')"),
    "kv cache not fp8": (
        edit("stages:", "  kv_cache: {format: int8}\nstages:"),
        "r.yaml:7: quantization.kv_cache.format must be one of fp8_e4m3, fp8_e5m2 (got 'int8')"),
    "unknown algorithm": (
        edit("- gptq:", "- gptqq:"),
        "r.yaml:8: stages[0].gptqq is not a known algorithm (allowed: rtn, gptq, smoothquant, awq)"),
    "stage not a single-key map": (
        edit("- gptq: {block_size: 128}", "- gptq"),
        "r.yaml:8: stages[0] must be a map with one algorithm name as its only key, such as 'rtn: {}' (got 'gptq')"),
    "awq without a rounder after it": (
        edit("- gptq: {block_size: 128}", "- awq: {}"),
        "r.yaml:8: stages[0].awq must be followed by a rounding stage (rtn or gptq), "
        "since a transform only prepares weights for the quantizer after it"),
    "two rounders": (
        BASE + "  - rtn: {}\n",
        "r.yaml:9: stages[1].rtn is a second rounding stage after stages[0].gptq; a recipe has exactly one"),
    "rounder not last": (
        BASE + "  - awq: {}\n",
        "r.yaml:8: stages[0].gptq must be the last stage, but stages[1].awq comes after it; "
        "transforms (awq, smoothquant) go before it"),
    "algorithm twice": (
        edit("- gptq", "- awq: {}\n  - awq: {grid: 10}\n  - gptq"),
        "r.yaml:9: stages[1].awq repeats stages[0]; each algorithm runs at most once"),
    "smoothquant without activations": (
        edit("- gptq", "- smoothquant: {alpha: 0.8}\n  - gptq"),
        "r.yaml:8: stages[0].smoothquant needs every scheme to quantize activations, "
        "but quantization.schemes[0] has no activations"),
    "gptq on fp8 weights": (
        edit("int4_asym, granularity: group, group_size: 64", "fp8_e4m3, granularity: channel"),
        "r.yaml:8: stages[0].gptq needs int4, int4_asym, int8, nvfp4 or mxfp4 weights, "
        "but quantization.schemes[0].weights.format is fp8_e4m3"),
    "stride longer than context": (
        BASE + "eval: {context_len: 256, stride: 512}\n",
        "r.yaml:9: eval.stride must be at most eval.context_len = 256 (got 512)"),
    "duplicate key": (
        BASE + "model: other\n",
        "r.yaml:9: model is given twice (first on line 1)"),
    "YAML syntax error": (
        edit("output: out/test", "output: out/test: x"),
        "r.yaml:2: recipe is not valid YAML: mapping values are not allowed here"),
    "unsafe YAML tag": (
        edit("out/test", "!!python/object/apply:os.system [ls]"),
        "r.yaml:2: output has an unsupported YAML tag (got 'tag:yaml.org,2002:python/object/apply:os.system')"),
    "recursive alias": (
        BASE + "eval: {tasks: &t [*t]}\n",
        "r.yaml: recipe must not use an alias inside the node it names"),
    "top level not a mapping": (
        "- model: smollm2-135m\n",
        "r.yaml:1: recipe must be a mapping of keys to values"),
}


@pytest.mark.parametrize(("text", "message"), list(MISTAKES.values()), ids=list(MISTAKES))
def test_mistake_is_named_with_file_line_and_key_path(write, text, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(text))
    assert str(err.value) == message


def test_missing_file_is_named(write):
    with pytest.raises(RecipeError) as err:
        load_recipe("missing.yaml")
    assert str(err.value) == "missing.yaml: recipe file does not exist"
