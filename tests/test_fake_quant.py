"""QuantLinear holds codes only, decodes exactly what the checkpoint stores, and never re-rounds them."""

import pytest
import torch

from quantlab import formats
from quantlab.fake_quant import QuantLinear, decoded_weights
from quantlab.observers import quantize_weight
from quantlab.recipe.schema import WeightScheme

SCHEMES = [WeightScheme("int4_asym", "group", 32), WeightScheme("nvfp4", "group", 16), WeightScheme("fp8_e4m3", "channel")]


def _linear(scheme: WeightScheme, dtype=torch.float32) -> QuantLinear:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    return QuantLinear(quantize_weight(w, scheme), torch.randn(48), None, None, dtype)


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
