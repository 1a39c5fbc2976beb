"""W4A16: 4-bit weights (INT4 sym/asym, NVFP4, MXFP4) times 16-bit activations, one Triton family.

The weight layout is ``w4a16_layout``'s (built by ``linear.pack``); launch choices are ``w4a16_configs``'.
Kernel: ``y[m, n] = sum_k x[m, k] * w[k, n]`` with ``w`` dequantized per K-tile in registers. Small M
(decode) uses a tensor-core form (BLOCK_M=16) or, at M = 1-4, a GEMV form without tensor cores over 1, 2 or 4
rows a program (BLOCK_M = the rows), both with split-K (partials in float32, summed by the split that finishes
last, in the same launch) so a batch-1 GEMV still spreads over every SM; which of the two runs at M = 2-4 is
the tuner's choice. Larger M either runs a tiled form or dequantizes the weight once to
``x``'s dtype and calls cuBLAS (``Config.path == "dequant"``), whichever ``tune`` measured faster on the
build's GPU. The reference is ``linear.linear_ref`` (``formats.dequantize`` of ``w4a16_layout.unpack_w4``).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import triton
import triton.language as tl

from .splitk import locks, sum_splits
from .timing import copies_for, fastest, m_bucket
from .w4a16_configs import Config, candidate_configs, config_for, heuristic_config

__all__ = ["Config", "config_for", "dequantize_w4", "heuristic_config", "tune", "w4a16_matmul"]

FMT_CODES = {"int4": 0, "int4_asym": 1, "nvfp4": 2, "mxfp4": 3}


@triton.jit
def _scales(s_ptrs, g_ptr, mask, FMT: tl.constexpr, GLOBAL: tl.constexpr):
    """Float32 scales of a tile of words (one per word: a word's 8 weights share a group).

    NVFP4's global scale divides the block scale here only if ``GLOBAL`` (the dequantizer, bit-exact with
    formats); the GEMM divides its accumulator once instead. E4M3 scales arrive as their uint8 bits (a
    masked float8 load has no ``other`` in the interpreter).
    """
    if FMT == 2:
        s = tl.load(s_ptrs, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        if GLOBAL:
            s = tl.div_rn(s, tl.load(g_ptr))  # IEEE division, as formats
        return s * 16384.0  # 2**14 undoes _code's float16 placement (exact: a power of two)
    if FMT == 3:  # E8M0: 2**(e - 127) is the float32 whose exponent bits are e (e = 0, an all-zero block, gives 0)
        return (tl.load(s_ptrs, mask=mask, other=0).to(tl.int32) << 23).to(tl.float32, bitcast=True) * 16384.0
    return tl.load(s_ptrs, mask=mask, other=0).to(tl.float32)


@triton.jit
def _offsets(z_ptrs, mask, FMT: tl.constexpr):
    """What INT4 subtracts from 2**23 + stored code (``_code``): 2**23 + 8 + zero point (asym) or
    2**23 + 8, one subtraction per weight; unused for E2M1."""
    if FMT == 1:
        off = 8388616.0 + tl.load(z_ptrs, mask=mask, other=0).to(tl.float32)
    else:  # one return: Triton 3.6 rejects returns of different types even under a constexpr condition
        off = tl.full(z_ptrs.shape, 8388616.0, tl.float32)
    return off


@triton.jit
def _code(words, j: tl.constexpr, offset, FMT: tl.constexpr):
    """Float32 weights held in nibble ``j`` of each word of the tile, before the word's scale."""
    u = (words >> (4 * j)) & 0xF
    if FMT <= 1:
        # 2**23 + u read as float32: the code as a float without an int-to-float convert.
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - offset
    # E2M1 bits (s, e1 e0, m) placed as float16 (s, 00 e1 e0, m 000000000): the float16 of exponent field e
    # equals the E2M1 value (subnormal at e = 0) times 2**(1 - 15); float16's and E2M1's biases are 15 and 1.
    # ``_scales`` folded the 2**14 into the scale.
    h = (((u & 0x8) << 12) | ((u & 0x7) << 9)).to(tl.int16).to(tl.float16, bitcast=True)
    return h.to(tl.float32)


@triton.jit
def _gemv_row(t, xsum, x_ptrs, mask_r, f, XSCALE: tl.constexpr):
    """One row's share of a nibble: ``t += x * XSCALE * f`` over a tile of words, ``xsum += x`` (INT4's offset)."""
    xj = tl.load(x_ptrs, mask=mask_r, other=0.0).to(tl.float32)
    return t + (xj * XSCALE)[:, None] * f, xsum + xj


@triton.jit
def _gemv_word_sums(words, x0, x1, x2, x3, mask_r, offset, magic, S: tl.constexpr, FMT: tl.constexpr,
                    ROWS: tl.constexpr):
    """(t0, t1, t2, t3): ``t_r = sum_j x_r[k_j] * weight_j`` before the word's scale, for every word of a tile
    and each row r < ``ROWS`` (``x_r``: row r's activations at each word's nibble-0 k; rows >= ROWS are unused).
    Each nibble is decoded once and multiply-added into every row's sum, so a row costs one FFMA a weight.

    INT4 (a LOP3, an FADD and an FFMA a weight at one row: 4.9 instructions a weight over the whole sm_90 loop,
    counted in SASS compiled offline): nibble j is not shifted down: ``words & (0xF << p) | 2**23`` read as
    float32 is 2**23 + u * 2**p exactly while the nibble sits in the 23 mantissa bits (p = 4j for j <= 4;
    nibbles 5-7 are taken from ``words >> 12`` at p = 8, 12, 16, one shift per word), so one LOP3 and one FADD
    give u * 2**p, and each row's activation is pre-multiplied by 2**-p (exact). No nibble but the first sits
    at bit 0 of its source, which keeps the compiler from turning mask-after-shift back into a per-weight
    bit-field extract. The offset (8 + zero point) comes off once per word and row as ``offset * sum_j x_j``;
    ``offset`` arrives as 2**23 + 8 + zero point (``_offsets``). ``magic`` is 0x4B000000 passed at run time:
    in a register it lets and-with-mask and or-with-magic fuse into one LOP3 (an instruction takes one
    immediate). E2M1 decodes through ``_code`` (its ``xsum`` is unused, so compiled away).
    """
    hi = words >> 12  # arithmetic shift: sign bits land above bit 19, which no mask below keeps
    t0 = tl.zeros(words.shape, tl.float32)
    t1, t2, t3 = t0, t0, t0
    xsum0 = tl.zeros((words.shape[0],), tl.float32)
    xsum1, xsum2, xsum3 = xsum0, xsum0, xsum0
    for j in tl.static_range(8):
        if FMT <= 1:
            if j <= 4:
                f = ((words & (0xF << (4 * j))) | magic).to(tl.float32, bitcast=True) - 8388608.0
                xscale = 1.0 / (1 << (4 * j))
            else:
                f = ((hi & (0xF << (4 * j - 12))) | magic).to(tl.float32, bitcast=True) - 8388608.0
                xscale = 1.0 / (1 << (4 * j - 12))
        else:
            f = _code(words, j, offset, FMT)
            xscale = 1.0
        t0, xsum0 = _gemv_row(t0, xsum0, x0 + j * S, mask_r, f, xscale)
        if ROWS > 1:
            t1, xsum1 = _gemv_row(t1, xsum1, x1 + j * S, mask_r, f, xscale)
        if ROWS > 2:
            t2, xsum2 = _gemv_row(t2, xsum2, x2 + j * S, mask_r, f, xscale)
            t3, xsum3 = _gemv_row(t3, xsum3, x3 + j * S, mask_r, f, xscale)
    if FMT <= 1:
        off = offset - 8388608.0
        t0, t1, t2, t3 = t0 - off * xsum0[:, None], t1 - off * xsum1[:, None], t2 - off * xsum2[:, None], \
            t3 - off * xsum3[:, None]
    return t0, t1, t2, t3


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, K_CHUNK, stride_xm, MAGIC,
                  FMT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (N tile, M tile, K split). Each K step loads a [BLOCK_K/8, BLOCK_N] tile of words once and uses each
    nibble j against the activations of each word's nibble-j k (the reduction order over K is free), so every
    weight byte and scale is loaded once and no tile is reshaped.

    BLOCK_M >= 16 is the tensor-core form: eight dots a step, one per nibble, of the scaled weights rounded to
    ``x``'s dtype. BLOCK_M in (1, 2, 4) is the GEMV form over that many rows: no tensor cores (and no trip of
    the dequantized tile through shared memory to reach them); each nibble is decoded once and multiply-added,
    unscaled, into one [BLOCK_K/8, BLOCK_N] float32 sum per row (``_gemv_word_sums``), which is scaled once per
    word and added to that row's accumulator (acc0..acc3, written out rather than as a 3-D sum, so the tile
    stays in the layout it is loaded in; a 3-D form compiled to more instructions a weight than the tensor-core
    path); each is summed over K once at the end. The weights stay float32, not rounded to 16 bits (within the
    tolerance of the reference). A row past M (M = 3 runs as 4) re-reads row M - 1 and is never stored."""
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_K // 8)
    mask_m, mask_n = offs_m < M, offs_n < N
    GEMV: tl.constexpr = BLOCK_M <= 4
    if GEMV:
        acc0 = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        acc1, acc2, acc3 = acc0, acc0, acc0
        x0 = x_ptr + tl.minimum(M - 1, row0) * stride_xm
        x1 = x_ptr + tl.minimum(M - 1, row0 + 1) * stride_xm
        x2 = x_ptr + tl.minimum(M - 1, row0 + 2) * stride_xm
        x3 = x_ptr + tl.minimum(M - 1, row0 + 3) * stride_xm
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_CHUNK
    S = GROUP // 8  # words per group (module docstring)
    for k0 in range(0, K_CHUNK, BLOCK_K):
        w = (k_start + k0) // 8 + rr  # word index; K_CHUNK and BLOCK_K are multiples of 8
        mask_r = w * 8 < K
        mask_w = mask_r[:, None] & mask_n[None, :]
        words = tl.load(w_ptr + w[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
        g_off = (w // S)[:, None] * N + offs_n[None, :]
        scale = _scales(s_ptr + g_off, g_ptr, mask_w, FMT, False)
        offset = _offsets(z_ptr + g_off, mask_w, FMT)
        kbase = (w // S) * GROUP + w % S  # k of nibble 0; nibble j is k + j * S
        if GEMV:  # a word's 8 weights share its scale: scale each row's word sum once
            t0, t1, t2, t3 = _gemv_word_sums(words, x0 + kbase, x1 + kbase, x2 + kbase, x3 + kbase, mask_r, offset,
                                             MAGIC, S, FMT, BLOCK_M)
            acc0 += t0 * scale
            if BLOCK_M > 1:
                acc1 += t1 * scale
            if BLOCK_M > 2:
                acc2 += t2 * scale
                acc3 += t3 * scale
        else:
            for j in tl.static_range(8):
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (kbase + j * S)[None, :],
                            mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                acc += tl.dot(x, (_code(words, j, offset, FMT) * scale).to(x.dtype))
    if GEMV:  # the rows' sums over K as one [BLOCK_M, BLOCK_N] tile (row 0's broadcast, then the others')
        acc = tl.sum(acc0, axis=0)[None, :]
        if BLOCK_M > 1:
            acc = tl.where(offs_m[:, None] == row0 + 1, tl.sum(acc1, axis=0)[None, :], acc)
        if BLOCK_M > 2:
            acc = tl.where(offs_m[:, None] == row0 + 2, tl.sum(acc2, axis=0)[None, :], acc)
            acc = tl.where(offs_m[:, None] == row0 + 3, tl.sum(acc3, axis=0)[None, :], acc)
    if FMT == 2:
        acc = acc / tl.load(g_ptr)
    mask = mask_m[:, None] & mask_n[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    last = pid_k >= 0  # True, as a tensor: it changes under a run-time branch below
    if SPLIT_K > 1:  # the split that arrives last sums the partials, in this launch (splitk)
        acc, last = sum_splits(acc, part_ptr, lock_ptr + pid_m * tl.num_programs(0) + pid_n, tile, mask, pid_k,
                               SPLIT_K, M * N)
    if last:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, g_ptr, out_ptr, N, K, FMT: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    S = GROUP // 8
    w = tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (w * 8 < K)[:, None] & (offs_n < N)[None, :]
    words = tl.load(w_ptr + w[:, None] * N + offs_n[None, :], mask=mask, other=0)
    g_off = (w // S)[:, None] * N + offs_n[None, :]
    scale = _scales(s_ptr + g_off, g_ptr, mask, FMT, True)
    offset = _offsets(z_ptr + g_off, mask, FMT)
    kbase = (w // S) * GROUP + w % S
    for j in tl.static_range(8):
        v = _code(words, j, offset, FMT) * scale
        tl.store(out_ptr + (kbase + j * S)[:, None] * N + offs_n[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


def _bits(scales: torch.Tensor) -> torch.Tensor:
    return scales.view(torch.uint8) if scales.dtype == torch.float8_e4m3fn else scales


def dequantize_w4(fmt: str, group: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The weight transposed, [K, N] in ``dtype``, by the Triton dequantizer (one pass over the codes)."""
    qw, s = tensors["qweight"], _bits(tensors["scales"])
    k, n = qw.shape[0] * 8, qw.shape[1]
    out = torch.empty(k, n, device=qw.device, dtype=dtype)
    grid = (triton.cdiv(k, 128), triton.cdiv(n, 128))
    _dequant_kernel[grid](qw, s, tensors.get("zeros", s), tensors.get("global_scale", s), out, n, k,
                          FMT_CODES[fmt], group, BLOCK_N=128, BLOCK_K=128)
    return out


def w4a16_matmul(x: torch.Tensor, fmt: str, group: int, tensors: dict[str, torch.Tensor],
                 config: Config | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T (+ bias)`` -> [M, N] in ``x``'s dtype, W given by ``pack_w4``'s tensors."""
    qw, s = tensors["qweight"], _bits(tensors["scales"])
    m, k = x.shape
    n = qw.shape[1]
    cfg = config or heuristic_config(m, n, k)
    bias = tensors.get("bias")
    if cfg.path == "dequant":
        y = x @ dequantize_w4(fmt, group, tensors, x.dtype)
        return y if bias is None else y + bias
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    k_chunk = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_chunk)
    part = torch.empty(split, m, n, device=x.device, dtype=torch.float32) if split > 1 else out
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    lock_buf = locks(x.device, grid[0] * grid[1]) if split > 1 else out
    _w4a16_kernel[grid](x, qw, s, tensors.get("zeros", s), tensors.get("global_scale", s),
                        s if bias is None else bias, out, part, lock_buf, m, n, k, k_chunk, x.stride(0), 0x4B000000,
                        FMT_CODES[fmt], group, bias is not None, split, cfg.block_m, cfg.block_n, cfg.block_k,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def tune(fmt: str, group: int, tensors: dict[str, torch.Tensor], ms=(1, 2, 4, 16, 64, 256, 1024, 4096),
         dtype: torch.dtype = torch.bfloat16, timings: list | None = None) -> dict[str, dict]:
    """Time the candidates on this GPU for each M bucket; {str(bucket): Config as dict} (build time).

    GPU time from CUDA-graph replays over copies of the weight that together exceed L2 (``timing``).
    ``timings``, if given, receives every (m, config, milliseconds) measured.
    """
    k, n = tensors["qweight"].shape[0] * 8, tensors["qweight"].shape[1]
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    copies = [tensors] + [{name: t.clone() for name, t in tensors.items()} for _ in range(copies_for(nbytes) - 1)]
    choice = {}
    for m in ms:
        x = torch.randn(m, k, device=tensors["qweight"].device, dtype=dtype)
        candidates = candidate_configs(m, n, k)
        if len(candidates) == 1:  # nothing to choose between
            choice[str(m_bucket(m))] = asdict(candidates[0])
            continue
        runs = [(asdict(cfg), lambda c, cfg=cfg: w4a16_matmul(x, fmt, group, c, cfg)) for cfg in candidates]
        choice[str(m_bucket(m))] = fastest(runs, copies, m, timings)
    return choice
