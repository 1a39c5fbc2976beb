"""The streaming reader gives each module's weight and activation scales exactly as stored, and the
same decoded weights as the fake-quant loader."""

from __future__ import annotations

import pytest
import torch

from quantlab import formats
from quantlab.checkpoint.reader import load_quantized
from quantlab.checkpoint.stream import is_checkpoint, open_checkpoint
from quantlab.checkpoint.writer import write_checkpoint
from quantlab.errors import CheckpointError
from quantlab.fake_quant import QuantLinear
from quantlab.recipe.schema import ActivationScheme, KVCacheScheme, SchemeGroup, WeightScheme

GROUPS = {
    "int4_asym": [SchemeGroup(("Linear",), WeightScheme("int4_asym", "group", 32))],
    "fp8_static": [SchemeGroup(("Linear",), WeightScheme("fp8_e4m3", "tensor"), ActivationScheme("fp8_e4m3", "tensor", False))],
    "nvfp4": [SchemeGroup(("Linear",), WeightScheme("nvfp4", "group", 16), ActivationScheme("nvfp4", "group", True))],
}


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_stream_weights_equal_fake_quant_loader(quantize, tmp_path, name):
    c = quantize(GROUPS[name], kv=KVCacheScheme() if name == "fp8_static" else None)
    path = write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt").path
    model, _, _ = load_quantized(path)
    ck = open_checkpoint(path)
    mods = ck.quantized_modules()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(mods) == sorted(linears)
    for n, m in linears.items():
        s = ck.linear(n)
        assert torch.equal(formats.dequantize(s.qweight), formats.dequantize(m.qweight))
        assert s.act == m.act
    if name == "fp8_static":
        s = ck.linear("model.layers.0.mlp.down_proj")
        assert s.input_scale is not None and s.input_scale.dtype == torch.float32
        k, v = ck.kv_scales("model.layers.0.self_attn")
        assert k.shape == (1,) and v.shape == (1,) and k.item() > 0
    assert is_checkpoint(path) and not is_checkpoint(tmp_path)


def test_stream_unknown_tensor_is_named(quantize, tmp_path):
    c = quantize(GROUPS["int4_asym"])
    path = write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt").path
    with pytest.raises(CheckpointError, match="has no tensor model.nope"):
        open_checkpoint(path).tensor("model.nope")
