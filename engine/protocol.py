"""The OpenAI request bodies the server accepts, as pydantic models, and their translation to SamplingParams.

Field names are OpenAI's, plus vLLM's extra sampling fields (`top_k`, `min_p`, `repetition_penalty`,
`stop_token_ids`, `ignore_eos`, `priority`), so clients written for either work unchanged.

Unknown fields are rejected (400 naming the field) rather than ignored as vLLM does: a misspelt
`max_token` silently falling back to the default is the kind of quiet mistake the recipe loader refuses
too. A field sent as null takes its default. OpenAI fields that change nothing here (`user`, `logit_bias` when empty) are accepted and ignored.
Ranges are checked by `SamplingParams` itself (one sentence naming the field), not duplicated here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from quantlab.engine.sampling import SamplingParams
from quantlab.errors import QuantlabError


# More choices than this in one request would let one client fill the queue by itself.
MAX_N = 64


class RequestFieldError(QuantlabError):
    """A request field is well-typed but not something this server does; the message names the field."""


class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1.0 is not an integer (OpenAI rejects both too).
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        """`"temperature": null` means "the default", as OpenAI and vLLM read it (some clients send every
        field, unset ones as null, e.g. a replayed assistant message's `tool_calls: null`)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The sampling fields both endpoints share (OpenAI's names, vLLM's extras)."""

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    priority: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """One sequence's SamplingParams (n=1: the server fans a request out into n engine requests)."""
        if self.logit_bias:
            raise RequestFieldError("logit_bias is not supported by this server (send null or {})")
        if self.stream_options is not None and not self.stream:
            raise RequestFieldError("stream_options is only allowed when stream is true")
        return SamplingParams(
            n=1, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, max_tokens=max_tokens, stop=tuple(_as_list(self.stop)),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logprobs=logprobs)

    def seeds(self) -> list[int | None]:
        """The seed of each of the n sequences: seed + i, so seeded fan-out is reproducible yet not n copies."""
        if not 1 <= self.n <= MAX_N:
            raise RequestFieldError(f"n must be an integer in [1, {MAX_N}] (got {self.n})")
        return [None if self.seed is None else self.seed + i for i in range(self.n)]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt` is a string, a list of token ids, or a batch of either."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """The batch as a list of single prompts (OpenAI: one choice per prompt per n)."""
        if self.echo:
            raise RequestFieldError("echo is not supported by this server (send false)")
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]
        if not p:
            raise RequestFieldError("prompt must not be empty")
        return list(p)

    def to_sampling_params(self) -> SamplingParams:
        return self.sampling_params(self.max_tokens, self.logprobs)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None

    def as_template_input(self) -> dict:
        """The message as chat templates expect it: text parts of a multi-part content joined."""
        content = self.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise RequestFieldError("messages: only text content parts are supported")
            content = "".join(str(part.get("text", "")) for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions. `max_completion_tokens` is OpenAI's newer name for `max_tokens`."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def template_messages(self) -> list[dict]:
        if not self.messages:
            raise RequestFieldError("messages must hold at least one message")
        return [m.as_template_input() for m in self.messages]

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestFieldError("top_logprobs needs logprobs set to true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


def _as_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
