"""A written checkpoint loads back into a model whose logits equal the calibrated model's, bit for bit."""

import json

import pytest
import torch

from quantlab.checkpoint.reader import load_quantized
from quantlab.checkpoint.schema import compress_linear
from quantlab.checkpoint.writer import INDEX_NAME, write_checkpoint
from quantlab.fake_quant import KVCacheQuant, QuantLinear
from quantlab.recipe.schema import ActivationScheme as A
from quantlab.recipe.schema import KVCacheScheme, SchemeGroup
from quantlab.recipe.schema import WeightScheme as W

ALL = ("Linear",)
SCHEMES = {
    "fp8-dynamic": ([SchemeGroup(ALL, W("fp8_e4m3", "channel"), A("fp8_e4m3", "token", True))], None),
    "fp8-static-kv": ([SchemeGroup(ALL, W("fp8_e4m3", "tensor"), A("fp8_e4m3", "tensor", False))], KVCacheScheme()),
    "int8-w8a8": ([SchemeGroup(ALL, W("int8", "channel"), A("int8", "token", True))], None),
    "int8-static": ([SchemeGroup(ALL, W("int8", "channel"), A("int8", "tensor", False))], None),
    "int4-g32": ([SchemeGroup(ALL, W("int4", "group", 32))], None),
    "int4-asym-g32": ([SchemeGroup(ALL, W("int4_asym", "group", 32, observer="mse"))], None),
    "int4-asym-channel": ([SchemeGroup(ALL, W("int4_asym", "channel"))], None),
    "nvfp4-w4a4-kv-head": ([SchemeGroup(ALL, W("nvfp4", "group", 16), A("nvfp4", "group", True))],
                           KVCacheScheme(granularity="head")),
    "mxfp4": ([SchemeGroup(ALL, W("mxfp4", "group", 32))], None),
    "mxfp4-w4a4": ([SchemeGroup(ALL, W("mxfp4", "group", 32), A("mxfp4", "group", True))], None),
}


@pytest.mark.parametrize("name", SCHEMES)
def test_loaded_logits_equal_calibrated_logits(name, quantize, tmp_path):
    groups, kv = SCHEMES[name]
    c = quantize(groups, kv)
    summary = write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt")
    loaded, tokenizer, provenance = load_quantized(summary.path)
    assert summary.num_quantized == 14 and summary.num_shards == 1
    assert torch.equal(loaded(c.ids).logits.detach(), c.logits())
    mods = dict(loaded.named_modules())
    for n, m in c.model.named_modules():
        if isinstance(m, QuantLinear):
            q, r = m.qweight, mods[n].qweight
            assert (q.fmt, q.group_size, q.per_tensor) == (r.fmt, r.group_size, r.per_tensor)
            assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and q.scale.dtype == r.scale.dtype
            assert (m.act is None) == (mods[n].act is None)
            if m.act is not None:
                a, b = m.act, mods[n].act
                assert (a.format, a.granularity, a.dynamic) == (b.format, b.granularity, b.dynamic)
            for scale in ("input_scale", "input_global_scale"):
                a, b = getattr(m, scale), getattr(mods[n], scale)
                assert (a is None and b is None) or torch.equal(a, b), (n, scale)
            ours, theirs = compress_linear(n, m), compress_linear(n, mods[n])
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        if isinstance(m, KVCacheQuant):
            assert torch.equal(m.k_scale, mods[n].k_scale) and torch.equal(m.v_scale, mods[n].v_scale)
    assert tokenizer("t5 t7")["input_ids"] == c.tokenizer("t5 t7")["input_ids"]
    assert provenance["calibration"]["digest"] == c.calib.digest


def test_bf16_export_equals_calibrated_model_with_bf16_rounded_float_tensors(quantize, tmp_path):
    c = quantize(SCHEMES["int4-asym-g32"][0], export_dtype="bfloat16")
    write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt")
    loaded, _, _ = load_quantized(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        for p in c.model.parameters():  # embeddings and norms: what a BF16 export stores
            p.copy_(p.to(torch.bfloat16).float())
    assert torch.equal(loaded(c.ids).logits.detach(), c.logits())


def test_sharded_checkpoint_has_hf_names_and_loads_exactly(quantize, tmp_path):
    c = quantize(SCHEMES["fp8-static-kv"][0], KVCacheScheme())
    summary = write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt",
                               max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ckpt" / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert summary.num_shards == len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert index["metadata"]["total_size"] == summary.bytes
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()
    loaded, _, _ = load_quantized(tmp_path / "ckpt")
    assert torch.equal(loaded(c.ids).logits.detach(), c.logits())


def test_tied_lm_head_is_written_once_and_stays_tied(quantize, tmp_path):
    from safetensors import safe_open

    c = quantize(SCHEMES["int4-g32"][0])
    write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    loaded, _, _ = load_quantized(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_quantized_lm_head_unties_embeddings(quantize, tmp_path):
    c = quantize(SCHEMES["int4-g32"][0], ignore=())
    assert isinstance(c.model.lm_head, QuantLinear)
    write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []
    loaded, _, _ = load_quantized(tmp_path / "ckpt")
    assert isinstance(loaded.lm_head, QuantLinear)
    assert torch.equal(loaded(c.ids).logits.detach(), c.logits())


def test_mixed_precision_overlapping_targets_become_explicit_names(quantize, tmp_path):
    groups = [SchemeGroup((r"re:.*mlp\..*",), W("int4_asym", "group", 32)),
              SchemeGroup(ALL, W("fp8_e4m3", "channel"), A("fp8_e4m3", "token", True))]
    c = quantize(groups)
    write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt")
    qcfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "mixed-precision"
    g0, g1 = qcfg["config_groups"]["group_0"], qcfg["config_groups"]["group_1"]
    assert (g0["format"], g1["format"]) == ("pack-quantized", "float-quantized")
    mlp, attn = ("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")
    assert g0["targets"] == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in mlp]
    assert g1["targets"] == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in attn]
    loaded, _, _ = load_quantized(tmp_path / "ckpt")
    assert loaded.model.layers[1].mlp.up_proj.qweight.fmt == "int4_asym"
    assert loaded.model.layers[1].self_attn.o_proj.qweight.fmt == "fp8_e4m3"
    assert torch.equal(loaded(c.ids).logits.detach(), c.logits())


def test_recipe_targets_written_as_given_only_when_unambiguous(quantize, tmp_path):
    groups = [SchemeGroup((r"re:.*mlp\.down_proj$",), W("int4", "group", 32)),
              SchemeGroup((r"re:.*_proj$",), W("int4_asym", "group", 32))]
    c = quantize(groups)  # down_proj matches both regexes under ct's rules: explicit names
    write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "a")
    qcfg = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    c = quantize([SchemeGroup(ALL, W("int4", "group", 32))])
    write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "b")
    qcfg = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["targets"] == ["Linear"] and qcfg["ignore"] == ["lm_head"]
