"""Engine test helpers: a tiny random Llama-family model saved as an HF directory (with a WordLevel
tokenizer and a chat template), and a small CPU build of a source."""

from __future__ import annotations

import torch

from quantlab.recipe.schema import BuildOptions

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<assistant>"


def save_tiny(path, seed: int = 0, **overrides):
    """A tiny random Llama-family model + tokenizer saved as an HF directory; returns the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True,
              bos_token_id=None, eos_token_id=1, initializer_range=0.2)
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


def build(source, out, **options):
    """Build ``source`` into ``out`` with small CPU limits (float32 unless ``dtype`` is given)."""
    from quantlab.engine.builder import build_engine

    kw = dict(max_batch_size=8, max_seq_len=128, max_num_tokens=64, tokens_per_block=4, dtype="float32", device="cpu")
    kw.update(options)
    skip_gates = kw.pop("skip_gates", True)
    return build_engine(str(source), out, BuildOptions(**kw), skip_gates=skip_gates)
