"""Test helpers: a tiny random Llama (where values do not matter) and random calibration windows."""

from __future__ import annotations

import torch

from quantlab.data import CalibrationSet, digest


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2):
    """A random LlamaForCausalLM small enough for per-test calibration (group sizes 16/32/64 divide it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def random_calibration(num_samples: int = 4, seq_len: int = 32, seed: int = 0) -> CalibrationSet:
    ids = torch.randint(0, 256, (num_samples, seq_len), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, "random", digest(ids))
