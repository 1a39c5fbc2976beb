"""engine/verify_order.py: scored in the engine's order (batched prefill, then one token per step through a
KV cache, RoPE and attention rounded as the engine rounds them), the checkpoint's simulated model gives the
BF16 W4A4 engine's logits at every step, so the engine passes, while an engine of another model still fails;
``auto`` picks engine order only for 4-bit activations, and falls back or refuses where it is unsupported."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import build, save_tiny

from quantlab.checkpoint.reader import load_quantized
from quantlab.engine.config import RuntimeOptions
from quantlab.engine.manifest import verify_engine
from quantlab.engine.runner import ModelRunner
from quantlab.engine.verify_order import (choose_order, engine_logits, engine_rounding, reference_logits,
                                          verify_in_engine_order)
from quantlab.errors import QuantlabError
from quantlab.recipe.schema import ActivationScheme, KVCacheScheme, SchemeGroup, WeightScheme

NVFP4 = [SchemeGroup(("Linear",), WeightScheme("nvfp4", "group", 16), ActivationScheme("nvfp4", "group", True))]
W4A16 = [SchemeGroup(("Linear",), WeightScheme("int4", "group", 32))]
FP8_KV = KVCacheScheme("fp8_e4m3", "tensor")
IDS = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(3)).tolist()
PROMPTS = [IDS[:8], IDS[8:16], IDS[16:24], IDS[24:32]]


@pytest.fixture(scope="module")
def w4a4(make_checkpoint, tmp_path_factory):
    """(checkpoint, its BF16 engine) of the tiny Llama with NVFP4 weights and activations."""
    ckpt = make_checkpoint(NVFP4)
    eng = tmp_path_factory.mktemp("w4a4") / "eng"
    build(ckpt, eng, dtype="bfloat16")
    return ckpt, eng


def test_reference_in_engine_order_gives_the_bf16_w4a4_engines_logits(w4a4):
    import transformers.models.llama.modeling_llama as llama

    ckpt, eng = w4a4
    engine = ModelRunner(eng, verify_engine(eng), RuntimeOptions(), "cpu")
    tokens, got = engine_logits(engine, PROMPTS[:3], 6)
    model, _, _ = load_quantized(ckpt, torch.bfloat16)
    rope = llama.apply_rotary_pos_emb
    with torch.no_grad(), engine_rounding() as attention:
        model.set_attn_implementation(attention)
        want = reference_logits(model, PROMPTS[:3], tokens)
    assert llama.apply_rotary_pos_emb is rope
    assert got.shape == want.shape == (3, 6, 256)
    assert torch.equal(want.argmax(-1), tokens)
    # One BF16 rounding step of the largest logit: the engine's lm_head multiplies only the sampled rows, the
    # reference's every row, and the CPU's BF16 GEMM may round a row differently with the row count.
    torch.testing.assert_close(got, want, atol=2 ** -7 * want.abs().max().item(), rtol=0)


def test_w4a4_engine_passes_in_engine_order_and_another_models_engine_fails(w4a4, tmp_path):
    ckpt, eng = w4a4
    own = verify_in_engine_order(eng, ckpt, max_tokens=8, prompts=PROMPTS)
    assert own.reference_order == "engine" and "reference order: engine" in own.summary()
    assert own.within_gap == 1.0 and own.top1 == 1.0
    save_tiny(tmp_path / "other", seed=7)
    build(tmp_path / "other", tmp_path / "other-eng", dtype="bfloat16")
    other = verify_in_engine_order(tmp_path / "other-eng", ckpt, max_tokens=8, prompts=PROMPTS)
    assert other.within_gap < 0.9, other.summary()


def test_auto_takes_engine_order_only_for_4bit_activations(w4a4, make_checkpoint, tiny_model):
    ckpt, eng = w4a4
    assert choose_order("auto", eng, ckpt) == ("engine", None)
    assert choose_order("auto", eng, make_checkpoint(W4A16)) == ("sequence", None)
    assert choose_order("auto", eng, tiny_model[0]) == ("sequence", None)
    assert choose_order("sequence", eng, ckpt) == ("sequence", None)


def test_unsupported_engine_order_falls_back_under_auto_and_is_refused_when_asked(w4a4, make_checkpoint):
    eng = w4a4[1]
    fp8_kv = make_checkpoint(NVFP4, kv=FP8_KV)
    order, note = choose_order("auto", eng, fp8_kv)
    assert order == "sequence" and note.count("\n") == 0 and "FP8" in note
    with pytest.raises(QuantlabError, match="^--reference-order engine cannot be used here: .* FP8, which"):
        choose_order("engine", eng, fp8_kv)
    with pytest.raises(QuantlabError, match="--reference-order must be one of sequence, engine, auto"):
        choose_order("tokens", eng, fp8_kv)


def test_prompts_that_do_not_fit_one_batch_are_refused(w4a4):
    ckpt, eng = w4a4
    with pytest.raises(QuantlabError, match="do not fit one batch of this engine"):
        verify_in_engine_order(eng, ckpt, max_tokens=8, prompts=PROMPTS * 3)  # 12 > max_batch_size 8
