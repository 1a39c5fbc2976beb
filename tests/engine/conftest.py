"""Engine test fixtures: a tiny random Llama as an HF directory (with a WordLevel tokenizer and a chat
template) and engines built from it, shared across the session because building is the slow part."""

from __future__ import annotations

import pytest
import torch

from quantlab.recipe.schema import BuildOptions

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<assistant>"


def save_tiny(path, seed: int = 0, **overrides):
    """A tiny random Llama-family model + tokenizer saved as an HF directory; returns the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True,
              bos_token_id=None, eos_token_id=1)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(HF dir, float32 transformers model) of the tiny Llama."""
    path = tmp_path_factory.mktemp("tiny-src")
    return path, save_tiny(path)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model, tmp_path_factory):
    """A float32 engine of the tiny Llama (exact comparisons with transformers)."""
    from quantlab.engine.builder import build_engine

    out = tmp_path_factory.mktemp("engines") / "tiny-f32"
    build_engine(str(tiny_model[0]), out, BuildOptions(max_batch_size=8, max_seq_len=128, max_num_tokens=64,
                                                       tokens_per_block=4, dtype="float32", device="cpu"))
    return out
