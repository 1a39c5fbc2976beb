"""The engine's forward equals the reference model: transformers' float model for an unquantized
source, the checkpoint's fake-quant model for every weight format, whatever the chunking of the prompt."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import build, save_tiny

from quantlab.checkpoint.reader import load_quantized
from quantlab.engine.config import RuntimeOptions
from quantlab.engine.manifest import verify_engine
from quantlab.engine.runner import Chunk, ModelRunner
from quantlab.recipe.schema import ActivationScheme, KVCacheScheme, SchemeGroup, WeightScheme

IDS = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(3)).tolist()


def runner(path) -> ModelRunner:
    return ModelRunner(path, verify_engine(path), RuntimeOptions(), "cpu")


def teacher_forced(r: ModelRunner, ids: list[int], prefill: int) -> torch.Tensor:
    """Logits [len(ids) - prefill + 1, vocab] at positions prefill-1 ..: one prefill chunk, then decodes."""
    table = list(range(-(-len(ids) // r.tokens_per_block)))
    rows = [r.forward([Chunk(ids, 0, prefill, table, True)])[0]]
    for pos in range(prefill, len(ids)):
        rows.append(r.forward([Chunk(ids, pos, 1, table, True)])[0])
    return torch.stack(rows)


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("prefill", [1, 7, 24])
def test_float_engine_logits_equal_transformers(tiny_model, tiny_engine, prefill):
    got = teacher_forced(runner(tiny_engine), IDS, prefill)
    want = hf_logits(tiny_model[1], IDS)[prefill - 1:]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "llama3_rope_untied"])
def test_family_members_equal_transformers(tmp_path, arch):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch == "llama3_rope_untied":
        model = save_tiny(tmp_path / "src", seed=1, tie_word_embeddings=False, num_key_value_heads=1,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    else:
        cls, mcls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (MistralConfig, MistralForCausalLM)
        save_tiny(tmp_path / "src")  # tokenizer files
        torch.manual_seed(2)
        model = mcls(cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, initializer_range=0.2,
                         sliding_window=None, tie_word_embeddings=arch == "qwen2")).eval()
        if arch == "qwen2":  # q/k/v biases are zero at init; make them count
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.data.normal_(0, 0.5)
        model.save_pretrained(tmp_path / "src")
    build(tmp_path / "src", tmp_path / "eng")
    got = teacher_forced(runner(tmp_path / "eng"), IDS, 5)
    torch.testing.assert_close(got, hf_logits(model, IDS)[4:], atol=5e-5, rtol=1e-5)


SCHEMES = {
    "int4": ([SchemeGroup(("Linear",), WeightScheme("int4", "group", 32))], None),
    "int4_asym": ([SchemeGroup(("Linear",), WeightScheme("int4_asym", "group", 32))], None),
    "fp8_dynamic": ([SchemeGroup(("Linear",), WeightScheme("fp8_e4m3", "channel"),
                                 ActivationScheme("fp8_e4m3", "token", True))], None),
    "fp8_static_kv": ([SchemeGroup(("Linear",), WeightScheme("fp8_e4m3", "tensor"),
                                   ActivationScheme("fp8_e4m3", "tensor", False))], KVCacheScheme()),
    "int8": ([SchemeGroup(("Linear",), WeightScheme("int8", "channel"), ActivationScheme("int8", "token", True))], None),
    "nvfp4": ([SchemeGroup(("Linear",), WeightScheme("nvfp4", "group", 16), ActivationScheme("nvfp4", "group", True))],
              None),
    "nvfp4a16": ([SchemeGroup(("Linear",), WeightScheme("nvfp4", "group", 16))], None),
    "mxfp4_kv_head": ([SchemeGroup(("Linear",), WeightScheme("mxfp4", "group", 32))], KVCacheScheme(granularity="head")),
}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_quantized_engine_logits_equal_fake_quant_model(make_checkpoint, tmp_path, name):
    groups, kv = SCHEMES[name]
    ckpt = make_checkpoint(groups, kv)
    summary = build(ckpt, tmp_path / "eng")
    assert summary.config.kv_cache_dtype == ("fp8_e4m3" if kv else "bf16")
    assert all(s.kind != "dense" for n, s in summary.config.linears.items() if n != "lm_head")
    reference, _, _ = load_quantized(ckpt)
    got = teacher_forced(runner(tmp_path / "eng"), IDS, 9)
    want = hf_logits(reference, IDS)[8:]
    # Activation rounding can land a value on the other side of a rounding boundary when two float32
    # orders of summation differ, so compare with a tolerance scaled to the logits and require the argmax.
    torch.testing.assert_close(got, want, atol=2e-3 * want.abs().max().item(), rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# DecoderLayer attribute -> (transformers block, the modules it computes, in output order)
PROJECTIONS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o_proj": ("self_attn", ("o_proj",)),
               "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_w4a4_projections_equal_reference_modules_bit_for_bit(make_checkpoint, tmp_path, dtype):
    """Every NVFP4 W4A4 projection of the engine (fused q/k/v and gate/up included) computes exactly what the
    checkpoint's simulated modules compute on the same input: one activation quantizer (quantlab.formats), the
    stored weights and global scales. So any W4A4 difference between engine and reference comes from the
    inputs, i.e. from how the rest of the model orders and rounds its sums (docs/engine.md, quantlab verify)."""
    from quantlab.fake_quant import QuantLinear

    ckpt = make_checkpoint(*SCHEMES["nvfp4"])
    summary = build(ckpt, tmp_path / "eng", dtype=dtype)
    assert not summary.config.fusion, summary.config.fusion  # the fused path is the one under test
    reference, _, _ = load_quantized(ckpt, getattr(torch, dtype))
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0][0]))
             for n, m in reference.named_modules() if isinstance(m, QuantLinear)]
    hf_logits(reference, IDS)  # the real inputs of every projection (outliers and all)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(runner(tmp_path / "eng").model.layers):
        for proj, (block, parts) in PROJECTIONS.items():
            names = [f"model.layers.{i}.{block}.{p}" for p in parts]
            x = inputs[names[0]]
            with torch.no_grad():
                want = torch.cat([reference.get_submodule(n)(x) for n in names], dim=-1)
            got = getattr(layer, proj)(x)
            assert got.dtype == want.dtype and torch.equal(got, want), f"layer {i} {proj}"
