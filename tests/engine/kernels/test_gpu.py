"""The compiled Triton paths on a CUDA device against the references (bf16; skipped without CUDA).

bench/kernels.py runs the same checks on the H200 with poisoned outputs; these keep them in the suite for
any machine with a GPU.
"""

from __future__ import annotations

import pytest
import torch

from quantlab import formats
from quantlab.checkpoint.stream import StoredLinear
from quantlab.engine.kernels import attention, gemv, linear, norm, rope_kv, w4a16, w8a8
from quantlab.formats.fp8 import cast_saturating
from quantlab.recipe.schema import ActivationScheme

pytestmark = pytest.mark.gpu


def _rel(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("fmt,group", [("int4_asym", 128), ("int4", 32), ("nvfp4", 16), ("mxfp4", 32)])
@pytest.mark.parametrize("m", [1, 3, 5, 40, 1100])
def test_w4a16_apply_matches_reference(fmt, group, m):
    n, k = 1008, 4096 + 128
    q = formats.quantize(torch.randn(n, k, device="cuda") * 0.02, fmt,
                         group_size=None if formats.get_spec(fmt).family == "fp4" else group)
    spec, t = linear.pack(StoredLinear("l", q, None, None, None, None), torch.bfloat16)
    t = {name: v.cuda() for name, v in t.items()}
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = linear.linear_ref(x.float(), spec, t)
    assert _rel(linear.apply(x, spec, t), want) < 1e-2
    # The GEMV form, split over K: one row at M = 1; at M = 3, 2 rows a program (a half-used second M tile) and
    # 4 rows a program (one row past M).
    for rows in {1: (1,), 3: (2, 4)}.get(m, ()):
        cfg = w4a16.Config("triton", rows, 64, 256, 3, 4, 3)
        assert _rel(w4a16.w4a16_matmul(x, fmt, spec.group_size or k, t, cfg), want) < 1e-2


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_row_quantization_is_bit_exact_with_formats(fmt):
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16) * 5
    q, s = w8a8.quantize_rows(x, fmt)
    ref = formats.quantize(x.float(), fmt)
    assert torch.equal(q.float(), ref.codes.float()) and torch.equal(s, ref.scale.float())


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("n", [200, 4096, 8192])
def test_norm_quant_equals_norm_then_quantize_bit_for_bit(fmt, static, n):
    # The compiled kernels: the fused one must round and sum as rms_norm_triton, then quantize as quantize_rows.
    x, r = (torch.randn(300, n, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(2))
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    scale = torch.tensor([0.01], device="cuda") if static else None
    for res in (None, r):
        q, s, h = norm.rms_norm_quant(x, w, 1e-5, res, fmt, scale)
        normed, want_h = norm.rms_norm_triton(x, w, 1e-5, res)
        want_q, want_s = w8a8.quantize_rows(normed, fmt, scale)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
        assert torch.equal(h, want_h)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_projection_of_norm_quant_equals_apply_after_norm(fmt):
    # DecoderLayer's fused path against the unfused one for a packed W8A8 projection, on the default kernels.
    q = formats.quantize(torch.randn(1008, 4096) * 0.02, fmt)
    act = ActivationScheme(fmt, "token", True)
    spec, t = linear.pack(StoredLinear("l", q, act, None, None, torch.randn(1008)), torch.bfloat16)
    t = {name: v.cuda() for name, v in t.items()}
    x, r = (torch.randn(40, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    codes, sa, _ = norm.rms_norm_quant(x, w, 1e-5, r, *linear.input_quantization(spec, t))
    want = linear.apply(norm.rms_norm(x, w, 1e-5, r)[0], spec, t)
    assert torch.equal(linear.apply_quantized(codes, sa, spec, t, x.dtype), want)


@pytest.mark.parametrize("m", [1, 16, 300])
def test_fp8_tuned_choice_matches_reference(m):
    # tune_fp8 picks _scaled_mm, the Triton GEMM or (M <= 4) the GEMV per M bucket; whichever it picked must
    # match the reference.
    q = formats.quantize(torch.randn(1008, 4096) * 0.02, "fp8_e4m3")
    act = ActivationScheme("fp8_e4m3", "token", True)
    spec, t = linear.pack(StoredLinear("l", q, act, None, None, torch.randn(1008)), torch.bfloat16)
    t = {name: v.cuda() for name, v in t.items()}
    configs = w8a8.tune_fp8(t, ms=(m,))
    assert len(configs) == 1 and next(iter(configs.values()))["path"] in ("scaled_mm", "triton", "gemv")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    got = w8a8.fp8_matmul_codes(*w8a8.quantize_rows(x, "fp8_e4m3"), t, configs, x.dtype)
    assert _rel(got, linear.linear_ref(x, spec, t)) < 1e-2


@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336), (6144, 4096)])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_every_gemv_candidate_matches_cublas_and_w8a8_gemm(n, k, m):
    # Llama-3-8B shapes: dense within BF16 rounding of F.linear; INT8 bit-identical to w8a8_gemm (exact int32
    # sums, same epilogue); E4M3 within float32 summation error of the exact product (not compared with the
    # tensor-core GEMM, whose FP8 accumulation on Hopper keeps fewer bits than float32).
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    for cfg in gemv.gemv_candidates(m, n, k):
        assert _rel(gemv.gemv(x, w, b, cfg), want) < 1e-2, cfg
    sa, sw = torch.rand(m, 1, device="cuda") * 1e-3, torch.rand(1, n, device="cuda") * 1e-2
    qi = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8)
    wi = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
    qf = (torch.randn(m, k, device="cuda") * 32).to(torch.float8_e4m3fn)
    wf = (torch.randn(n, k, device="cuda") * 32).to(torch.float8_e4m3fn)
    exact = (qf.double() @ wf.double().t()) * sa.double() * sw.double() + b.double()
    for cfg in gemv.gemv_candidates(m, n, k, elem_bytes=1):
        assert torch.equal(gemv.gemv_w8(qi, sa, wi, sw, b, torch.bfloat16, cfg),
                           w8a8.w8a8_gemm(qi, sa, wi, sw, b, torch.bfloat16)), cfg
        assert _rel(gemv.gemv_w8(qf, sa, wf, sw, b, torch.float32, cfg), exact) < 1e-5, cfg


def test_dense_tuned_choice_matches_f_linear():
    # tune_dense picks cuBLAS or the GEMV per M bucket (1, 2, 4); dense_matmul (what linear.apply runs) must
    # match F.linear whichever it picked, and past M = 4 it is F.linear itself.
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    t = {"weight": w, "bias": torch.randn(4096, device="cuda", dtype=torch.bfloat16)}
    configs = gemv.tune_dense(t)
    assert set(configs) == {"1", "2", "4"} and all(c["path"] in ("cublas", "gemv") for c in configs.values())
    for m in (1, 2, 3, 4, 9):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        want = torch.nn.functional.linear(x, w, t["bias"])
        assert _rel(gemv.dense_matmul(x, t, configs), want) < 1e-2
    assert torch.equal(gemv.dense_matmul(x, t, configs), want)


@pytest.mark.parametrize("fp8", [False, True])
def test_paged_decode_and_prefill_match_reference(fp8):
    page, hkv, hq, d = 16, 8, 32, 128
    lens, qlens = [300, 77, 512], [1, 77, 20]
    nb = sum(-(-n // page) for n in lens)
    k = torch.randn(nb, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ks = vs = None
    if fp8:
        ks = vs = torch.full((hkv,), 0.01, device="cuda")
        k, v = (cast_saturating(t / 0.01, torch.float8_e4m3fn) for t in (k, v))
    perm, tables, used = torch.randperm(nb).tolist(), torch.zeros(3, 32, dtype=torch.int32), 0
    for i, n in enumerate(lens):  # each sequence's pages scattered over the pool
        tables[i, :-(-n // page)] = torch.tensor(perm[used:used - (-n // page)], dtype=torch.int32)
        used -= -n // page
    tables = tables.cuda()
    ctx = torch.tensor(lens, device="cuda", dtype=torch.int32)
    for ql in ([1, 1, 1], qlens):
        qsl = torch.tensor([0] + torch.tensor(ql).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
        q = torch.randn(int(qsl[-1]), hq, d, device="cuda", dtype=torch.bfloat16)
        want = attention.paged_attention_ref(q, k, v, tables, ctx, qsl, d ** -0.5, ks, vs)
        assert _rel(attention.paged_attention(q, k, v, tables, ctx, qsl, d ** -0.5, ks, vs), want) < 2e-2


@pytest.mark.parametrize("fp8", [False, True])
def test_rope_write_kv_is_bit_identical_to_reference(fp8):
    """The fused prologue rounds as torch does (no fused multiply-adds): q and the caches equal the reference's."""
    hq, hkv, d, page = 32, 8, 128, 16
    qkv = torch.randn(50, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16) * 4
    pos = torch.randint(0, 4096, (50,), device="cuda")
    ang = torch.arange(4096, device="cuda").float()[:, None] / (10000 ** (torch.arange(0, d, 2, device="cuda") / d))
    cs = torch.cat((ang.cos(), ang.sin()), -1)
    slots = torch.randperm(8 * page, device="cuda")[:50]
    slots[7] = -1
    caches = [torch.zeros(8, page, hkv, d, device="cuda").to(torch.float8_e4m3fn if fp8 else torch.bfloat16)
              for _ in range(4)]
    sc = torch.rand(hkv, device="cuda") * 0.01 + 0.001 if fp8 else None
    want = rope_kv.rope_write_kv_ref(qkv, hq, hkv, pos, cs, caches[0], caches[1], slots, sc, sc)
    got = rope_kv.rope_write_kv(qkv, hq, hkv, pos, cs, caches[2], caches[3], slots, sc, sc)
    assert torch.equal(got, want)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(caches[:2], caches[2:]))
