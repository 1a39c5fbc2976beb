"""W8A8 (FP8 and INT8): activation quantization bit-exact with formats, the Triton GEMM (INT8, and FP8 where
the tuner picks it over `_scaled_mm`) equal to the reference."""

from __future__ import annotations

import pytest
import torch

from quantlab import formats
from quantlab.checkpoint.stream import StoredLinear
from quantlab.engine.kernels import linear
from quantlab.recipe.schema import ActivationScheme


@pytest.fixture(scope="module")
def w8(interpreted):
    return interpreted("quantlab.engine.kernels.w8a8")


def _stored(fmt, n, k, granularity="token", per_tensor=False, bias=False):
    q = formats.quantize(torch.randn(n, k) * 0.05, fmt, per_tensor=per_tensor)
    act = ActivationScheme(fmt, granularity, dynamic=granularity == "token")
    input_scale = torch.tensor([0.02]) if granularity == "tensor" else None
    return StoredLinear("l", q, act, input_scale, None, torch.randn(n) if bias else None)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_pack_keeps_the_checkpoints_weight(fmt, per_tensor):
    st = _stored(fmt, 24, 40, per_tensor=per_tensor)
    spec, tensors = linear.pack(st, torch.float32)
    assert spec.kind == ("w8a8_fp8" if fmt == "fp8_e4m3" else "w8a8_int8")
    assert tensors["weight_scale"].shape == (1, 24)
    torch.testing.assert_close(linear.dequantize_weight_ref(spec, tensors, torch.float32),
                               formats.dequantize(st.qweight), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("k", [1000, 17000])
def test_row_quantization_gives_the_codes_and_scales_of_formats(w8, fmt, static, k):
    # K = 1000 (one pass, masked tail) and 17000 (two passes over 4096-blocks); one all-zero row takes the
    # zero-scale branch.
    x = torch.randn(5, k, dtype=torch.float16) * 3
    x[2] = 0
    static_scale = torch.tensor([0.01]) if static else None  # 0.01 clips: saturation is exercised
    q, s = w8.quantize_rows(x, fmt, static_scale)
    if static:
        want_scale = static_scale.expand(5, 1)
        want_values = formats.fake_quantize(x.float(), formats.QParams(fmt, static_scale))
    else:
        ref = formats.quantize(x.float(), fmt)
        want_scale, want_values = ref.scale, formats.dequantize(ref)
    torch.testing.assert_close(s, want_scale.float(), rtol=0, atol=0)
    torch.testing.assert_close(q.float() * s, want_values, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("granularity,bias", [("token", True), ("tensor", False)])
@pytest.mark.parametrize("m", [1, 37])
def test_triton_gemm_matches_reference_on_odd_shapes(w8, fmt, granularity, bias, m):
    st = _stored(fmt, 72, 96, granularity, bias=bias)
    spec, tensors = linear.pack(st, torch.float32)
    x = torch.randn(m, 96)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    if fmt == "int8":
        got = w8.int8_matmul(x.half(), tensors, granularity == "tensor", cfg)
    else:  # FP8 runs the Triton GEMM only where the tuner chose it for the M bucket
        got = w8.fp8_matmul(x.half(), tensors, granularity == "tensor", {"1": {"path": "triton", **cfg}})
    want = linear.linear_ref(x.half().float(), spec, tensors)
    # INT8 accumulates exactly and E4M3 products are exact in float32: the only differences are the order of
    # the float sums, the float16 output rounding and the order of the scales.
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)
