"""The compiled Triton paths on a CUDA device against the references (bf16; skipped without CUDA).

bench/kernels.py runs the same checks on the H200 with poisoned outputs; these keep them in the suite for
any machine with a GPU.
"""

from __future__ import annotations

import pytest
import torch

from quantlab import formats
from quantlab.checkpoint.stream import StoredLinear
from quantlab.engine.kernels import attention, linear, norm, rope_kv, w4a16, w8a8
from quantlab.formats.fp8 import cast_saturating
from quantlab.recipe.schema import ActivationScheme

pytestmark = pytest.mark.gpu


def _rel(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("fmt,group", [("int4_asym", 128), ("int4", 32), ("nvfp4", 16), ("mxfp4", 32)])
@pytest.mark.parametrize("m", [1, 5, 40, 1100])
def test_w4a16_apply_matches_reference(fmt, group, m):
    n, k = 1008, 4096 + 128
    q = formats.quantize(torch.randn(n, k, device="cuda") * 0.02, fmt,
                         group_size=None if formats.get_spec(fmt).family == "fp4" else group)
    spec, t = linear.pack(StoredLinear("l", q, None, None, None, None), torch.bfloat16)
    t = {name: v.cuda() for name, v in t.items()}
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = linear.linear_ref(x.float(), spec, t)
    assert _rel(linear.apply(x, spec, t), want) < 1e-2
    if m == 1:  # the GEMV form, split over K
        assert _rel(w4a16.w4a16_matmul(x, fmt, spec.group_size or k, t, w4a16.Config("triton", 1, 64, 256, 3, 4, 3)),
                    want) < 1e-2


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
    # tune_fp8 picks _scaled_mm or the Triton GEMM per M bucket; whichever it picked must match the reference.
    q = formats.quantize(torch.randn(1008, 4096) * 0.02, "fp8_e4m3")
    act = ActivationScheme("fp8_e4m3", "token", True)
    spec, t = linear.pack(StoredLinear("l", q, act, None, None, torch.randn(1008)), torch.bfloat16)
    t = {name: v.cuda() for name, v in t.items()}
    configs = w8a8.tune_fp8(t, ms=(m,))
    assert len(configs) == 1 and next(iter(configs.values()))["path"] in ("scaled_mm", "triton")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    got = w8a8.fp8_matmul(x, t, False, configs)
    assert _rel(got, linear.linear_ref(x, spec, t)) < 1e-2


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
