"""Split-K GEMV (dense 16-bit and W8A8 8-bit weights) against F.linear and w8a8_gemm, via the interpreter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from quantlab.engine.kernels import linear


@pytest.fixture(scope="module")
def gv(interpreted):
    return interpreted("quantlab.engine.kernels.gemv")


@pytest.fixture(scope="module")
def w8(interpreted):
    return interpreted("quantlab.engine.kernels.w8a8")


def _cfg(split, block_n=16, block_k=64):
    """A small launch config (interpreter time), or None: the default candidate (BLOCK_N down to 1, BLOCK_K
    1024-2048, so K is a masked tail of one step)."""
    if split is None:
        return None
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4, "num_stages": 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 6])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("split", [1, 3])
def test_dense_gemv_matches_f_linear_on_odd_shapes(gv, dtype, m, bias, split):
    # N = 100 is not a multiple of BLOCK_N = 16, K = 300 not of BLOCK_K = 64; M = 3 runs as 4 rows (one
    # unused), M = 6 as two groups of 4.
    x, w = torch.randn(m, 300, dtype=dtype), torch.randn(100, 300, dtype=dtype)
    b = torch.randn(100, dtype=dtype) if bias else None
    got = gv.gemv(x, w, b, _cfg(split))
    want = gv.gemv_ref(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == dtype
    # The same float32 products summed in another order (differences ~1e-6 of the row's sum of |products|),
    # then rounded to `dtype` once: within one unit of `dtype`'s last place (eps relative), plus the order
    # differences near zero (atol).
    torch.testing.assert_close(got.float(), want, rtol=torch.finfo(dtype).eps, atol=1e-3)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_dense_gemv_default_config_on_a_strided_input(gv, m):
    # The default candidate (BLOCK_K = 1024, split for 132 SMs) on K = 1000, x a view with row stride 1200.
    x = torch.randn(m, 1200, dtype=torch.float16)[:, :1000]
    w = torch.randn(40, 1000, dtype=torch.float16)
    torch.testing.assert_close(gv.gemv(x, w).float(), F.linear(x.float(), w.float()),
                               rtol=torch.finfo(torch.float16).eps, atol=1e-3)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("split", [1, 3, None])
def test_int8_gemv_is_bit_identical_to_w8a8_gemm(gv, w8, m, bias, split):
    # Exact int32 sums and w8a8_gemm's epilogue in its order: every output bit equal.
    q = torch.randint(-128, 128, (m, 300), dtype=torch.int8)
    w = torch.randint(-128, 128, (100, 300), dtype=torch.int8)
    sa, sw = torch.rand(m, 1) * 1e-3, torch.rand(1, 100) * 1e-2
    b = torch.randn(100, dtype=torch.float16) if bias else None
    for dtype in (torch.float16, torch.float32):
        got = gv.gemv_w8(q, sa, w, sw, b, dtype, _cfg(split))
        assert torch.equal(got, w8.w8a8_gemm(q, sa, w, sw, b, dtype))


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("split", [1, 3, None])
def test_fp8_gemv_matches_w8a8_gemm(gv, w8, m, split):
    q = (torch.randn(m, 300) * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    w = (torch.randn(100, 300) * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    sa, sw, b = torch.rand(m, 1) * 1e-3, torch.rand(1, 100) * 1e-2, torch.randn(100)
    got = gv.gemv_w8(q, sa, w, sw, b, torch.float32, _cfg(split, block_k=128))  # codes cover 2 steps
    # E4M3 products are exact in float32: the sums differ only in order (float32 rounding of ~1e-7 of the sum
    # of |products| each way).
    exact = (q.double() @ w.double().t()) * sa.double() * sw.double() + b.double()
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, w8.w8a8_gemm(q, sa, w, sw, b, torch.float32), rtol=1e-5, atol=1e-4)


def test_w8a8_matmul_runs_the_gemv_where_the_tuner_chose_it(gv, w8, monkeypatch):
    calls = []
    real = w8.gemv.gemv_w8
    monkeypatch.setattr(w8.gemv, "gemv_w8", lambda *a: calls.append(a[-1]) or real(*a))
    q = torch.randint(-128, 128, (24, 64), dtype=torch.int8)
    tensors = {"weight": q, "weight_scale": torch.rand(1, 24) * 1e-2}
    x = torch.randn(2, 64, dtype=torch.float16)
    cfgs = {"1": {"path": "gemv", **_cfg(1)}, "4": {"path": "gemv", **_cfg(2)}}
    want = w8.w8a8_gemm(*w8.quantize_rows(x, "int8"), q, tensors["weight_scale"], None, torch.float16)
    assert torch.equal(w8.int8_matmul_codes(*w8.quantize_rows(x, "int8"), tensors, cfgs, x.dtype), want)
    tensors = {"weight": (q.float() / 4).to(torch.float8_e4m3fn), "weight_scale": tensors["weight_scale"]}
    w8.fp8_matmul_codes(*w8.quantize_rows(x, "fp8_e4m3"), tensors, cfgs, x.dtype)
    assert [c["SPLIT_K"] for c in calls] == [2, 2]  # the M = 2 bucket's config, both formats


def test_dense_dispatch_honours_the_stored_choice(gv, monkeypatch):
    # `linear.apply` calls `dense_matmul` on CUDA when a config is stored; here it runs under the interpreter.
    calls = []
    real = gv.gemv
    monkeypatch.setattr(gv, "gemv", lambda *a: calls.append(a[-1]) or real(*a))
    w, b = torch.randn(40, 96, dtype=torch.float16), torch.randn(40, dtype=torch.float16)
    tensors = {"weight": w, "bias": b}
    cfgs = {"1": {"path": "gemv", **_cfg(2)}, "2": {"path": "cublas"}, "4": {"path": "gemv", **_cfg(1)}}
    for m, path in ((1, "gemv"), (2, "cublas"), (3, "gemv"), (4, "gemv"), (5, "cublas")):
        calls.clear()
        x = torch.randn(m, 96, dtype=torch.float16)
        got = gv.dense_matmul(x, tensors, cfgs)
        assert len(calls) == (path == "gemv"), m
        if path == "cublas":  # past MAX_M, or where cuBLAS won: F.linear itself
            assert torch.equal(got, F.linear(x, w, b))
        else:
            assert calls[0]["SPLIT_K"] == (2 if m == 1 else 1)
    assert torch.equal(gv.dense_matmul(x, tensors, None), F.linear(x, w, b))


def test_dense_apply_without_a_gpu_is_f_linear():
    spec, tensors = linear.pack(torch.randn(40, 96), torch.float32)
    spec = dataclasses.replace(spec, kernel_config={"1": {"path": "gemv", **_cfg(1)}})
    x = torch.randn(1, 96)
    assert torch.equal(linear.apply(x, spec, tensors), F.linear(x, tensors["weight"]))


@pytest.mark.parametrize("n,k", [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (128256, 4096)])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("elem_bytes", [1, 2])
def test_candidates_fill_the_gpu_with_coalesced_tiles(gv, n, k, m, elem_bytes):
    # Llama-3-8B shapes (and the LM head) on 132 SMs.
    rows = 1 if m == 1 else 2 if m == 2 else 4
    for c in gv.gemv_candidates(m, n, k, elem_bytes):
        threads = 32 * c["num_warps"]
        assert c["BLOCK_K"] * elem_bytes == 16 * threads  # 16 bytes a thread, warps side by side along K
        assert rows * c["BLOCK_N"] * c["BLOCK_K"] <= 64 * threads  # <= 64 accumulators a thread
        tiles = -(-n // c["BLOCK_N"])
        assert tiles * c["SPLIT_K"] >= 4 * 132  # several programs per SM
        assert c["SPLIT_K"] == 1 or tiles * (c["SPLIT_K"] - 1) < 8 * 132  # no more splits than that needs
