"""Attention over the paged KV cache, and the KV-cache write.

Cache layout (one tensor per layer for keys, one for values): ``[num_blocks, tokens_per_block, kv_heads,
head_dim]`` in the compute dtype (BF16) or ``float8_e4m3fn``. A token's slot is ``block * tokens_per_block +
offset``; a sequence's block table lists its blocks in order. FP8 entries hold ``round(k / k_scale)`` with
the checkpoint's calibrated scale (per tensor [1] or per KV head [kv_heads]), as vLLM stores them.

A batch is "varlen": the queries of sequence ``i`` are rows ``query_start_loc[i]:query_start_loc[i+1]``
of ``q`` and are the *last* tokens of its ``context_lens[i]`` tokens (so a decode step has one query per
sequence and a prefill chunk attends causally to the cached prefix plus itself). Every sequence in a
batch has at least one query (the scheduler never schedules zero new tokens), so a batch with as many
queries as sequences is a decode step and takes the decode kernel. A negative slot in ``slot_mapping``
(a padded token) is not written.

On CUDA: the KV write is fused with RoPE into one Triton kernel (``rope_kv``, using ``fp8_kv_bits`` below),
decode is ``attention_decode`` (split-K, GQA rows together), prefill/chunked prefill is ``attention_prefill``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantlab.formats.fp8 import cast_saturating

from .attention_decode import paged_decode
from .attention_prefill import paged_prefill
from .w8a8 import round_e4m3


def _scale_view(scale: torch.Tensor) -> torch.Tensor:
    return scale.float().reshape(1, -1, 1) if scale.numel() > 1 else scale.float().reshape(1, 1, 1)


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
    """Store new keys/values [tokens, kv_heads, head_dim] at ``slot_mapping`` [tokens] (int64) in place."""
    keep = slot_mapping >= 0
    k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    if k_cache.dtype == torch.float8_e4m3fn:
        k = cast_saturating(k.float() / _scale_view(k_scale), torch.float8_e4m3fn)
        v = cast_saturating(v.float() / _scale_view(v_scale), torch.float8_e4m3fn)
    flat_k[slot_mapping] = k.to(k_cache.dtype)
    flat_v[slot_mapping] = v.to(v_cache.dtype)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int, scale: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """A sequence's first ``length`` cached tokens, [length, kv_heads, head_dim], dequantized to ``dtype``."""
    t = cache[blocks].flatten(0, 1)[:length]
    if cache.dtype == torch.float8_e4m3fn:
        return (t.float() * _scale_view(scale)).to(dtype)
    return t.to(dtype)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        softmax_scale: float, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of varlen queries over their sequences' cached keys and values.

    Args:
        q: [tokens, q_heads, head_dim] in the compute dtype; q_heads is a multiple of kv_heads (GQA).
        k_cache, v_cache: the layer's caches (module docstring), already holding the new tokens.
        block_tables: [num_seqs, max_blocks] int32.
        context_lens: [num_seqs] int32, tokens of each sequence including this step's.
        query_start_loc: [num_seqs + 1] int32, cumulative query counts.
        softmax_scale: usually head_dim ** -0.5.
        k_scale, v_scale: FP8 cache scales, or None for a BF16 cache.

    Returns:
        [tokens, q_heads, head_dim] in ``q``'s dtype (float32 softmax inside).
    """
    out = torch.empty_like(q)
    groups = q.shape[1] // k_cache.shape[2]
    bt = block_tables.tolist()
    lens = context_lens.tolist()
    starts = query_start_loc.tolist()
    for i, length in enumerate(lens):
        s, e = starts[i], starts[i + 1]
        if e == s:
            continue
        nblocks = -(-length // k_cache.shape[1])
        blocks = torch.tensor(bt[i][:nblocks], device=q.device, dtype=torch.long)
        k = _gather(k_cache, blocks, length, k_scale, torch.float32).repeat_interleave(groups, dim=1)
        v = _gather(v_cache, blocks, length, v_scale, torch.float32).repeat_interleave(groups, dim=1)
        qi = q[s:e].float()
        scores = torch.einsum("qhd,khd->hqk", qi, k) * softmax_scale
        # Query j sits at position length - n + j and sees keys 0 .. that position.
        n = e - s
        qpos = torch.arange(length - n, length, device=q.device).unsqueeze(1)
        mask = torch.arange(length, device=q.device).unsqueeze(0) > qpos
        scores = scores.masked_fill(mask.unsqueeze(0), float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def fp8_kv_bits(x, scale):
    """E4M3 bits (uint8) of ``x / scale`` (IEEE division) clamped to +-448 and rounded to nearest even, as
    ``write_kv_ref`` (``formats``' saturating cast) stores FP8 keys and values."""
    y = round_e4m3(tl.minimum(tl.maximum(tl.div_rn(x.to(tl.float32), scale), -448.0), 448.0))
    return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, softmax_scale,
                    k_scale=None, v_scale=None) -> torch.Tensor:
    """``paged_attention_ref``'s contract; the Triton decode/prefill kernels on CUDA."""
    if not q.is_cuda:
        return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                   softmax_scale, k_scale, v_scale)
    q = q.contiguous()
    if q.shape[0] == block_tables.shape[0]:
        return paged_decode(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, k_scale, v_scale)
    return paged_prefill(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, softmax_scale,
                         k_scale, v_scale)
