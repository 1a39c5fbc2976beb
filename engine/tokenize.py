"""Incremental detokenization with stop strings.

Decoding one token at a time is wrong for byte-level and SentencePiece tokenizers: a token can be half of
a UTF-8 character, and a word's leading space depends on the token before it. So, as vLLM does, each new
token is decoded together with a few tokens before it (the last prompt tokens at first), and text is
released only once it no longer ends in a replacement character. While a stop string could still be
forming, its possible prefix is held back from the visible text; once one appears, the text is cut
before it and the request stops.
"""

from __future__ import annotations

_CONTEXT = 6  # prompt tokens decoded with the first output token (word boundaries, leading spaces)


class Detokenizer:
    """Text of one request's output tokens, updated one token at a time.

    Args:
        tokenizer: a transformers tokenizer.
        prompt_token_ids: the prompt (its tail is decoding context only; it is never part of the text).
        stop: stop strings; the text ends before the first one that appears.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust backend decodes directly: transformers' decode first walks every id
        # through Python type checks, which at batch 256 cost more host time per step than the rest of it.
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.ids = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stop = stop
        self.text = ""
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string appeared (the text is then cut before it)."""
        if self.stopped:
            return True
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        before = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            window = max(0, before - longest + 1)
            hits = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        return self.stopped

    def visible(self, finished: bool) -> str:
        """The text to show now: while running, the longest tail that could begin a stop string is held back."""
        if finished or not self.stop:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self.text[: len(self.text) - hold]
