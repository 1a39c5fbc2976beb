"""The JSON the server sends, in OpenAI's shapes: completions, chat completions, their stream chunks,
logprobs, usage and errors. Pure functions of engine outputs, so the shapes are tested without a server.

Engine outputs are cumulative (text and token ids so far); `Choice` remembers what was already sent and
hands out the delta, which is how vLLM's OpenAI server streams too.
"""

from __future__ import annotations

import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error object; `type` follows OpenAI's names for each status."""
    kinds = {400: "invalid_request_error", 404: "not_found_error", 408: "timeout_error",
             429: "rate_limit_error", 503: "service_unavailable_error"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"), "param": param,
                      "code": status}}


class Choice:
    """What one choice has sent so far, so each stream chunk carries only the new text and tokens."""

    def __init__(self, index: int):
        self.index = index
        self.text_sent = 0
        self.tokens_sent = 0

    def delta(self, completion) -> tuple[str, list[int], list | None]:
        """New text, new token ids and their logprob dicts of a cumulative CompletionOutput."""
        text = completion.text[self.text_sent:]
        ids = completion.token_ids[self.tokens_sent:]
        lps = None if completion.logprobs is None else completion.logprobs[self.tokens_sent:len(completion.token_ids)]
        self.text_sent, self.tokens_sent = len(completion.text), len(completion.token_ids)
        return text, ids, lps


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, ids: list[int], lps: list[dict] | None, text_offset: int, top: int) -> dict | None:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    if lps is None:
        return None
    tokens = [_token(tokenizer, t) for t in ids]
    offsets, pos = [], text_offset
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    tops = [{_token(tokenizer, t): v for t, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]} if top else None
            for d in lps]
    return {"tokens": tokens, "token_logprobs": [d.get(t) for t, d in zip(ids, lps)], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tokenizer, ids: list[int], lps: list[dict] | None, top: int) -> dict | None:
    """The chat `logprobs` object: one entry per token with its top alternatives."""
    if lps is None:
        return None

    def entry(token_id: int, value: float) -> dict:
        tok = _token(tokenizer, token_id)
        return {"token": tok, "logprob": value, "bytes": list(tok.encode("utf-8"))}

    content = []
    for t, d in zip(ids, lps):
        top_entries = [entry(a, v) for a, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
        content.append({**entry(t, d.get(t, float("-inf"))), "top_logprobs": top_entries})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, obj: str, model: str, choices: list, created: int | None = None) -> dict:
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model, "choices": choices}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_chunk_choice(index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
