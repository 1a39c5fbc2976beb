"""Fused RMSNorm(+residual) and SwiGLU kernels against their references, interpreted (RoPE: test_rope_kv.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def k(interpreted):
    return {name: interpreted(f"quantlab.engine.kernels.{name}") for name in ("norm", "activation")}


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_reference(k, residual):
    x = torch.randn(5, 100, dtype=torch.float16) * 3  # 100 is not a power of two: masked tail
    r = torch.randn(5, 100, dtype=torch.float16) if residual else None
    w = torch.randn(100, dtype=torch.float16)
    out, h = k["norm"].rms_norm_triton(x, w, 1e-5, r)
    want, want_h = k["norm"].rms_norm_ref(x, w, 1e-5, r)
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)  # one fp16 ulp where rsqrt rounds apart


def test_silu_and_mul_matches_reference(k):
    x = torch.randn(3, 2 * 1100, dtype=torch.float16) * 4  # two column blocks, the second partial
    torch.testing.assert_close(k["activation"].silu_and_mul_triton(x), k["activation"].silu_and_mul_ref(x),
                               rtol=2e-3, atol=2e-3)
