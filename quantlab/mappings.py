"""Per-architecture layer structure: smoothing groups (which op feeds which Linears) and the Linears a
serving engine fuses into one. SmoothQuant and AWQ fold a per-channel scale into ``prev`` (dividing its
output channels) and into ``linears`` (multiplying their input columns), which leaves the float
function unchanged.

Data, not code: an architecture is supported by adding its list here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True, slots=True)
class Mapping:
    """A smoothing group inside one decoder layer (names relative to the layer)."""

    prev: str
    linears: tuple[str, ...]


LLAMA = (
    Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    # Only foldable without grouped-query attention: v_proj's outputs must match o_proj's inputs.
    Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
    Mapping("mlp.up_proj", ("mlp.down_proj",)),
)

# Decoder-layer class name -> its smoothing groups (Llama-shaped layers share one list).
MAPPINGS = {name: LLAMA for name in ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")}

# Shards vLLM loads as one Linear (qkv_proj, gate_up_proj). It keeps a single NVFP4 global scale for
# the fused Linear (the largest stored), so the shards must be quantized with one shared global scale.
LLAMA_FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
FUSED = dict.fromkeys(MAPPINGS, LLAMA_FUSED)


def layer_mappings(layer: nn.Module, targets: set[str]) -> list[Mapping]:
    """The groups of ``layer`` that can be folded: known architecture, every Linear targeted, and the
    shapes compatible (prev's output width equals every Linear's input width)."""
    found = []
    for m in MAPPINGS.get(type(layer).__name__, ()):
        if not set(m.linears) <= targets:
            continue
        prev = layer.get_submodule(m.prev)
        width = prev.weight.shape[0]
        if all(layer.get_submodule(n).in_features == width for n in m.linears):
            found.append(m)
    return found


def fused_shards(layer: nn.Module, targets: set[str]) -> list[tuple[str, ...]]:
    """The groups of ``layer``'s targets a serving engine fuses into one Linear (only the targeted
    shards of each group are listed; groups left with one shard are dropped)."""
    groups = [tuple(n for n in group if n in targets) for group in FUSED.get(type(layer).__name__, ())]
    return [g for g in groups if len(g) > 1]
