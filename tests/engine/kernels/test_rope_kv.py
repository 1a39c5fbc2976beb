"""Attention's fused prologue (RoPE on q and k, the KV-cache write) against the references it replaces,
interpreted: q as ``apply_rope_ref`` gives it, the caches bit-identical to ``write_kv_ref`` of the rotated
keys, FP8 codes included, and nothing written for a padded token."""

from __future__ import annotations

import pytest
import torch

HQ, HKV, D, PAGE = 6, 3, 16, 4  # head counts that are not powers of two: masked heads


@pytest.fixture(scope="module")
def rk(interpreted):
    return interpreted("quantlab.engine.kernels.rope_kv")


def _cos_sin(positions: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(positions).float()[:, None] * inv[None, :]
    return torch.cat((ang.cos(), ang.sin()), -1)  # [positions, head_dim]: cos half | sin half


@pytest.mark.parametrize("fp8,per_head", [(False, False), (True, False), (True, True)])
def test_fused_prologue_equals_rope_then_kv_write(rk, fp8, per_head):
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(5, (HQ + 2 * HKV) * D + 8, generator=gen).half() * 4
    qkv = rows[:, :-8]  # a row stride wider than the row, as a view of a wider tensor would have
    positions = torch.tensor([0, 7, 3, 19, 1])
    slots = torch.tensor([3, 17, -1, 0, 22])
    dtype = torch.float8_e4m3fn if fp8 else torch.float16
    caches = [torch.zeros(6, PAGE, HKV, D).to(dtype) for _ in range(4)]
    ks = torch.rand(HKV if per_head else 1, generator=gen) * 0.02 + 0.002 if fp8 else None  # some saturate
    vs = torch.rand(HKV if per_head else 1, generator=gen) * 0.02 + 0.002 if fp8 else None
    cs = _cos_sin(20)
    want = rk.rope_write_kv_ref(qkv, HQ, HKV, positions, cs, caches[0], caches[1], slots, ks, vs)
    got = rk.rope_write_kv_triton(qkv, HQ, HKV, positions, cs, caches[2], caches[3], slots, ks, vs)
    assert torch.equal(got, want)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
    assert (caches[2].float() != 0).flatten(0, 1).any(-1).any(-1).sum() == 4  # the padded token wrote nothing
