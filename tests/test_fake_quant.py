"""QuantLinear holds codes only, decodes exactly what the checkpoint stores, and never re-rounds them;
KVCacheQuant rounds through formats with the scales it holds."""

import pytest
import torch

from quantlab import formats
from quantlab.fake_quant import KVCacheQuant, QuantLinear, activation_scales, decoded_weights
from quantlab.observers import quantize_weight
from quantlab.recipe.schema import ActivationScheme, KVCacheScheme, WeightScheme

SCHEMES = [WeightScheme("int4_asym", "group", 32), WeightScheme("nvfp4", "group", 16), WeightScheme("fp8_e4m3", "channel")]


def _linear(scheme: WeightScheme, dtype=torch.float32) -> QuantLinear:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    return QuantLinear(quantize_weight(w, scheme), torch.randn(48), None, dtype)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.format)
def test_forward_uses_the_decoded_codes_and_keeps_no_dense_tensor(scheme):
    lin = _linear(scheme)
    x = torch.randn(5, 64)
    expected = torch.nn.functional.linear(x, formats.dequantize(lin.qweight), lin.bias)
    assert torch.equal(lin(x), expected)
    held = [t for t in lin.buffers() if t.numel() == 48 * 64]
    assert held == [], "a dense weight is kept beside the codes"


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.format)
def test_decoded_weights_reuses_one_copy_and_drops_it(scheme):
    lin = _linear(scheme)
    x = torch.randn(5, 64)
    outside = lin(x)
    with decoded_weights(lin):
        assert lin.weight is lin.weight
        assert torch.equal(lin(x), outside)
    assert lin._decoded is None


def test_to_changes_the_compute_dtype_but_never_the_stored_codes_and_scales():
    lin = _linear(WeightScheme("int4_asym", "group", 32))
    before = lin.qweight
    lin.to(torch.float16)
    after = lin.qweight
    assert lin.weight.dtype == torch.float16 and lin.bias.dtype == torch.float16
    for name in ("codes", "scale", "zero_point"):
        a, b = getattr(before, name), getattr(after, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(lin.weight, formats.dequantize(before, torch.float16))


def test_to_never_re_rounds_the_input_scale():
    act = ActivationScheme("fp8_e4m3", "tensor", False)
    scale, _ = activation_scales(act, torch.tensor(3.3))
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    lin = QuantLinear(quantize_weight(w, WeightScheme("fp8_e4m3", "channel")), None, act, torch.float32, scale)
    lin.to(torch.bfloat16)
    assert lin.input_scale.dtype == torch.float32 and torch.equal(lin.input_scale, scale)


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_kv_scales_are_amax_over_448_and_round_keys_through_e4m3(granularity):
    kv = KVCacheQuant(KVCacheScheme("fp8_e4m3", granularity))
    key, value = torch.randn(2, 3, 5, 8) * 4, torch.randn(2, 3, 5, 8)
    kv.observing = True
    kv(key, value)
    kv.observing = False
    kv.set_scales_from_observed()
    dims = (0, 2, 3) if granularity == "head" else (0, 1, 2, 3)
    assert torch.equal(kv.k_scale, (key.abs().amax(dim=dims) / 448).reshape(-1))
    k, _ = kv(key, value)
    s = kv.k_scale.reshape(1, -1, 1, 1) if granularity == "head" else kv.k_scale
    assert torch.equal(k, (key / s).to(torch.float8_e4m3fn).float() * s)
