"""The Triton GPTQ block kernel equals its PyTorch reference bit for bit (GPU only)."""

from __future__ import annotations

import pytest
import torch

from quantlab import formats
from quantlab.algorithms import gptq_kernel
from quantlab.algorithms.gptq import GPTQParams, _upper_inverse_cholesky, accumulate_hessian, gptq_quantize
from quantlab.recipe.schema import WeightScheme

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _block(rows: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * width, width, generator=g) @ (torch.randn(width, width, generator=g) / width**0.5)
    hinv, _, _ = _upper_inverse_cholesky(accumulate_hessian(None, 0, x)[0], 0.01)
    w = torch.randn(rows, width, generator=g)
    return w.cuda(), hinv.cuda()


@pytest.mark.parametrize("fmt", ["int4", "int4_asym", "int8"])
@pytest.mark.parametrize("rows, width, start, n", [(300, 128, 0, 128), (64, 128, 64, 64), (33, 96, 5, 40)])
def test_kernel_equals_reference_bit_for_bit(fmt, rows, width, start, n):
    w1, hinv1 = _block(rows, width, seed=rows + width)
    lo, hi = w1[:, start:start + n].amin(1, keepdim=True), w1[:, start:start + n].amax(1, keepdim=True)
    qp = formats.qparams(fmt, lo, hi)
    qp = formats.QParams(fmt, qp.scale.expand(rows, n), None if qp.zero_point is None else qp.zero_point.expand(rows, n))
    outs = []
    for fn in (gptq_kernel.round_columns_ref, gptq_kernel.round_columns):
        w, q, err = w1.clone(), torch.zeros_like(w1), torch.zeros_like(w1)
        fn(w, hinv1, q, err, start, qp)
        outs.append((w, q, err))
    for ref, got in zip(*outs):
        assert torch.equal(ref, got)


@pytest.mark.parametrize("params", [GPTQParams(), GPTQParams(act_order=True), GPTQParams(block_size=96)],
                         ids=["dynamic-groups", "act-order-static-groups", "groups-straddle-blocks"])
def test_gptq_on_cuda_with_the_kernel_matches_the_reference_loop(params, monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 256, generator=g) @ (torch.randn(256, 256, generator=g) / 16)
    w, h = torch.randn(200, 256, generator=g).cuda(), accumulate_hessian(None, 0, x.cuda())[0]
    scheme = WeightScheme("int4_asym", "group", 64)
    fast, _ = gptq_quantize(w, h, scheme, params)
    monkeypatch.setattr(gptq_kernel, "round_columns", gptq_kernel.round_columns_ref)
    ref, _ = gptq_quantize(w, h, scheme, params)
    assert torch.equal(fast.codes, ref.codes) and torch.equal(fast.scale, ref.scale)
