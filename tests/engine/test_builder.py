"""The builder writes a complete, pinned engine directory, fuses projections only where the stored format
allows, shards large weights, refuses other architectures by name, and reads its options from recipes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from engine_helpers import build

from quantlab.checkpoint.stream import open_checkpoint
from quantlab.engine import builder, layout
from quantlab.engine.config import EngineError
from quantlab.engine.llm import LLM
from quantlab.engine.sampling import SamplingParams
from quantlab.errors import RecipeError
from quantlab.recipe import load_recipe
from quantlab.recipe.schema import ActivationScheme, SchemeGroup, WeightScheme


def test_engine_directory_holds_pinned_files(tiny_engine):
    names = {p.name for p in tiny_engine.iterdir()}
    assert {"engine.json", "manifest.json", "weights.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((tiny_engine / "engine.json").read_text())
    assert config["target"] == {"device": "cpu", "compute_capability": "cpu"}
    assert config["versions"]["torch"].split(".")[0] == torch.__version__.split(".")[0]
    assert config["limits"] == {"max_batch_size": 8, "max_seq_len": 128, "max_num_tokens": 64, "tokens_per_block": 4}
    assert config["source"]["kind"] == "model" and len(config["source"]["digest"]) == 64
    assert set(json.loads((tiny_engine / "manifest.json").read_text())["files"]) == names - {"manifest.json"}
    assert "layers.1.qkv_proj" in config["linears"] and "layers.1.gate_up_proj" in config["linears"]


def test_group_and_per_tensor_scales_fuse_but_differing_global_scales_do_not(make_checkpoint, tmp_path):
    grouped = build(make_checkpoint([SchemeGroup(("Linear",), WeightScheme("int4", "group", 32))]), tmp_path / "a")
    assert "layers.0.qkv_proj" in grouped.config.linears and not grouped.config.fusion
    # Per-tensor FP8 weight scales differ between q, k and v: fused as per-channel scales, each row its part's.
    static = [SchemeGroup(("Linear",), WeightScheme("fp8_e4m3", "tensor"), ActivationScheme("fp8_e4m3", "tensor", False))]
    per_tensor = build(make_checkpoint(static), tmp_path / "b").config
    assert "layers.0.qkv_proj" in per_tensor.linears and not per_tensor.fusion
    assert per_tensor.linears["layers.0.qkv_proj"].per_tensor is False
    # Calibration gives q/k/v one NVFP4 global scale (as llm-compressor does), so they fuse; parts whose global
    # scales differ cannot, since one global scale would requantize the block scales.
    nvfp4 = make_checkpoint([SchemeGroup(("Linear",), WeightScheme("nvfp4", "group", 16))])
    assert not build(nvfp4, tmp_path / "c").config.fusion
    ckpt = open_checkpoint(nvfp4)
    parts = [(ckpt.linear(f"model.layers.0.self_attn.{p}_proj"), None) for p in "qkv"]
    parts[1] = (replace(parts[1][0], qweight=replace(parts[1][0].qweight, global_scale=parts[1][0].qweight.global_scale * 2)), None)
    assert layout.fuse(parts) == (None, "the parts' global scales differ")


def test_sharded_weights_load_to_the_same_outputs(tiny_model, tiny_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "SHARD_BYTES", 64 << 10)
    build(tiny_model[0], tmp_path / "sharded")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("weights*.safetensors"))
    assert len(shards) > 2 and "weights.safetensors" not in shards
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = LLM(tiny_engine).generate([5, 6, 7], params)[0].outputs[0].token_ids
    assert LLM(tmp_path / "sharded").generate([5, 6, 7], params)[0].outputs[0].token_ids == want


def test_other_architecture_is_refused_by_name(tiny_model, tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    for f in tiny_model[0].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"])
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match="architecture GPT2LMHeadModel is not supported"):
        build(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_limits_beyond_the_model_are_refused(tiny_model, tmp_path):
    with pytest.raises(EngineError, match="max_seq_len 4096 exceeds the model's max_position_embeddings 256"):
        build(tiny_model[0], tmp_path / "out", max_seq_len=4096)


def test_existing_output_needs_overwrite(tiny_model, tiny_engine):
    with pytest.raises(EngineError, match="exists; pass --overwrite"):
        build(tiny_model[0], tiny_engine)


def test_recipe_build_section_is_validated_with_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    body = ("model: smollm2-135m\noutput: out/x\nquantization:\n  schemes:\n    - targets: [Linear]\n"
            "      weights: {format: int4, granularity: group, group_size: 64}\nstages:\n  - rtn: {}\n")
    recipe.write_text(body + "build:\n  tokens_per_block: 32\n  kv_cache_dtype: fp8_e4m3\n")
    assert load_recipe(recipe).build.tokens_per_block == 32
    recipe.write_text(body + "build:\n  kv_cache_dtype: int4\n")
    with pytest.raises(RecipeError, match=r"r.yaml:10: build.kv_cache_dtype must be one of auto, bf16, fp8_e4m3"):
        load_recipe(recipe)
    recipe.write_text(body + "build:\n  kv_block_size: 16\n")
    with pytest.raises(RecipeError, match="build.kv_block_size is not a known key"):
        load_recipe(recipe)
    recipe.write_text(body + "build:\n  max_batch_size: 64\n  max_num_tokens: 8\n")
    with pytest.raises(RecipeError, match="max_num_tokens must be at least max_batch_size = 64"):
        load_recipe(recipe)
