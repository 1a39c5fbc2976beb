"""SamplingParams: how one request picks its tokens, with vLLM's field names so users' scripts port.

Validated once here, at the edge: the scheduler and the sampler trust every field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantlab.errors import SamplingError

# vLLM's default ceiling on requested top logprobs (max_logprobs); more costs a top-k over the vocabulary.
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; the defaults are vLLM's.

    `top_k=-1` (vLLM's "off") is accepted and stored as 0. `stop` and `stop_token_ids` accept a single
    value or any sequence and are stored as tuples, so the object stays hashable and immutable.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        stop_ids = (self.stop_token_ids,) if isinstance(self.stop_token_ids, int) else tuple(self.stop_token_ids)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", stop_ids)
        _check_int("n", self.n, 1)
        _check_float("temperature", self.temperature, "a number >= 0", lambda v: v >= 0)
        _check_float("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        if _is_int(self.top_k) and self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _check_int("top_k", self.top_k, 0, "an integer >= 0 (0 or -1 = off)")
        _check_float("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, "None or an integer >= 0")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, "None or an integer >= 1")
        if not all(isinstance(s, str) and s for s in stop):
            raise SamplingError(f"stop must be non-empty strings (got {self.stop!r})")
        if not all(_is_int(t) and t >= 0 for t in stop_ids):
            raise SamplingError(f"stop_token_ids must be integers >= 0 (got {self.stop_token_ids!r})")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be true or false (got {self.ignore_eos!r})")
        _check_float("repetition_penalty", self.repetition_penalty, "a number > 0", lambda v: v > 0)
        _check_float("presence_penalty", self.presence_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
        _check_float("frequency_penalty", self.frequency_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, f"None or an integer in [0, {MAX_LOGPROBS}]")
            if self.logprobs > MAX_LOGPROBS:
                raise SamplingError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}] (got {self.logprobs})")

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax: top-k/top-p/min-p and the seed then have no effect."""
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, allowed: str | None = None) -> None:
    if not _is_int(value) or value < low:
        raise SamplingError(f"{name} must be {allowed or f'an integer >= {low}'} (got {value!r})")


def _check_float(name: str, value, allowed: str, ok) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not ok(value):
        raise SamplingError(f"{name} must be {allowed} (got {value!r})")
