"""Smoothing groups and fused shards of a Llama layer: a group is offered only when every Linear in it is
targeted and its widths fold; fused shards list the targeted members of q/k/v and gate/up."""

from __future__ import annotations

import torch

from helpers import tiny_llama
from quantlab.mappings import LLAMA, fused_shards, layer_mappings

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _layer():
    return tiny_llama(hidden=64, layers=1).model.layers[0]  # 4 heads, 2 KV heads: grouped-query attention


def test_every_group_of_a_fully_targeted_layer_whose_widths_fold():
    found = layer_mappings(_layer(), set(ATTN + MLP))
    # v_proj -> o_proj does not fold under grouped-query attention (32 outputs against 64 inputs).
    assert [m.prev for m in found] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert found == [m for m in LLAMA if m.prev != "self_attn.v_proj"]


def test_a_group_with_an_untargeted_linear_is_dropped():
    found = layer_mappings(_layer(), set(ATTN + MLP) - {"self_attn.k_proj"})
    assert [m.prev for m in found] == ["post_attention_layernorm", "mlp.up_proj"]


def test_v_to_o_folds_without_grouped_query_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    layer = LlamaForCausalLM(config).model.layers[0]
    assert [m.prev for m in layer_mappings(layer, set(ATTN + MLP))] == [m.prev for m in LLAMA]


def test_fused_shards_list_only_targeted_members():
    layer = _layer()
    assert fused_shards(layer, set(ATTN + MLP)) == [ATTN[:3], MLP[:2]]
    assert fused_shards(layer, {"self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"}) == [ATTN[:2]]


def test_unknown_architecture_has_no_groups():
    assert layer_mappings(torch.nn.Linear(4, 4), {"x"}) == [] and fused_shards(torch.nn.Linear(4, 4), {"x"}) == []
