"""Rotary position embedding (the "rotate half" layout of Llama in transformers) from a cos/sin table.

The table ``cos_sin`` is [max_positions, head_dim] float32: cos in the first half, sin in the second. It is
computed at load from the model's inverse frequencies (Llama-3 scaling included) by the model code. On CUDA
the rotation runs inside ``rope_kv``'s kernel, fused with the KV-cache write; this is its reference.
"""

from __future__ import annotations

import torch


def apply_rope_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [tokens, heads, head_dim] by each token's position [tokens] (int64); ``x``'s dtype."""
    half = x.shape[-1] // 2
    cs = cos_sin[positions].unsqueeze(1)
    cos, sin = cs[..., :half], cs[..., half:]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
