"""W8A8: FP8 (E4M3) and INT8 weights times activations quantized per token (or per tensor) on the fly.

Build-time layout (``pack_w8``): ``weight`` [N, K] codes (float8_e4m3fn or int8), contiguous, so ``weight.t()``
is the column-major [K, N] operand cuBLASLt/CUTLASS want; ``weight_scale`` float32 [1, N] (a per-tensor scale
is broadcast to every channel at build time); ``input_scale`` float32 [1] for static activations.

Run time: one Triton pass per row computes the token's amax and writes its codes and scale
(``quantize_rows``; a static scale skips the amax; before q/k/v and gate/up the RMSNorm's kernel does it,
``norm.rms_norm_quant``, through the same ``encode_row``), then the GEMM on those codes (``*_matmul_codes``):
- FP8: ``torch._scaled_mm`` with row-wise scales (per-token x per-channel) and the bias in its epilogue, or,
  where ``tune_fp8`` measured it faster on the build's GPU (small M, where cuBLASLt's FP8 GEMM is no
  faster than a BF16 GEMV over twice the bytes), the Triton GEMM below with FP8 operands or, at M <= 4, the
  split-K GEMV of ``gemv``;
- INT8: a Triton int8 tensor-core GEMM whose epilogue applies both scales and the bias (``int8_matmul_codes``), or
  at M <= 4, where ``tune_int8`` measured it faster, the GEMV (same numerics, bit-identical results).
The rounding is ``quantlab.formats``' (scale = amax / qmax, a zero scale replaced by float32's tiny,
FP8 round-to-nearest-even with saturation, INT8 round-half-even and clamp), and ``x / scale`` is an IEEE
division (``tl.div_rn``; Triton's ``/`` is an approximate division on the GPU, which the H200 run of
2026-12-02 caught as INT8 codes one off at ties), so codes equal the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantlab.formats.spec import get_spec

from . import gemv
from .timing import agrees, copies_for, fastest, m_bucket, tuned_for

_TINY = torch.finfo(torch.float32).tiny


def pack_w8(codes: torch.Tensor, scale: torch.Tensor, per_tensor: bool) -> dict[str, torch.Tensor]:
    """The kernel's tensors from a per-channel or per-tensor QTensor's codes [N, K] and scale."""
    n = codes.shape[0]
    s = scale.float().reshape(1, 1).expand(1, n) if per_tensor else scale.float().reshape(1, n)
    return {"weight": codes.contiguous(), "weight_scale": s.contiguous()}


@triton.jit
def round_e4m3(v):
    """``v`` (float32, |v| <= 448) rounded to the nearest E4M3 value, ties to even, still float32.

    The cast to float8 then only reinterprets an exact value; the rounding no longer depends on how a
    target (or Triton's CPU interpreter, whose float8 cast mis-rounds) implements the conversion.
    Normals keep 3 of float32's 23 mantissa bits (add half an E4M3 step plus the kept lsb, clear the
    rest); below 2**-6 the E4M3 grid is uniform with step 2**-9, so adding 1.5 * 2**14 rounds to it.
    """
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 == ~0xFFFFF
    normal = bits.to(tl.float32, bitcast=True)
    sub = (v + 24576.0) - 24576.0
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def _encode(v, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """Codes (still float32) of ``v = x / scale``: INT8 round-half-even and clamp, or E4M3 with saturation."""
    if IS_INT:
        # Adding and subtracting 1.5 * 2**23 rounds half to even (torch.round) for |v| < 2**22.
        out = (tl.minimum(tl.maximum(v, -QMAX - 1), QMAX) + 12582912.0) - 12582912.0
    else:
        out = round_e4m3(tl.minimum(tl.maximum(v, -QMAX), QMAX))
    return out


@triton.jit
def _token_scale(amax, QMAX: tl.constexpr, TINY: tl.constexpr):
    """A token's scale from its amax: ``amax / qmax`` (IEEE division), a zero scale replaced by float32's tiny."""
    scale = tl.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
    return tl.where(scale == 0, TINY, scale)


@triton.jit
def encode_row(xf, static_ptr, QMAX: tl.constexpr, TINY: tl.constexpr, IS_INT: tl.constexpr, STATIC: tl.constexpr):
    """(codes still float32, scale) of one whole row held in registers (float32, masked lanes 0): the scale is
    the token's (its amax) or, with ``STATIC``, the per-tensor one at ``static_ptr``. Shared by
    ``_quantize_rows_kernel`` and the RMSNorm that quantizes its output (``norm.rms_norm_quant``)."""
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        scale = _token_scale(tl.max(tl.abs(xf), axis=0), QMAX, TINY)
    return _encode(tl.div_rn(xf, scale), QMAX, IS_INT), scale


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_x, QMAX: tl.constexpr, TINY: tl.constexpr,
                          IS_INT: tl.constexpr, STATIC: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program. ``ONE_PASS`` (the row fits in BLOCK): the row is read once and kept in
    registers; otherwise a first pass finds the amax and a second (hitting L2) quantizes."""
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        xf = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        codes, scale = encode_row(xf, static_ptr, QMAX, TINY, IS_INT, STATIC)
        if not STATIC:
            tl.store(s_ptr + row, scale)
        tl.store(q_ptr + row * K + offs, codes.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        if STATIC:
            scale = tl.load(static_ptr)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
            scale = _token_scale(tl.max(amax, axis=0), QMAX, TINY)
            tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            v = tl.div_rn(tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32), scale)
            tl.store(q_ptr + row * K + offs, _encode(v, QMAX, IS_INT).to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, fmt: str, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [M, K], scales [M, 1] float32) of ``x`` per token, or with a static per-tensor scale."""
    spec = get_spec(fmt)
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=spec.element_dtype)
    scales = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    static = static_scale.float().reshape(1) if static_scale is not None else scales
    one_pass = k <= 16384
    block = triton.next_power_of_2(k) if one_pass else 4096
    _quantize_rows_kernel[(m,)](x, q, scales, static, k, x.stride(0), float(spec.qmax), _TINY, spec.family == "int",
                                static_scale is not None, one_pass, BLOCK=block,
                                num_warps=max(4, min(16, block // 512)))
    if static_scale is not None:
        scales = static.reshape(1, 1).expand(m, 1).contiguous()
    return q, scales


def fp8_matmul_codes(q: torch.Tensor, sa: torch.Tensor, tensors: dict[str, torch.Tensor], configs: dict | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """FP8 W8A8 product in ``dtype`` of activations already quantized (E4M3 codes [M, K], scales [M, 1]):
    row-wise ``_scaled_mm`` or, where ``tune_fp8`` chose it for this M bucket (``configs``), the Triton GEMM or
    the GEMV."""
    cfg = tuned_for(configs, q.shape[0]) if configs else None
    if cfg is not None and cfg.get("path") == "triton":
        return w8a8_gemm(q, sa, tensors["weight"], tensors["weight_scale"], tensors.get("bias"), dtype, cfg)
    if cfg is not None and cfg.get("path") == "gemv":
        return gemv.gemv_w8(q, sa, tensors["weight"], tensors["weight_scale"], tensors.get("bias"), dtype, cfg)
    return _scaled_mm(q, sa, tensors["weight"], tensors["weight_scale"], tensors.get("bias"), dtype)


def _scaled_mm(q, sa, w, sw, bias, dtype):
    return torch._scaled_mm(q, w.t(), scale_a=sa, scale_b=sw, bias=bias, out_dtype=dtype)


@triton.jit
def _w8a8_mm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                    FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """``(a @ b^T) * sa * sb (+ bias)`` for 8-bit codes: int8 (int32 accumulation, exact) or, with ``FP8``,
    E4M3 codes passed as their uint8 bits (a masked float8 load has no ``other`` in the interpreter) and
    accumulated in float32."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-tiles share their column tiles while those are in L2.
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * K + kk[None, :], mask=(offs_m < M)[:, None] & (kk < K)[None, :], other=0)
        b = tl.load(b_ptr + offs_n[None, :] * K + kk[:, None], mask=(offs_n < N)[None, :] & (kk < K)[:, None], other=0)
        if FP8:
            a, b = a.to(tl.float8e4nv, bitcast=True), b.to(tl.float8e4nv, bitcast=True)
        acc += tl.dot(a, b)
    mask_m, mask_n = offs_m < M, offs_n < N
    out = acc.to(tl.float32) * tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    out = out * tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def w8a8_gemm(q: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
              dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """``(q @ w^T) * sa * sw (+ bias)`` in ``dtype``: 8-bit codes [M, K] and [N, K] (int8, int32 accumulation;
    or float8_e4m3fn, float32 accumulation)."""
    m, k = q.shape
    n = w.shape[0]
    cfg = config or w8a8_candidates(m)[0]
    out = torch.empty(m, n, device=q.device, dtype=dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    fp8 = q.dtype == torch.float8_e4m3fn
    if fp8:
        q, w = q.view(torch.uint8), w.view(torch.uint8)
    _w8a8_mm_kernel[grid](q, w, sa, sw, sw if bias is None else bias, out, m, n, k, bias is not None, fp8,
                          cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], 8, num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"])
    return out


def int8_matmul_codes(q: torch.Tensor, sa: torch.Tensor, tensors: dict[str, torch.Tensor], configs: dict | None,
                      dtype: torch.dtype) -> torch.Tensor:
    """INT8 W8A8 product in ``dtype`` of activations already quantized (int8 codes [M, K], scales [M, 1]): the
    Triton GEMM, its epilogue dequantizing, or at M <= 4 the GEMV where ``tune_int8`` chose it. ``configs``:
    ``tune_int8``'s choices by M bucket (or one config dict), else the fixed default."""
    cfg = configs if configs is None or "BLOCK_M" in configs else tuned_for(configs, q.shape[0])
    if cfg is not None and cfg.get("path") == "gemv":
        return gemv.gemv_w8(q, sa, tensors["weight"], tensors["weight_scale"], tensors.get("bias"), dtype, cfg)
    return w8a8_gemm(q, sa, tensors["weight"], tensors["weight_scale"], tensors.get("bias"), dtype, cfg)


def w8a8_candidates(m: int) -> list[dict]:
    """Triton GEMM launch configs timed for an M bucket (``tune_int8``, ``tune_fp8``); the first is the default."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    if m <= 16:
        rows = ((16, 64, 128, 4, 4), (16, 128, 128, 4, 4))
    elif m <= 256:
        rows = ((64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (64, 64, 128, 4, 4), (128, 64, 128, 4, 4))
    else:
        rows = ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3))
    return [dict(zip(keys, r)) for r in rows]


def tune_int8(tensors: dict[str, torch.Tensor], ms=(1, 4, 16, 256, 1024, 4096), timings: list | None = None) -> dict:
    """Time ``w8a8_candidates`` (and, at M <= ``gemv.MAX_M``, the GEMV's, stored with "path": "gemv") on this
    GPU per M bucket (build time): {str(bucket): config}."""
    return _tune(tensors, "int8", ms, timings)


def tune_fp8(tensors: dict[str, torch.Tensor], ms=(1, 4, 16, 256, 1024, 4096), timings: list | None = None) -> dict:
    """``_scaled_mm`` against the Triton GEMM's configs on this GPU per M bucket (build time):
    {str(bucket): {"path": "scaled_mm"}, a Triton config with "path": "triton" or, at M <= ``gemv.MAX_M``, a
    GEMV config with "path": "gemv"}. A Triton or GEMV config is eligible only if its product agrees with
    ``_scaled_mm``'s on the tuning inputs (all accumulate in float32; only the order of the sums differs)."""
    return _tune(tensors, "fp8_e4m3", ms, timings)


def _tune(tensors: dict[str, torch.Tensor], fmt: str, ms, timings: list | None) -> dict:
    n, k = tensors["weight"].shape
    copies = [tensors["weight"]] + [tensors["weight"].clone() for _ in range(copies_for(n * k) - 1)]
    sw = tensors["weight_scale"]
    choice = {}
    for m in ms:
        sa = torch.rand(m, 1, device=sw.device)
        if fmt == "int8":
            q = torch.randint(-128, 128, (m, k), device=sw.device, dtype=torch.int8)
            runs = [(cfg, lambda w, cfg=cfg: w8a8_gemm(q, sa, w, sw, None, torch.bfloat16, cfg)) for cfg in w8a8_candidates(m)]
        else:
            q = (torch.randn(m, k, device=sw.device) * 64).to(torch.float8_e4m3fn)
            want = _scaled_mm(q, sa, copies[0], sw, None, torch.bfloat16).float()  # row-wise scales: BF16 out only
            runs = [({"path": "scaled_mm"}, lambda w: _scaled_mm(q, sa, w, sw, None, torch.bfloat16))]
            for cfg in w8a8_candidates(m):
                run = lambda w, cfg=cfg: w8a8_gemm(q, sa, w, sw, None, torch.bfloat16, cfg)
                if agrees(run, copies[0], want):
                    runs.append(({"path": "triton", **cfg}, run))
        if m <= gemv.MAX_M:  # the split-K GEMV, eligible where it agrees with the first candidate
            want = runs[0][1](copies[0]).float()
            sms = torch.cuda.get_device_properties(sw.device).multi_processor_count
            for cfg in gemv.gemv_candidates(m, n, k, 1, sms):
                run = lambda w, cfg=cfg: gemv.gemv_w8(q, sa, w, sw, None, torch.bfloat16, cfg)
                if agrees(run, copies[0], want):
                    runs.append(({"path": "gemv", **cfg}, run))
        choice[str(m_bucket(m))] = fastest(runs, copies, m, timings)
    return choice
