"""Split-K GEMV for 1-4 rows against weights stored [N, K] row-major: BF16/FP16 dense and W8A8 8-bit codes.

At decode (M = 1 to 4) a linear layer is a pass over its weight, and the only thing that matters is how close
that pass comes to the copy bandwidth. cuBLAS runs these as GEMVs that leave part of it unused, and cuBLASLt's
FP8 GEMM at M = 1 is no faster than the BF16 GEMV over twice the bytes (docs/performance.md). Here each
program owns a ``BLOCK_N`` slice of output rows and one K chunk: it walks its chunk in [BLOCK_N, BLOCK_K]
weight tiles, every thread loading 16 contiguous bytes of each tile row (coalesced 128-bit loads; the warps
side by side along K, so a thread's activations are its own and nothing crosses warps inside the loop),
widens them in registers (16-bit floats and E4M3 codes to float32, INT8 codes to int32) and multiply-adds
them into one [BLOCK_N, BLOCK_K] accumulator per activation row, reduced over K once at the end. The K
chunks (split-K) spread even a 4096-row layer over every SM; their partials are summed in the same launch by
the split that arrives last, in split order (``splitk``), so the result is deterministic. No tensor cores:
at M <= 4 they would idle. A larger M runs in groups of 4 rows (correct, but each group reads the weight:
the tuners offer the GEMV only up to M = 4).

- dense: ``y = x @ W^T (+ bias)``, float32 accumulation, in ``x``'s dtype; reference ``F.linear``.
- 8-bit: ``y = (q @ w^T) * sa * sw (+ bias)``, the contract and numerics of ``w8a8.w8a8_gemm``: INT8 sums
  exactly in int32 (so the result is bit-identical to it), E4M3 products are exact in float32 (only the order
  of the sums differs); the per-token and per-channel scales are applied once, in the epilogue.

Nothing here is chosen at run time: ``tune_dense`` (and ``w8a8``'s tuner for 8-bit) times ``gemv_candidates``
against cuBLAS at build time and stores the winner per M bucket; ``dense_matmul`` reads it back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .splitk import locks, sum_splits
from .timing import agrees, copies_for, fastest, m_bucket, tuned_for

MAX_M = 4  # rows a program serves (one accumulator each); the GEMV is a candidate up to this M
_CODES = {torch.bfloat16: 0, torch.float16: 0, torch.int8: 1, torch.float8_e4m3fn: 2}


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense reference: ``F.linear`` (x [M, K] and w [N, K] of one 16-bit dtype)."""
    return F.linear(x, w, bias)


@triton.jit
def _widen(v, CODES: tl.constexpr):
    """A loaded tile as the accumulator's type: int32 for INT8 codes, float32 otherwise (E4M3 arrives as bits)."""
    if CODES == 1:
        out = v.to(tl.int32)
    elif CODES == 2:
        out = v.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def _row(x_ptr, row, stride_xm, offs_k, mask_k, M, CODES: tl.constexpr):
    """Row ``row`` of the activations over ``offs_k``, widened (zero past K). A row past M (M = 3 runs as 4)
    repeats row M - 1: its sums are never stored."""
    return _widen(tl.load(x_ptr + tl.minimum(M - 1, row) * stride_xm + offs_k, mask=mask_k, other=0,
                          eviction_policy="evict_last"), CODES)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, sa_ptr, sw_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, K_CHUNK,
                 stride_xm, stride_wn, SPLIT_K, CODES: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (N slice, K split, group of ``ROWS`` rows). ``CODES``: 0 dense 16-bit, 1 INT8 codes, 2 E4M3 codes as
    uint8 bits (a masked float8 load has no ``other`` in the interpreter). ``ROWS``: M rounded up to 1, 2 or
    4 (past 4, groups of 4), one accumulator a row, so each weight tile is loaded once for all of them
    (written out rather than as a 3-D [ROWS, BLOCK_N, BLOCK_K] sum, so the weight tile stays in the layout it
    is loaded in)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0 = pid_m * ROWS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if CODES == 1:
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    else:
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
    k_start = pid_k * K_CHUNK
    for k0 in range(0, K_CHUNK, BLOCK_K):  # K_CHUNK is a multiple of BLOCK_K; only K's tail is masked
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        # The weight is read once per call: keep it from evicting the activations, which every program reads.
        w = _widen(tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                           mask=mask_n[:, None] & mask_k[None, :], other=0, eviction_policy="evict_first"), CODES)
        acc0 += _row(x_ptr, row0, stride_xm, offs_k, mask_k, M, CODES)[None, :] * w
        if ROWS > 1:
            acc1 += _row(x_ptr, row0 + 1, stride_xm, offs_k, mask_k, M, CODES)[None, :] * w
        if ROWS > 2:
            acc2 += _row(x_ptr, row0 + 2, stride_xm, offs_k, mask_k, M, CODES)[None, :] * w
            acc3 += _row(x_ptr, row0 + 3, stride_xm, offs_k, mask_k, M, CODES)[None, :] * w
    # One [ROWS, BLOCK_N] tile of the rows' sums over K.
    offs_m = row0 + tl.arange(0, ROWS)
    acc = tl.where(offs_m[:, None] == row0, tl.sum(acc0, axis=1)[None, :], 0)
    if ROWS > 1:
        acc = tl.where(offs_m[:, None] == row0 + 1, tl.sum(acc1, axis=1)[None, :], acc)
    if ROWS > 2:
        acc = tl.where(offs_m[:, None] == row0 + 2, tl.sum(acc2, axis=1)[None, :], acc)
        acc = tl.where(offs_m[:, None] == row0 + 3, tl.sum(acc3, axis=1)[None, :], acc)
    mask_m = offs_m < M
    mask = mask_m[:, None] & mask_n[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    last = pid_k >= 0  # True, as a tensor: it changes under a run-time branch below
    if SPLIT_K > 1:
        acc, last = sum_splits(acc, part_ptr, lock_ptr + pid_m * tl.num_programs(0) + pid_n, tile, mask, pid_k,
                               SPLIT_K, M * N)
    if last:
        out = acc.to(tl.float32)
        if CODES != 0:  # w8a8_gemm's epilogue, in its order (INT8 results bit-identical to it)
            out = out * tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
            out = out * tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + tile, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, w, sa, sw, bias, dtype, cfg):
    m, k = x.shape
    n = w.shape[0]
    if w.stride(1) != 1:
        raise ValueError("the GEMV reads weights [N, K] with K contiguous")
    codes = _CODES[x.dtype]
    if codes == 2:  # E4M3 as its bits (see _gemv_kernel)
        x, w = x.view(torch.uint8), w.view(torch.uint8)
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=dtype)
    block_k = cfg["BLOCK_K"]
    split = max(1, min(cfg["SPLIT_K"], triton.cdiv(k, block_k)))
    k_chunk = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_chunk)
    rows = min(MAX_M, triton.next_power_of_2(m))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, triton.cdiv(m, rows))
    part = torch.empty(split, m, n, device=x.device, dtype=torch.int32 if codes == 1 else torch.float32) \
        if split > 1 else out
    lock_buf = locks(x.device, grid[0] * grid[2]) if split > 1 else out
    _gemv_kernel[grid](x, w, sa, sw, sw if bias is None else bias, out, part, lock_buf, m, n, k, k_chunk,
                       x.stride(0), w.stride(0), split, codes, bias is not None, rows,
                       cfg["BLOCK_N"], block_k, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
         config: dict | None = None) -> torch.Tensor:
    """``x @ w^T (+ bias)`` in ``x``'s dtype: x [M, K] and w [N, K] (K contiguous) of one 16-bit dtype, float32
    accumulation. Made for M <= ``MAX_M``; a larger M runs in groups of that many rows, each reading the
    weight. ``config``: one of ``gemv_candidates`` (default: their first)."""
    cfg = config or gemv_candidates(x.shape[0], w.shape[0], x.shape[1])[0]
    return _launch(x, w, w, w, bias, x.dtype, cfg)


def gemv_w8(q: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """``(q @ w^T) * sa * sw (+ bias)`` in ``dtype``, ``w8a8.w8a8_gemm``'s contract (M as in ``gemv``): codes
    q [M, K] and w [N, K] (both int8, or both float8_e4m3fn), sa [M, 1] and sw [1, N] float32."""
    cfg = config or gemv_candidates(q.shape[0], w.shape[0], q.shape[1], elem_bytes=1)[0]
    return _launch(q, w, sa, sw, bias, dtype, cfg)


def gemv_candidates(m: int, n: int, k: int, elem_bytes: int = 2, sms: int = 132) -> list[dict]:
    """A few launch configs worth timing for M = ``m`` rows of ``elem_bytes``-byte weights (the first is the
    default).

    A thread loads 16 contiguous bytes of each of the tile's BLOCK_N weight rows a step, and the warps sit side
    by side along K (BLOCK_K = 16 / elem_bytes * 32 * num_warps): each thread's activations are then its own
    16 bytes, with no exchange between warps inside the loop (sm_90 SASS of these configs, compiled offline by
    Triton 3.9: no barrier or shared memory in the loop, 128-bit loads, no spills). BLOCK_N is the most that keeps 64
    accumulators a thread (ROWS * BLOCK_N * 16 / elem_bytes), or half that; the split gives about 4 or 8
    programs per SM (what the registers let reside at once), or 1 where the N tiles alone are that many.
    """
    rows, per = min(MAX_M, triton.next_power_of_2(m)), 16 // elem_bytes
    bn, warps = max(1, 64 // (rows * per)), 4
    out = []
    for block_n, per_sm in ((bn, 4), (bn, 8), (max(1, bn // 2), 8)):
        block_k = per * 32 * warps
        split = max(1, min(triton.cdiv(per_sm * sms, triton.cdiv(n, block_n)), triton.cdiv(k, block_k)))
        cfg = {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": warps, "num_stages": 1}
        if cfg not in out:
            out.append(cfg)
    return out


def dense_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], configs: dict | None) -> torch.Tensor:
    """A dense layer's product: the GEMV where ``tune_dense`` measured it faster for this M bucket
    (``configs``), else ``F.linear``."""
    cfg = tuned_for(configs, x.shape[0]) if x.shape[0] <= MAX_M else None
    if cfg is not None and cfg.get("path") == "gemv":
        return gemv(x, tensors["weight"], tensors.get("bias"), cfg)
    return F.linear(x, tensors["weight"], tensors.get("bias"))


def tune_dense(tensors: dict[str, torch.Tensor], ms=(1, 2, 4), timings: list | None = None) -> dict | None:
    """``F.linear`` against the GEMV candidates on this GPU per M bucket (build time; tensors on that GPU):
    {str(bucket): {"path": "cublas"} or {"path": "gemv", **config}}; None for a float32 weight (the GEMV
    takes 16-bit floats).

    A candidate is eligible only if its product agrees with ``F.linear``'s on the tuning inputs (relative
    error <= 1e-2: both accumulate in float32, in different orders). ``timings``, if given, receives every
    (m, config, milliseconds) measured.
    """
    w, bias = tensors["weight"], tensors.get("bias")
    if w.dtype not in (torch.bfloat16, torch.float16):
        return None
    n, k = w.shape
    copies = [w] + [w.clone() for _ in range(copies_for(w.numel() * w.element_size()) - 1)]
    sms = torch.cuda.get_device_properties(w.device).multi_processor_count
    choice = {}
    for m in ms:
        x = torch.randn(m, k, device=w.device, dtype=w.dtype)
        want = F.linear(x, w, bias)
        runs = [({"path": "cublas"}, lambda c: F.linear(x, c, bias))]
        for cfg in gemv_candidates(m, n, k, w.element_size(), sms):
            run = lambda c, cfg=cfg: gemv(x, c, bias, cfg)
            if agrees(run, w, want):
                runs.append(({"path": "gemv", **cfg}, run))
        choice[str(m_bucket(m))] = fastest(runs, copies, m, timings)
    return choice
