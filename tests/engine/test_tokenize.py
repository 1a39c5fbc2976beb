"""Incremental detokenization equals decoding everything at once (multi-byte characters split over byte
tokens included), stop strings cut the text before them, and a possible stop prefix is held back."""

from __future__ import annotations

import pytest

from quantlab.engine.tokenize import Detokenizer

TEXT = "Grüße aus Köln — naïve café, 東京 and spaces  here."


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, the quick brown fox"] * 4,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_incremental_text_equals_whole_decode(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) // 2  # mostly byte tokens: characters span several tokens
    d = Detokenizer(tokenizer, tokenizer.encode("prompt:"))
    seen = []
    for t in ids:
        d.add(t)
        seen.append(d.visible(finished=False))
    assert d.text == tokenizer.decode(ids)
    assert all("\ufffd" not in s for s in seen)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # text only grows


def test_stop_string_cuts_before_it(tokenizer):
    d = Detokenizer(tokenizer, [], stop=("café",))
    stopped = [d.add(t) for t in tokenizer.encode(TEXT)]
    assert d.text == TEXT[: TEXT.index("café")] and stopped[-1]
    assert stopped.index(True) < len(stopped) - 1  # found as soon as it appeared, not at the end


def test_possible_stop_prefix_is_held_back_until_ruled_out(tokenizer):
    d = Detokenizer(tokenizer, [], stop=("Köln!",))
    for t in tokenizer.encode("Grüße aus Köln"):
        d.add(t)
    assert d.visible(finished=False) == "Grüße aus "
    for t in tokenizer.encode(" und"):
        d.add(t)
    assert d.visible(finished=False) == "Grüße aus Köln und"


def test_backend_decoding_equals_transformers_decode_with_special_tokens(tokenizer):
    # The Rust backend decodes on the hot path; it must skip special tokens exactly as transformers does.
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})
    ids = tokenizer.encode(TEXT) + [tokenizer.eos_token_id] + tokenizer.encode(" after")
    fast, slow = Detokenizer(tokenizer, []), Detokenizer(tokenizer, [])
    slow.backend = None  # transformers' own decode
    for t in ids:
        fast.add(t)
        slow.add(t)
    want = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert fast.backend is not None and fast.text == slow.text == want and "<|im_end|>" not in want
