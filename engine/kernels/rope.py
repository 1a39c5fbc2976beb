"""Rotary position embedding (the "rotate half" layout of Llama in transformers) from a cos/sin table.

The table ``cos_sin`` is [max_positions, head_dim] float32: cos in the first half, sin in the second. It is
computed at load from the model's inverse frequencies (Llama-3 scaling included) by the model code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def apply_rope_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [tokens, heads, head_dim] by each token's position [tokens] (int64); ``x``'s dtype."""
    half = x.shape[-1] // 2
    cs = cos_sin[positions].unsqueeze(1)
    cos, sin = cs[..., :half], cs[..., half:]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, cs_ptr, out_ptr, stride_t, stride_h, H: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    tok = tl.program_id(0)
    hh = tl.arange(0, BLOCK_H)[:, None]
    dd = tl.arange(0, HALF)[None, :]
    mask = hh < H
    pos = tl.load(pos_ptr + tok)
    cos = tl.load(cs_ptr + pos * 2 * HALF + dd)
    sin = tl.load(cs_ptr + pos * 2 * HALF + HALF + dd)
    src = x_ptr + tok * stride_t + hh * stride_h + dd
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + (tok * H + hh) * 2 * HALF + dd
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def apply_rope_triton(x, positions, cos_sin):
    """``apply_rope_ref`` in one launch: a program per token rotates all its heads (x's inner stride 1)."""
    t, h, d = x.shape
    out = torch.empty(t, h, d, device=x.device, dtype=x.dtype)
    _rope_kernel[(t,)](x, positions, cos_sin, out, x.stride(0), x.stride(1), h, d // 2, triton.next_power_of_2(h))
    return out


def apply_rope(x, positions, cos_sin):
    """``apply_rope_ref``'s contract; a Triton kernel on CUDA."""
    if x.is_cuda and x.stride(2) == 1 and cos_sin.is_contiguous():
        return apply_rope_triton(x, positions, cos_sin)
    return apply_rope_ref(x, positions, cos_sin)
