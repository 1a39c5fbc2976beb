"""The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, SmolLM) over a flat batch of tokens.

Every sequence's new tokens are concatenated into one [tokens] batch ("varlen"), so a step mixes prefill
chunks and decodes in one forward. What attention needs to find each token's sequence and cache slots
travels as an explicit ``AttentionMeta`` argument (no global context). Every op is a call into
``quantlab.engine.kernels``; this file only wires them in Llama's order.

Weights are read as the builder laid them out (``engine/builder.py``): q/k/v fused into ``qkv_proj`` and
gate/up into ``gate_up_proj`` where the format allows, else kept as parts that are applied one by one and
concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import EngineConfig
from .kernels import activation, attention, linear, norm, rope_kv

# Fused projections and the parts they are built from, in output order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class AttentionMeta:
    """Where a step's tokens sit: built on the host by the runner, moved to the device once per step.

    Attributes:
        positions: [tokens] int64 position of each token in its sequence.
        slot_mapping: [tokens] int64 KV-cache slot (``block * tokens_per_block + offset``) of each token.
        block_tables: [seqs, max_blocks] int32; rows padded with the runner's null block.
        context_lens: [seqs] int32 tokens of each sequence including this step's.
        query_start_loc: [seqs + 1] int32 cumulative new-token counts.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor


class Linear:
    """One projection: a single packed linear, or the parts of an unfusable one applied in turn."""

    def __init__(self, parts: list[tuple[linear.LinearSpec, dict[str, torch.Tensor]]]):
        self.parts = parts
        self.out_features = sum(spec.out_features for spec, _ in parts)
        # (format, static scale or None) when the single part can take its input already quantized on CUDA.
        self.input_quantization = linear.input_quantization(*parts[0]) if len(parts) == 1 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return linear.apply(x, *self.parts[0])
        return torch.cat([linear.apply(x, spec, t) for spec, t in self.parts], dim=-1)

    def apply_quantized(self, q: torch.Tensor, sa: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The product from the input quantized as ``input_quantization`` says (codes, per-row scales)."""
        return linear.apply_quantized(q, sa, *self.parts[0], dtype)


def _tensors_of(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = f"{prefix}."
    return {k[len(p):]: v for k, v in weights.items() if k.startswith(p) and "." not in k[len(p):]}


def load_linear(config: EngineConfig, weights: dict[str, torch.Tensor], layer: str, name: str) -> Linear:
    """The projection ``name`` of ``layer`` (``layers.3``): fused if stored fused, else its parts."""
    fused = f"{layer}.{name}"
    if fused in config.linears or name not in FUSED:
        return Linear([(config.linears[fused], _tensors_of(weights, fused))])
    return Linear([(config.linears[f"{layer}.{p}"], _tensors_of(weights, f"{layer}.{p}")) for p in FUSED[name]])


class DecoderLayer:
    """Pre-norm attention + SwiGLU MLP; the residual add is fused into the next RMSNorm, and so is the input
    quantization of a W8A8 q/k/v or gate/up projection."""

    def __init__(self, config: EngineConfig, weights: dict[str, torch.Tensor], index: int):
        m, layer = config.model, f"layers.{index}"
        self.eps, self.heads, self.kv_heads, self.head_dim = m.rms_norm_eps, m.num_heads, m.num_kv_heads, m.head_dim
        self.input_norm = weights[f"{layer}.input_layernorm.weight"]
        self.post_norm = weights[f"{layer}.post_attention_layernorm.weight"]
        self.qkv = load_linear(config, weights, layer, "qkv_proj")
        self.o_proj = load_linear(config, weights, layer, "o_proj")
        self.gate_up = load_linear(config, weights, layer, "gate_up_proj")
        self.down = load_linear(config, weights, layer, "down_proj")
        self.k_scale = weights.get(f"{layer}.k_scale")
        self.v_scale = weights.get(f"{layer}.v_scale")
        self.softmax_scale = self.head_dim ** -0.5

    def __call__(self, h: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMeta, cos_sin: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = self._norm_and_project(h, residual, self.input_norm, self.qkv)
        q = rope_kv.rope_write_kv(qkv, self.heads, self.kv_heads, meta.positions, cos_sin, k_cache, v_cache,
                                  meta.slot_mapping, self.k_scale, self.v_scale)
        o = attention.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start_loc,
                                      self.softmax_scale, self.k_scale, self.v_scale)
        h = self.o_proj(o.flatten(1))
        gate_up, residual = self._norm_and_project(h, residual, self.post_norm, self.gate_up)
        return self.down(activation.silu_and_mul(gate_up)), residual

    def _norm_and_project(self, h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                          proj: Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """(``proj(rms_norm(h + residual))``, new residual). Where the norm runs its Triton kernel and ``proj``
        takes 8-bit input, that kernel also quantizes the normed rows (the same codes as quantizing after it)."""
        how = proj.input_quantization
        if how is not None and norm.runs_triton(h, residual):
            q, sa, residual = norm.rms_norm_quant(h, weight, self.eps, residual, *how)
            return proj.apply_quantized(q, sa, h.dtype), residual
        x, residual = norm.rms_norm(h, weight, self.eps, residual)
        return proj(x), residual


class LlamaModel:
    """The whole decoder plus the output projection, reading tensors it is handed (already on the device)."""

    def __init__(self, config: EngineConfig, weights: dict[str, torch.Tensor]):
        self.config = config
        self.embed = weights["embed_tokens.weight"]
        self.cos_sin = weights["rope.cos_sin"]
        self.layers = [DecoderLayer(config, weights, i) for i in range(config.model.num_layers)]
        self.norm = weights["norm.weight"]
        if config.model.tie_word_embeddings:
            self.lm_head = Linear([(linear.LinearSpec("dense", None, config.model.hidden_size, config.model.vocab_size),
                                    {"weight": self.embed})])
        else:
            self.lm_head = Linear([(config.linears["lm_head"], _tensors_of(weights, "lm_head"))])

    def forward(self, input_ids: torch.Tensor, meta: AttentionMeta,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Final hidden states [tokens, hidden] for ``input_ids`` [tokens]; writes their K/V into the caches."""
        h, residual = self.embed[input_ids], None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, meta, self.cos_sin, k_cache, v_cache)
        return norm.rms_norm(h, self.norm, self.config.model.rms_norm_eps, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab] of the hidden states [rows, hidden] that sample a token."""
        return self.lm_head(hidden).float()
