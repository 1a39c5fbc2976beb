"""W4A16 kernels (INT4 sym/asym, NVFP4, MXFP4) against the reference on odd shapes, via the interpreter."""

from __future__ import annotations

import pytest
import torch

from quantlab import formats
from quantlab.checkpoint.stream import StoredLinear
from quantlab.engine.kernels import linear

CASES = [("int4", 32), ("int4_asym", 64), ("int4", 128), ("int4_asym", 128), ("nvfp4", 16), ("mxfp4", 32)]


def _stored(fmt, group, n, k, bias=False):
    w = torch.randn(n, k) * 0.05
    gs = None if formats.get_spec(fmt).family == "fp4" else group
    q = formats.quantize(w, fmt, group_size=gs)
    return StoredLinear("l", q, None, None, None, torch.randn(n) if bias else None)


@pytest.fixture(scope="module")
def w4(interpreted):
    return interpreted("quantlab.engine.kernels.w4a16")


@pytest.mark.parametrize("fmt,group", CASES)
def test_pack_then_reference_equals_the_checkpoints_dequantized_weight(fmt, group):
    st = _stored(fmt, group, 24, 4 * group)
    spec, tensors = linear.pack(st, torch.float32)
    assert spec.kind == "w4a16" and "qweight" in tensors
    torch.testing.assert_close(linear.dequantize_weight_ref(spec, tensors, torch.float32),
                               formats.dequantize(st.qweight), rtol=0, atol=0)


@pytest.mark.parametrize("fmt,group", CASES)
def test_triton_dequantizer_matches_formats_bit_for_bit(w4, fmt, group):
    # N=40 is not a multiple of the 128-wide tile; K = 3 groups is not a multiple of the 64-deep tile.
    st = _stored(fmt, group, 40, 3 * group if group >= 32 else 96)
    spec, tensors = linear.pack(st, torch.float16)
    got = w4.dequantize_w4(fmt, spec.group_size or spec.in_features, tensors, torch.float32)
    torch.testing.assert_close(got.t(), formats.dequantize(st.qweight), rtol=0, atol=0)


@pytest.mark.parametrize("fmt,group", CASES)
@pytest.mark.parametrize("m,split,block_m", [(1, 1, 16), (3, 4, 16), (17, 1, 16), (33, 2, 16), (1, 3, 1),
                                             (2, 1, 2), (3, 3, 2), (2, 2, 4), (3, 1, 4), (4, 3, 4)])
def test_matmul_matches_reference_on_odd_shapes(w4, fmt, group, m, split, block_m):
    # block_m 1, 2, 4: the GEMV form over that many rows (M = 3 at 2 rows: a second, half-used M tile; at 4 rows
    # a row past M that must be neither read out of bounds nor stored). K = 5 groups ends at a group edge inside
    # the last 128-deep tile.
    n, k = 72, 5 * group if group >= 32 else 80
    st = _stored(fmt, group, n, k, bias=(m % 2 == 1))
    spec, tensors = linear.pack(st, torch.float16)
    x = torch.randn(m, k, dtype=torch.float16)
    cfg = w4.Config("triton", block_m, 32, 128, split, 4, 2)  # dots of K = 128 / 8 = 16
    got = w4.w4a16_matmul(x, fmt, spec.group_size or k, tensors, cfg)
    want = linear.linear_ref(x.float(), spec, {k: v.float() if k == "bias" else v for k, v in tensors.items()})
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    # fp16 operands, float32 accumulation: ~1e-3 relative; the weights are exact in fp16 except NVFP4's /global.
    err = (got.float() - want).norm() / want.norm()
    assert err < 3e-3, err


def test_heuristic_splits_k_at_batch_one_to_fill_the_gpu(w4):
    cfg = w4.heuristic_config(1, 4096, 4096)
    assert cfg.split_k * (4096 // cfg.block_n) >= 132
    assert w4.heuristic_config(4096, 4096, 4096).path == "dequant"


def test_candidates_offer_the_gemv_form_up_to_four_rows_and_tensor_cores_from_two(w4):
    for m, rows in ((1, 1), (2, 2), (3, 4), (4, 4)):
        gemv = {c.block_m for c in w4.candidate_configs(m, 4096, 4096) if c.path == "triton" and c.block_m <= 4}
        assert gemv == {rows}
    for m in (2, 3, 4, 16):
        assert any(c.block_m == 16 for c in w4.candidate_configs(m, 4096, 4096))
    assert all(c.block_m == 16 for c in w4.candidate_configs(5, 4096, 4096))


def test_stored_config_is_used_by_m_bucket(w4):
    cfgs = {"4": {"path": "triton", "block_m": 16, "block_n": 32, "block_k": 64, "split_k": 3, "num_warps": 4,
                  "num_stages": 2}}
    cfgs["64"] = dict(cfgs["4"], block_m=64, split_k=1)
    assert w4.config_for(cfgs, 3, 64, 64).split_k == 3
    assert w4.config_for(cfgs, 5, 64, 64).block_m == 64  # the next tuned bucket up
    assert w4.config_for(cfgs, 4096, 64, 64).block_m == 64  # past the last: the largest
    assert w4.config_for(None, 5, 64, 64) == w4.heuristic_config(5, 64, 64)
