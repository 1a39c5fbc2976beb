"""scripts/verify_engine_order.py: scored in the engine's order (batched prefill, then one token per step
through a KV cache, RoPE and attention rounded as the engine rounds them), the checkpoint's simulated model
gives the BF16 W4A4 engine's logits at every step, and the patch it applies to transformers is undone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from engine_helpers import build

from quantlab.checkpoint.reader import load_quantized
from quantlab.engine.config import RuntimeOptions
from quantlab.engine.manifest import verify_engine
from quantlab.engine.runner import ModelRunner
from quantlab.recipe.schema import ActivationScheme, SchemeGroup, WeightScheme

NVFP4 = [SchemeGroup(("Linear",), WeightScheme("nvfp4", "group", 16), ActivationScheme("nvfp4", "group", True))]
IDS = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(3)).tolist()


def _script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "verify_engine_order.py"
    spec = importlib.util.spec_from_file_location("verify_engine_order", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_in_engine_order_gives_the_bf16_w4a4_engines_logits(make_checkpoint, tmp_path):
    import transformers.models.llama.modeling_llama as llama

    script = _script()
    ckpt = make_checkpoint(NVFP4)
    build(ckpt, tmp_path / "eng", dtype="bfloat16")
    prompts = [IDS[:8], IDS[8:16], IDS[16:24]]
    engine = ModelRunner(tmp_path / "eng", verify_engine(tmp_path / "eng"), RuntimeOptions(), "cpu")
    tokens, got = script.engine_logits(engine, prompts, 6)
    model, _, _ = load_quantized(ckpt, torch.bfloat16)
    rope = llama.apply_rotary_pos_emb
    with torch.no_grad(), script.engine_rounding() as attention:
        model.set_attn_implementation(attention)
        want = script.reference_logits(model, prompts, tokens)
    assert llama.apply_rotary_pos_emb is rope
    assert got.shape == want.shape == (3, 6, 256)
    assert torch.equal(want.argmax(-1), tokens)
    # One BF16 rounding step of the largest logit: the engine's lm_head multiplies only the sampled rows, the
    # reference's every row, and the CPU's BF16 GEMM may round a row differently with the row count.
    torch.testing.assert_close(got, want, atol=2 ** -7 * want.abs().max().item(), rtol=0)
