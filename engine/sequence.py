"""Sequence: one request's tokens and its place in the KV cache, as the scheduler sees it.

No torch here: the scheduler and the block manager are plain CPU logic, tested with fake sequences.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable

from quantlab.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()   # queued, or preempted and waiting to be recomputed; holds no blocks
    RUNNING = enum.auto()   # admitted: holds blocks and is scheduled every step the budget allows
    FINISHED = enum.auto()  # stopped, hit its length, or aborted; its blocks are released


class Sequence:
    """A request's prompt plus generated tokens, its block table and how much of it is in the cache.

    `num_computed_tokens` counts the tokens whose K/V are written in the blocks of `block_table`; the
    tokens from there to `num_tokens` are what the next steps compute (a prefill chunk, or the one token
    sampled last step). Preemption sets it back to 0 and keeps `token_ids`, so a resumed sequence
    recomputes its prompt and its own output and continues where it was.

    Args:
        request_id: unique among the engine's unfinished requests.
        prompt_token_ids: the prompt, already tokenized.
        params: sampling settings (validated by SamplingParams).
        priority: lower value = more important (vLLM's convention).
        arrival_time: `time.monotonic()` when the request arrived; ties in priority go to the earlier one.
    """

    def __init__(self, request_id: str, prompt_token_ids: Iterable[int], params: SamplingParams | None = None,
                 priority: int = 0, arrival_time: float | None = None):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params if params is not None else SamplingParams()
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.num_preemptions = 0

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def max_total_tokens(self, max_seq_len: int) -> int:
        """The length this sequence can reach: prompt + max_tokens, capped by the engine's max_seq_len."""
        if self.params.max_tokens is None:
            return max_seq_len
        return min(self.num_prompt_tokens + self.params.max_tokens, max_seq_len)


def check_stop(seq: Sequence, eos_token_id: int | Iterable[int] | None, max_seq_len: int | None = None) -> str | None:
    """Why `seq` must stop after its last sampled token, or None: the token-level checks.

    "stop" for an EOS token (unless `ignore_eos`) or one of `stop_token_ids`; "length" once max_tokens
    tokens are generated or the sequence reached `max_seq_len`. Stop *strings* need the detokenizer and
    are the engine's check.

    Args:
        eos_token_id: the tokenizer's EOS id, several ids (Llama 3 has more than one), or None.
    """
    if seq.num_output_tokens == 0:
        return None
    last = seq.last_token_id
    eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    if (not seq.params.ignore_eos and last in eos) or last in seq.params.stop_token_ids:
        return "stop"
    if seq.params.max_tokens is not None and seq.num_output_tokens >= seq.params.max_tokens:
        return "length"
    if max_seq_len is not None and seq.num_tokens >= max_seq_len:
        return "length"
    return None
