"""RMSNorm, optionally fused with the residual add that precedes it (Llama's pre-norm blocks) and, before a
W8A8 projection, with the activation quantization that follows it (``rms_norm_quant``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantlab.formats.spec import get_spec

from .w8a8 import _TINY, encode_row


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual): ``h = x + residual`` (or ``x``), ``normed = h / rms(h) * weight``.

    Float32 inside, one rounding to ``x``'s dtype, as transformers' LlamaRMSNorm does.
    """
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), h


@triton.jit
def _rms_norm_row(x_ptr, r_ptr, w_ptr, h_ptr, row, offs, mask, N, eps, stride_x, stride_r, HAS_RES: tl.constexpr):
    """Row ``row`` of ``rms_norm_ref``'s ``normed`` in x's dtype, held in registers (masked lanes 0); with
    ``HAS_RES`` the new residual row is stored at ``h_ptr``."""
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        h = (h.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        h = h.to(x_ptr.dtype.element_ty)  # the residual stream is rounded to the model dtype, as x + residual
        tl.store(h_ptr + row * N + offs, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / N + eps)
    normed = (hf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (w * normed).to(x_ptr.dtype.element_ty)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, N, eps, stride_x, stride_r,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    out = _rms_norm_row(x_ptr, r_ptr, w_ptr, h_ptr, row, offs, mask, N, eps, stride_x, stride_r, HAS_RES)
    tl.store(out_ptr + row * N + offs, out, mask=mask)


@triton.jit
def _rms_norm_quant_kernel(x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, static_ptr, h_ptr, N, eps, stride_x, stride_r,
                           HAS_RES: tl.constexpr, QMAX: tl.constexpr, TINY: tl.constexpr, IS_INT: tl.constexpr,
                           STATIC: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """``_rms_norm_kernel`` whose normed row, still in registers, goes through ``quantize_rows``' numerics
    (``encode_row``) instead of to memory: the normed activations are never written or read back.

    The codes are stored as a [BLOCK // TILE, TILE] tile, not as a row: Triton's coalescing gives all the
    memory accesses of one shape the widest vector any of them allows, so a 1-byte row store would widen the
    row's 2-byte loads from 8 to 16 elements a thread, which regroups the sum of squares against
    ``_rms_norm_kernel``'s (seen in the sm_90 TTGIR of triton 3.9): rstd, hence the codes, could differ.
    """
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    out = _rms_norm_row(x_ptr, r_ptr, w_ptr, h_ptr, row, offs, mask, N, eps, stride_x, stride_r, HAS_RES)
    codes, scale = encode_row(out.to(tl.float32), static_ptr, QMAX, TINY, IS_INT, STATIC)
    if not STATIC:
        tl.store(s_ptr + row, scale)
    tile: tl.constexpr = (BLOCK // TILE, TILE)
    tl.store(q_ptr + row * N + tl.reshape(offs, tile), tl.reshape(codes.to(q_ptr.dtype.element_ty), tile),
             mask=tl.reshape(mask, tile))


def rms_norm_triton(x, weight, eps, residual=None):
    """``rms_norm_ref`` in one pass per row (x [T, N]; the add, the norm and the new residual together)."""
    t, n = x.shape
    out = torch.empty(t, n, device=x.device, dtype=x.dtype)
    h = torch.empty_like(out) if residual is not None else x
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(t,)](x, x if residual is None else residual, weight, out, h, n, eps, x.stride(0),
                           0 if residual is None else residual.stride(0), residual is not None, BLOCK=block,
                           num_warps=min(16, max(1, block // 512)))
    return out, h


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, fmt: str,
                   static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [T, N], scales [T, 1] float32, new_residual): ``rms_norm_triton`` and ``w8a8.quantize_rows`` of
    its output (``fmt``: "fp8_e4m3" or "int8"; per token, or with a static per-tensor scale) in one pass per
    row, bit-identical to the two kernels in turn. Triton only (inputs as ``rms_norm`` runs them fused)."""
    spec = get_spec(fmt)
    t, n = x.shape
    q = torch.empty(t, n, device=x.device, dtype=spec.element_dtype)
    scales = torch.empty(t, 1, device=x.device, dtype=torch.float32)
    static = static_scale.float().reshape(1) if static_scale is not None else scales
    h = torch.empty(t, n, device=x.device, dtype=x.dtype) if residual is not None else x
    block = triton.next_power_of_2(n)
    _rms_norm_quant_kernel[(t,)](x, x if residual is None else residual, weight, q, scales, static, h, n, eps,
                                 x.stride(0), 0 if residual is None else residual.stride(0), residual is not None,
                                 float(spec.qmax), _TINY, spec.family == "int", static_scale is not None, BLOCK=block,
                                 TILE=min(8, block), num_warps=min(16, max(1, block // 512)))  # rms_norm_triton's
    if static_scale is not None:
        scales = static.reshape(1, 1).expand(t, 1).contiguous()
    return q, scales, h


def runs_triton(x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether ``rms_norm`` takes its Triton kernel for these inputs (CUDA, 2-D, unit inner strides), which is
    also when ``rms_norm_quant`` may replace it."""
    return x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and (residual is None or residual.stride(1) == 1)


def rms_norm(x, weight, eps, residual=None):
    """``rms_norm_ref``'s contract; one fused Triton kernel on CUDA (2-D inputs with unit inner stride)."""
    if runs_triton(x, residual):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
