"""W8A8 (FP8 and INT8): activation quantization bit-exact with formats, the Triton GEMM (INT8, and FP8 where
the tuner picks it over `_scaled_mm`) equal to the reference, and the quantization fused into the RMSNorm
(`norm.rms_norm_quant`) bit-identical to the norm and the quantization run one after the other."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quantlab import formats
from quantlab.checkpoint.stream import StoredLinear
from quantlab.engine.kernels import linear
from quantlab.recipe.schema import ActivationScheme


@pytest.fixture(scope="module")
def w8(interpreted):
    return interpreted("quantlab.engine.kernels.w8a8")


@pytest.fixture(scope="module")
def fused(interpreted):
    """The interpreted norm and linear modules (linear's GEMMs must be the interpreted ones too)."""
    return interpreted("quantlab.engine.kernels.norm"), interpreted("quantlab.engine.kernels.linear")


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
        got = _matmul(w8, fmt, x.half(), tensors, granularity == "tensor", cfg)
    else:  # FP8 runs the Triton GEMM only where the tuner chose it for the M bucket
        got = _matmul(w8, fmt, x.half(), tensors, granularity == "tensor", {"1": {"path": "triton", **cfg}})
    want = linear.linear_ref(x.half().float(), spec, tensors)
    # INT8 accumulates exactly and E4M3 products are exact in float32: the only differences are the order of
    # the float sums, the float16 output rounding and the order of the scales.
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


def _matmul(w8, fmt, x, tensors, static, configs):
    """What ``linear.apply`` runs on CUDA for a W8A8 layer: the row quantization, then the product on its codes."""
    q, sa = w8.quantize_rows(x, fmt, tensors["input_scale"] if static else None)
    codes = w8.int8_matmul_codes if fmt == "int8" else w8.fp8_matmul_codes
    return codes(q, sa, tensors, configs, x.dtype)


def _bits(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype,n", [(torch.float16, 200), (torch.bfloat16, 200), (torch.float16, 6)])
def test_norm_quant_equals_norm_then_quantize_bit_for_bit(w8, fused, fmt, static, residual, dtype, n):
    # N = 200 and 6: not powers of two (masked tails), 6 below the 8-wide tile the codes are stored in; one
    # all-zero row takes the zero-scale branch; the static 0.01 clips, so saturation is exercised.
    norm, _ = fused
    x = torch.randn(5, n, dtype=dtype) * 3
    r = torch.randn(5, n, dtype=dtype) if residual else None
    x[2] = 0
    if residual:
        r[2] = 0
    w = torch.randn(n, dtype=dtype)
    static_scale = torch.tensor([0.01]) if static else None
    q, s, h = norm.rms_norm_quant(x, w, 1e-5, r, fmt, static_scale)
    normed, want_h = norm.rms_norm_triton(x, w, 1e-5, r)
    want_q, want_s = w8.quantize_rows(normed, fmt, static_scale)
    assert q.dtype == want_q.dtype and torch.equal(_bits(q), _bits(want_q))
    assert torch.equal(s, want_s) and s.shape == (5, 1)
    assert torch.equal(h, want_h)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_projection_of_norm_quant_equals_projection_after_norm(w8, fused, fmt, granularity):
    # What DecoderLayer runs on CUDA for a packed W8A8 q/k/v or gate/up, against what it ran before (the norm,
    # then linear.apply's CUDA path). FP8 takes the Triton GEMM: _scaled_mm does not exist on the CPU.
    norm, lin = fused
    spec, tensors = linear.pack(_stored(fmt, 72, 200, granularity, bias=True), torch.float16)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    spec = dataclasses.replace(spec, kernel_config=cfg if fmt == "int8" else {"1": {"path": "triton", **cfg}})
    x, r = torch.randn(7, 200, dtype=torch.float16), torch.randn(7, 200, dtype=torch.float16)
    w = torch.rand(200, dtype=torch.float16) + 0.5
    q, sa, _ = norm.rms_norm_quant(x, w, 1e-5, r, *lin.input_quantization(spec, tensors))
    got = lin.apply_quantized(q, sa, spec, tensors, x.dtype)
    want = _matmul(w8, fmt, norm.rms_norm_triton(x, w, 1e-5, r)[0], tensors, granularity == "tensor", spec.kernel_config)
    assert torch.equal(got, want)


def test_input_quantization_names_only_the_w8a8_kernels_own_scheme():
    fp8_token = linear.pack(_stored("fp8_e4m3", 8, 16), torch.float16)
    assert linear.input_quantization(*fp8_token) == ("fp8_e4m3", None)
    spec, tensors = linear.pack(_stored("int8", 8, 16, "tensor"), torch.float16)
    fmt, scale = linear.input_quantization(spec, tensors)
    assert fmt == "int8" and scale is tensors["input_scale"]
    dynamic_tensor = dataclasses.replace(spec, act_dynamic=True)  # apply runs it by the reference: no codes
    assert linear.input_quantization(dynamic_tensor, tensors) is None
    assert linear.input_quantization(*linear.pack(torch.randn(8, 16), torch.float16)) is None
