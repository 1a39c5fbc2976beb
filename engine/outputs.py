"""What the engine hands back per request, shaped like vLLM's ``RequestOutput`` so users' scripts port.

``text`` and ``token_ids`` are cumulative (vLLM's default): each output of a request repeats everything
generated so far, and streaming clients take the difference from the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated continuation.

    Attributes:
        index: position among the request's continuations (the engine runs one per request).
        text: the detokenized output, stop string excluded.
        token_ids: every generated token id (an EOS or stop token included, as vLLM does).
        finish_reason: ``"stop"`` (EOS, stop token or stop string), ``"length"``, ``"abort"`` or None while
            running.
        logprobs: per generated token, {token id: log-probability} of the sampled token and the top
            ``SamplingParams.logprobs`` alternatives; None unless asked for.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestMetrics:
    """``time.monotonic()`` timestamps of a request's life (None until reached)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """The state of one request after a step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for metrics and the server's health endpoint."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_hits: int
    prefix_cache_queries: int
    num_preemptions_total: int
    num_blocks_total: int
    num_blocks_free: int
