"""Paged decode attention in Triton: one query token per sequence, split-K over long contexts.

Reference: ``attention.paged_attention_ref`` (the same contract, one query per sequence).

One program takes one (sequence, KV head, context split): it loads the query rows of *all* q-heads that
share the KV head (GQA group, padded to the 16 rows a tensor-core dot needs), walks its share of the
sequence's pages ``BLOCK_N`` tokens at a time, and keeps an online softmax, so each cached K/V byte is
read once per step. FP8 caches are loaded as bytes and widened in registers; ``k_scale`` folds into the
softmax scale and ``v_scale`` into the output, so dequantization costs no extra multiply per element.
With several splits, each writes its unnormalized output and (max, sum) to a float32 workspace and a
second kernel merges them (flash-decoding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def attend_block(q, m, l, acc, k_ptr, v_ptr, bt_row_ptr, t0, lim, pos, scale, h, HKV: tl.constexpr,
                 D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, MASK: tl.constexpr):
    """One online-softmax step over keys t0 .. t0 + BLOCK_N of one sequence: returns the new (m, l, acc).

    ``q`` is already in the dot dtype (float16 for FP8 caches: E4M3 widens to float16 in one conversion, and
    q and the probabilities have more mantissa there than in bfloat16). MASK: 0 every key is visible, 1 keys
    ``< lim``, 2 also causal (key t visible to the row at position ``pos`` iff t <= pos).
    """
    t = t0 + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, D)
    t_mask = t < lim
    blk = tl.load(bt_row_ptr + t // PAGE, mask=t_mask, other=0)
    kv_off = ((blk * PAGE + t % PAGE) * HKV + h)[:, None] * D + dd[None, :]
    if MASK == 0:
        k = tl.load(k_ptr + kv_off)
        v = tl.load(v_ptr + kv_off)
    else:
        k = tl.load(k_ptr + kv_off, mask=t_mask[:, None], other=0)
        v = tl.load(v_ptr + kv_off, mask=t_mask[:, None], other=0)
    if FP8:  # the caches arrive as their uint8 bits
        k = k.to(tl.float8e4nv, bitcast=True)
        v = v.to(tl.float8e4nv, bitcast=True)
    sc = tl.dot(q, tl.trans(k.to(q.dtype))) * scale
    if MASK == 1:
        sc = tl.where(t_mask[None, :], sc, float("-inf"))
    if MASK == 2:
        sc = tl.where(t_mask[None, :] & (t[None, :] <= pos[:, None]), sc, float("-inf"))
    m_new = tl.maximum(m, tl.max(sc, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(sc - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l, acc


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, ks_ptr, vs_ptr, out_ptr, po_ptr, pml_ptr, qk_scale,
                   stride_bt, CHUNK, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS,
                   FP8: tl.constexpr, PER_HEAD: tl.constexpr):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    start = s * CHUNK
    end = tl.minimum(ctx, start + CHUNK)
    rows = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, D)
    row_mask = rows < G
    q_off = (b * HQ + h * G + rows)[:, None] * D + dd[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask[:, None], other=0.0)
    scale = qk_scale
    v_scale = 1.0
    if FP8:
        q = q.to(tl.float16)
        scale = scale * tl.load(ks_ptr + h * PER_HEAD)
        v_scale = tl.load(vs_ptr + h * PER_HEAD)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    for t0 in range(start, end, BLOCK_N):
        m, l, acc = attend_block(q, m, l, acc, k_ptr, v_ptr, bt_ptr + b * stride_bt, t0, end, rows, scale, h,
                                 HKV, D, PAGE, BLOCK_N, FP8, 1)
    acc = acc * v_scale
    if SPLITS == 1:
        tl.store(out_ptr + q_off, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        part = (b * HQ + h * G + rows) * SPLITS + s
        tl.store(po_ptr + part[:, None] * D + dd[None, :], acc, mask=row_mask[:, None])
        tl.store(pml_ptr + part * 2, m, mask=row_mask)
        tl.store(pml_ptr + part * 2 + 1, l, mask=row_mask)


@triton.jit
def _merge_kernel(po_ptr, pml_ptr, out_ptr, SPLITS: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0)  # b * HQ + q head
    ss = tl.arange(0, SPLITS)
    dd = tl.arange(0, D)
    m = tl.load(pml_ptr + (row * SPLITS + ss) * 2)
    l = tl.load(pml_ptr + (row * SPLITS + ss) * 2 + 1)
    w = tl.exp2(m - tl.max(m, axis=0))  # an empty split has m = -inf and weighs 0
    o = tl.load(po_ptr + (row * SPLITS + ss)[:, None] * D + dd[None, :])
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * D + dd, out.to(out_ptr.dtype.element_ty))


def num_splits(batch: int, kv_heads: int, max_context: int, sms: int = 132) -> int:
    """Splits so batch x KV heads x splits fills the GPU about twice, each split >= 256 tokens (power of 2)."""
    want = triton.cdiv(2 * sms, batch * kv_heads)
    most = max(1, max_context // 256)
    return triton.next_power_of_2(max(1, min(want, most))) if want > 1 and most > 1 else 1


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, softmax_scale: float, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None, splits: int | None = None, block_n: int | None = None,
                 num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """Attention of one query per sequence (q [B, Hq, D]) over the paged caches -> [B, Hq, D].

    ``block_n`` (tokens per step) defaults to 64 for BF16 and 128 for FP8, the same bytes per step.
    """
    b, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    block_n = block_n or (128 if fp8 else 64)
    max_ctx = block_tables.shape[1] * page
    splits = splits or num_splits(b, hkv, max_ctx)
    chunk = triton.cdiv(triton.cdiv(max_ctx, splits), block_n) * block_n
    out = torch.empty_like(q)
    if splits > 1:
        po = torch.empty(b * hq * splits, d, device=q.device, dtype=torch.float32)
        pml = torch.empty(b * hq * splits, 2, device=q.device, dtype=torch.float32)
    else:
        po = pml = out
    kc, vc = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if fp8 else (k_cache, v_cache)
    ks = k_scale.float().reshape(-1) if fp8 else out
    vs = v_scale.float().reshape(-1) if fp8 else out
    per_head = int(fp8 and k_scale.numel() > 1)
    _decode_kernel[(b, hkv, splits)](q, kc, vc, block_tables, context_lens, ks, vs, out, po, pml,
                                     softmax_scale * _LOG2E, block_tables.stride(0), chunk, hq, hkv, g, d, page,
                                     max(16, triton.next_power_of_2(g)), block_n, splits, fp8, per_head,
                                     num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _merge_kernel[(b * hq,)](po, pml, out, splits, d)
    return out
