"""Layer-by-layer calibration on a tiny random Llama: structure, statistics and failure behaviour."""

from __future__ import annotations

import pytest
import torch

from helpers import random_calibration, tiny_llama
from quantlab.algorithms import AWQParams, GPTQParams, RTNParams, SmoothQuantParams
from quantlab.errors import CalibrationError
from quantlab.fake_quant import QuantLinear
from quantlab.pipeline import calibrate
from quantlab.recipe.schema import (ActivationScheme, CalibrationConfig, KVCacheScheme, Recipe, SchemeGroup, Stage,
                                    WeightScheme)

INT4 = SchemeGroup(("Linear",), WeightScheme("int4_asym", "group", 32))
FP8_STATIC = SchemeGroup(("Linear",), WeightScheme("fp8_e4m3", "tensor"), ActivationScheme("fp8_e4m3", "tensor", False))


def recipe(*stages, schemes=(INT4,), kv=None, ignore=("lm_head",)) -> Recipe:
    return Recipe(path="t.yaml", text="", sha256="", model="tiny", output="unused", calibration=CalibrationConfig(),
                  schemes=tuple(schemes), stages=tuple(stages), ignore=ignore, kv_cache=kv)


def test_every_targeted_linear_becomes_quantlinear_and_ignored_ones_stay_float():
    model = tiny_llama()
    calibrate(model, recipe(Stage("rtn", RTNParams())), random_calibration(), torch.device("cpu"), progress=False)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 7
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, QuantLinear)


def test_regex_ignore_keeps_matching_linears_float():
    model = tiny_llama()
    calibrate(model, recipe(Stage("rtn", RTNParams()), ignore=("lm_head", "re:.*down_proj")), random_calibration(),
              torch.device("cpu"), progress=False)
    assert not isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


def test_first_matching_scheme_wins():
    fp8 = SchemeGroup(("re:.*down_proj",), WeightScheme("fp8_e4m3", "channel"))
    model = tiny_llama()
    calibrate(model, recipe(Stage("rtn", RTNParams()), schemes=(fp8, INT4)), random_calibration(), torch.device("cpu"), progress=False)
    assert model.model.layers[1].mlp.down_proj.qweight.fmt == "fp8_e4m3"
    assert model.model.layers[1].mlp.up_proj.qweight.fmt == "int4_asym"


@pytest.mark.parametrize("stages", [
    (Stage("rtn", RTNParams()),),
    (Stage("gptq", GPTQParams(block_size=16)),),
    (Stage("awq", AWQParams(grid=4, clip_grid=4)), Stage("rtn", RTNParams())),
], ids=["rtn", "gptq", "awq"])
def test_layer_stats_report_a_small_positive_error_per_layer(stages):
    model = tiny_llama()
    result = calibrate(model, recipe(*stages), random_calibration(), torch.device("cpu"), progress=False)
    assert [s.name for s in result.layers] == ["model.layers.0", "model.layers.1"]
    assert all(0 < s.rel_mse < 0.1 for s in result.layers), [s.rel_mse for s in result.layers]


def test_static_activation_and_kv_ranges_are_calibrated():
    model = tiny_llama()
    result = calibrate(model, recipe(Stage("rtn", RTNParams()), schemes=(FP8_STATIC,), kv=KVCacheScheme()),
                       random_calibration(), torch.device("cpu"), progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert q.input_scale is not None and q.input_scale.item() > 0
    assert len(result.kv_states) == 2 and all(s.k_scale.item() > 0 and s.v_scale.item() > 0 for s in result.kv_states)
    assert result.schemes["model.layers.0.self_attn.q_proj"] is FP8_STATIC


def test_smoothquant_then_gptq_w8a8_runs_and_keeps_error_small():
    w8a8 = SchemeGroup(("Linear",), WeightScheme("int8", "channel"), ActivationScheme("int8", "token", True))
    model = tiny_llama()
    result = calibrate(model, recipe(Stage("smoothquant", SmoothQuantParams(alpha=0.5)), Stage("gptq", GPTQParams()),
                                     schemes=(w8a8,)), random_calibration(), torch.device("cpu"), progress=False)
    assert all(s.rel_mse < 1e-2 for s in result.layers)


def test_nan_in_weights_stops_with_the_layer_name():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"calibration stopped at model\.layers\.1: its weights contain NaN or inf"):
        calibrate(model, recipe(Stage("rtn", RTNParams())), random_calibration(), torch.device("cpu"), progress=False)


def test_quantized_model_logits_stay_close_to_float():
    model = tiny_llama()
    ids = random_calibration(seed=1).input_ids
    with torch.no_grad():
        ref = model(ids).logits
    calibrate(model, recipe(Stage("rtn", RTNParams()), schemes=(FP8_STATIC,)), random_calibration(), torch.device("cpu"), progress=False)
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).norm() / ref.norm() < 0.05
    assert not torch.equal(out, ref)


NVFP4_W4A4 = SchemeGroup(("Linear",), WeightScheme("nvfp4", "group", 16), ActivationScheme("nvfp4", "group", True))


@pytest.mark.parametrize("rounder", [Stage("rtn", RTNParams()), Stage("gptq", GPTQParams(block_size=16))], ids=["rtn", "gptq"])
def test_nvfp4_shards_vllm_fuses_share_one_global_scale(rounder):
    # vLLM keeps one weight/input global scale per fused qkv_proj / gate_up_proj (the largest stored);
    # shards quantized with different ones would decode wrongly there.
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:  # make the shards' amaxes differ
            layer.self_attn.k_proj.weight.mul_(3.0)
            layer.mlp.up_proj.weight.mul_(0.25)
    calibrate(model, recipe(rounder, schemes=(NVFP4_W4A4,)), random_calibration(), torch.device("cpu"), progress=False)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for shards in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            scales = [m.qweight.global_scale.item() for m in shards]
            assert scales == [scales[0]] * len(shards), scales
            assert len({m.input_global_scale.item() for m in shards}) == 1
        # Unfused Linears keep their own: o_proj's amax differs from q/k/v's.
        assert attn.o_proj.qweight.global_scale.item() != attn.q_proj.qweight.global_scale.item()
