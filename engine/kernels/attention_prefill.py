"""Varlen causal attention over the paged cache in Triton: prefill and chunked prefill.

Reference: ``attention.paged_attention_ref``. The queries of sequence ``i`` are its last
``query_start_loc[i+1] - query_start_loc[i]`` tokens, already written to the cache with the prefix before
them, so one loop over the sequence's pages covers "cached prefix + new chunk"; query ``j`` at position
``p`` sees keys ``0..p``.

Grid: (query blocks, q heads). Query blocks never straddle two sequences: sequence ``i`` owns the
program ids from ``query_start_loc[i] // BLOCK_M + i`` on (vLLM's numbering), found by a binary search,
so ``cdiv(T, BLOCK_M) + B`` programs cover every block without a host-side read of the lengths. A block
stops at the last key its last query sees. FP8 caches are widened in registers with the scales folded
into the softmax scale (K) and the output (V), as in the decode kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_decode import attend_block

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, qsl_ptr, ks_ptr, vs_ptr, out_ptr, qk_scale, stride_bt,
                    B, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOG_B: tl.constexpr, FP8: tl.constexpr,
                    PER_HEAD: tl.constexpr):
    pid, hq = tl.program_id(0), tl.program_id(1)
    h = hq // (HQ // HKV)
    lo = pid * 0  # int32 tensors from the start: loop-carried values keep one type
    hi = lo + B
    for _ in range(LOG_B):  # largest i with qsl[i] // BLOCK_M + i <= pid
        mid = (lo + hi) // 2
        take = tl.load(qsl_ptr + mid) // BLOCK_M + mid <= pid
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid)
    seq = lo
    q0 = tl.load(qsl_ptr + seq)
    q1 = tl.load(qsl_ptr + seq + 1)
    row0 = q0 + (pid - (q0 // BLOCK_M + seq)) * BLOCK_M
    if row0 >= q1:
        return
    ctx = tl.load(lens_ptr + seq)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < q1
    pos = ctx - (q1 - q0) + (rows - q0)
    dd = tl.arange(0, D)
    q_off = (rows * HQ + hq)[:, None] * D + dd[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask[:, None], other=0.0)
    scale = qk_scale
    v_scale = 1.0
    if FP8:
        q = q.to(tl.float16)
        scale = scale * tl.load(ks_ptr + h * PER_HEAD)
        v_scale = tl.load(vs_ptr + h * PER_HEAD)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    first = ctx - (q1 - q0) + (row0 - q0)  # position of the block's first query
    full = (first + 1) // BLOCK_N * BLOCK_N  # keys below this are visible to every row: no mask
    last = tl.minimum(ctx, first + BLOCK_M)  # keys past the block's last query are never needed
    bt_row = bt_ptr + seq * stride_bt
    for t0 in range(0, full, BLOCK_N):
        m, l, acc = attend_block(q, m, l, acc, k_ptr, v_ptr, bt_row, t0, ctx, pos, scale, h, HKV, D, PAGE,
                                 BLOCK_N, FP8, 0)
    for t0 in range(full, last, BLOCK_N):
        m, l, acc = attend_block(q, m, l, acc, k_ptr, v_ptr, bt_row, t0, ctx, pos, scale, h, HKV, D, PAGE,
                                 BLOCK_N, FP8, 2)
    out = acc * v_scale / l[:, None]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, query_start_loc: torch.Tensor, softmax_scale: float,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                  block_m: int = 128, block_n: int = 128, num_warps: int = 8, num_stages: int = 2) -> torch.Tensor:
    """Varlen causal attention (q [T, Hq, D]) over the paged caches -> [T, Hq, D].

    Default tiles: the fastest of the three timed on the H200 (2026-12-02, 4K-token prefill of 8 sequences:
    128x128 / 8 warps / 2 stages 2.88 ms, 64x64 / 4 / 2 2.92 ms, 128x64 / 8 / 3 3.67 ms).
    """
    t, hq, d = q.shape
    b = block_tables.shape[0]
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    out = torch.empty_like(q)
    kc, vc = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if fp8 else (k_cache, v_cache)
    ks = k_scale.float().reshape(-1) if fp8 else out
    vs = v_scale.float().reshape(-1) if fp8 else out
    per_head = int(fp8 and k_scale.numel() > 1)
    grid = (triton.cdiv(t, block_m) + b, hq)
    _prefill_kernel[grid](q, kc, vc, block_tables, context_lens, query_start_loc, ks, vs, out,
                          softmax_scale * _LOG2E, block_tables.stride(0), b, hq, hkv, d, page, block_m, block_n,
                          max(1, b.bit_length()), fp8, per_head, num_warps=num_warps, num_stages=num_stages)
    return out
