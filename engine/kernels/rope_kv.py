"""Attention's prologue in one launch: RoPE on the step's queries and keys, and the keys and values written
into the paged KV cache (FP8-quantized there when the cache is FP8).

Run as three kernels (RoPE on q, RoPE on k, the KV write), a decode step launched three small kernels per
layer and sent the rotated keys through memory once more; at batch 1 those launches, not their bytes,
are what they cost. Here one program per token reads its row of the fused q/k/v projection once.

Reference: ``rope_write_kv_ref``, which is ``rope.apply_rope_ref`` on q and k and then
``attention.write_kv_ref``; the kernel rounds exactly as they do (the rotation in float32, rounded once to
the activations' dtype; FP8 codes from that rounded key, ``formats``' E4M3 rounding), and its products
are not fused into multiply-adds, so q and the cache contents are bit-identical to the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import fp8_kv_bits, write_kv_ref
from .rope import apply_rope_ref


def rope_write_kv_ref(qkv: torch.Tensor, heads: int, kv_heads: int, positions: torch.Tensor, cos_sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotated queries [tokens, heads, head_dim] of the fused projection ``qkv`` [tokens, (heads + 2 kv_heads)
    * head_dim]; the rotated keys and the values are stored at ``slot_mapping`` (negative: not stored)."""
    d = cos_sin.shape[1]
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = apply_rope_ref(q.unflatten(-1, (heads, d)), positions, cos_sin)
    k = apply_rope_ref(k.unflatten(-1, (kv_heads, d)), positions, cos_sin)
    write_kv_ref(k, v.unflatten(-1, (kv_heads, d)), k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


@triton.jit
def _rotate(src, mask, cos, sin, HALF: tl.constexpr, dtype: tl.constexpr):
    """Both halves of the heads at ``src`` ([heads, HALF] pointers) rotated, rounded to ``dtype``."""
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _rope_write_kv_kernel(qkv_ptr, pos_ptr, cs_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr, stride_t,
                          HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                          BLOCK_HKV: tl.constexpr, FP8: tl.constexpr, PER_HEAD: tl.constexpr):
    tok = tl.program_id(0)
    D: tl.constexpr = 2 * HALF
    dd = tl.arange(0, HALF)[None, :]
    pos = tl.load(pos_ptr + tok)
    cos = tl.load(cs_ptr + pos * D + dd)
    sin = tl.load(cs_ptr + pos * D + HALF + dd)
    row = qkv_ptr + tok * stride_t
    hq = tl.arange(0, BLOCK_HQ)[:, None]
    q1, q2 = _rotate(row + hq * D + dd, hq < HQ, cos, sin, HALF, q_ptr.dtype.element_ty)
    dst = q_ptr + (tok * HQ + hq) * D + dd
    tl.store(dst, q1, mask=hq < HQ)
    tl.store(dst + HALF, q2, mask=hq < HQ)
    slot = tl.load(slot_ptr + tok)
    if slot >= 0:  # a padded token rotates its query but writes nothing
        hk = tl.arange(0, BLOCK_HKV)[:, None]
        mk = hk < HKV
        k1, k2 = _rotate(row + (HQ + hk) * D + dd, mk, cos, sin, HALF, q_ptr.dtype.element_ty)
        v_src = row + (HQ + HKV + hk) * D + dd
        v1 = tl.load(v_src, mask=mk, other=0.0)
        v2 = tl.load(v_src + HALF, mask=mk, other=0.0)
        if FP8:
            ks = tl.load(ks_ptr + hk * PER_HEAD, mask=mk, other=1.0)
            vs = tl.load(vs_ptr + hk * PER_HEAD, mask=mk, other=1.0)
            k1, k2, v1, v2 = fp8_kv_bits(k1, ks), fp8_kv_bits(k2, ks), fp8_kv_bits(v1, vs), fp8_kv_bits(v2, vs)
        cache = (slot * HKV + hk) * D + dd
        tl.store(kc_ptr + cache, k1.to(kc_ptr.dtype.element_ty), mask=mk)
        tl.store(kc_ptr + cache + HALF, k2.to(kc_ptr.dtype.element_ty), mask=mk)
        tl.store(vc_ptr + cache, v1.to(vc_ptr.dtype.element_ty), mask=mk)
        tl.store(vc_ptr + cache + HALF, v2.to(vc_ptr.dtype.element_ty), mask=mk)


def rope_write_kv_triton(qkv, heads, kv_heads, positions, cos_sin, k_cache, v_cache, slot_mapping,
                         k_scale=None, v_scale=None) -> torch.Tensor:
    """``rope_write_kv_ref`` in one launch, a program per token (``qkv``'s inner stride 1)."""
    t, d = qkv.shape[0], cos_sin.shape[1]
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    q = torch.empty(t, heads, d, device=qkv.device, dtype=qkv.dtype)
    kc, vc = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if fp8 else (k_cache, v_cache)
    ks = k_scale.float().reshape(-1) if fp8 else q
    vs = v_scale.float().reshape(-1) if fp8 else q
    _rope_write_kv_kernel[(t,)](qkv, positions, cos_sin, q, kc, vc, slot_mapping, ks, vs, qkv.stride(0), heads,
                                kv_heads, d // 2, triton.next_power_of_2(heads), triton.next_power_of_2(kv_heads),
                                fp8, int(fp8 and k_scale.numel() > 1),
                                # no fused multiply-adds: each product rounded, as torch's reference does, so
                                # the keys (and their FP8 codes) are bit-identical on the GPU too
                                enable_fp_fusion=False)
    return q


def rope_write_kv(qkv, heads, kv_heads, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale=None,
                  v_scale=None) -> torch.Tensor:
    """``rope_write_kv_ref``'s contract; the fused Triton kernel on CUDA."""
    if qkv.is_cuda and qkv.stride(1) == 1 and cos_sin.is_contiguous():
        return rope_write_kv_triton(qkv, heads, kv_heads, positions, cos_sin, k_cache, v_cache, slot_mapping,
                                    k_scale, v_scale)
    return rope_write_kv_ref(qkv, heads, kv_heads, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)
