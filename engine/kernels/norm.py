"""RMSNorm, optionally fused with the residual add that precedes it (Llama's pre-norm blocks)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, N, eps, stride_x, stride_r,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        h = (h.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        h = h.to(x_ptr.dtype.element_ty)  # the residual stream is rounded to the model dtype, as x + residual
        tl.store(h_ptr + row * N + offs, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / N + eps)
    normed = (hf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


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


def rms_norm(x, weight, eps, residual=None):
    """``rms_norm_ref``'s contract; one fused Triton kernel on CUDA (2-D inputs with unit inner stride)."""
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and (residual is None or residual.stride(1) == 1):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
