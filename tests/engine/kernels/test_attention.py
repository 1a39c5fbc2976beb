"""Paged attention kernels (decode, varlen prefill) and the KV write against the references, interpreted."""

from __future__ import annotations

import pytest
import torch

from quantlab.formats.fp8 import cast_saturating

PAGE, HKV, G, D = 4, 2, 3, 16  # odd GQA group (3) and a page that does not divide the block of keys


@pytest.fixture(scope="module")
def att(interpreted):
    return interpreted("quantlab.engine.kernels.attention")


def _cache(lens, fp8, per_head, gen):
    """Random caches with each sequence's pages scattered over the pool, plus block tables."""
    max_blocks = max(-(-n // PAGE) for n in lens)
    num_blocks = sum(-(-n // PAGE) for n in lens) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, i = torch.zeros(len(lens), max_blocks, dtype=torch.int32), 0
    for s, n in enumerate(lens):
        nb = -(-n // PAGE)
        tables[s, :nb] = torch.tensor(perm[i:i + nb], dtype=torch.int32)
        i += nb
    k = torch.randn(num_blocks, PAGE, HKV, D, generator=gen).half()
    v = torch.randn(num_blocks, PAGE, HKV, D, generator=gen).half()
    ks = vs = None
    if fp8:
        ks = torch.rand(HKV if per_head else 1, generator=gen) * 0.02 + 0.005
        vs = torch.rand(HKV if per_head else 1, generator=gen) * 0.02 + 0.005
        k = cast_saturating(k.float() / ks.reshape(1, 1, -1, 1), torch.float8_e4m3fn)
        v = cast_saturating(v.float() / vs.reshape(1, 1, -1, 1), torch.float8_e4m3fn)
    return k, v, tables, ks, vs


@pytest.mark.parametrize("fp8,per_head", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_matches_reference(att, fp8, per_head, splits):
    gen = torch.Generator().manual_seed(splits + 10 * fp8 + 100 * per_head)
    lens = [1, 37, 130]
    k, v, tables, ks, vs = _cache(lens, fp8, per_head, gen)
    q = torch.randn(len(lens), HKV * G, D, generator=gen).half()
    ctx = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    want = att.paged_attention_ref(q.float(), k, v, tables, ctx, qsl, D ** -0.5, ks, vs)
    got = att.paged_decode(q, k, v, tables, ctx, D ** -0.5, ks, vs, splits=splits, block_n=16)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=5e-3)


@pytest.mark.parametrize("fp8", [False, True])
def test_varlen_prefill_over_cached_prefix_matches_reference(att, fp8):
    gen = torch.Generator().manual_seed(7 + fp8)
    lens, qlens = [5, 40, 23, 17], [5, 19, 1, 17]  # full prefill, chunk after a prefix, a decode, page edge
    k, v, tables, ks, vs = _cache(lens, fp8, True, gen)
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), HKV * G, D, generator=gen).half()
    ctx = torch.tensor(lens, dtype=torch.int32)
    want = att.paged_attention_ref(q.float(), k, v, tables, ctx, qsl, D ** -0.5, ks, vs)
    got = att.paged_prefill(q, k, v, tables, ctx, qsl, D ** -0.5, ks, vs, block_m=16, block_n=16)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=5e-3)
