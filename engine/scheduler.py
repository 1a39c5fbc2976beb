"""Scheduler: which sequences run this step and how many tokens each computes (in-flight batching).

Each step: running decodes first, then the running sequences still in (chunked) prefill, then new
admissions from the waiting queue, all within `max_num_tokens` tokens and `max_batch_size` sequences, so
prefill chunks ride in the same forward as the decodes. Policies:
- `guaranteed_no_evict`: a sequence is admitted only with blocks reserved for its whole life
  (prompt + max_tokens, capped by max_seq_len), so nothing is ever preempted.
- `max_utilization`: a sequence is admitted with blocks for its first chunk; when a running one cannot
  grow, the lowest-priority, latest-arrived running sequence is preempted: its blocks are freed and it
  waits to be recomputed (prompt + its own output), continuing where it stopped.
No model and no torch here: the engine runs the batch and reports the sampled tokens to `update`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count

from quantlab.engine.block_manager import BlockManager
from quantlab.engine.sequence import Sequence, SequenceStatus
from quantlab.errors import EngineRequestError

POLICIES = ("guaranteed_no_evict", "max_utilization")


@dataclass(frozen=True)
class SchedulerConfig:
    """The engine's per-step limits; `max_num_tokens` is the chunked-prefill budget per step."""

    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    policy: str = "guaranteed_no_evict"

    def __post_init__(self):
        for name in ("max_batch_size", "max_num_tokens", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {getattr(self, name)!r})")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)} (got {self.policy!r})")


@dataclass(frozen=True)
class ScheduledSeq:
    """Compute `seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + num_new_tokens]`."""

    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so its last position's logits are sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSeq, ...]
    preempted: tuple[Sequence, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Owns the waiting and running queues; the block manager owns the blocks."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0
        self._arrival_order: dict[str, int] = {}
        self._counter = count()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new request, or raise EngineRequestError if it can never run within the limits."""
        rid, limit = seq.request_id, self.config.max_seq_len
        if seq.num_prompt_tokens == 0:
            raise EngineRequestError(f"request {rid!r} has an empty prompt")
        if rid in self._arrival_order:
            raise EngineRequestError(f"request id {rid!r} is already in use by an unfinished request")
        max_tokens = seq.params.max_tokens
        if seq.num_prompt_tokens + (1 if max_tokens is None else max_tokens) > limit:
            asked = "leaves no room for one generated token" if max_tokens is None else f"plus max_tokens={max_tokens}"
            raise EngineRequestError(f"request {rid!r}: a prompt of {seq.num_prompt_tokens} tokens {asked} "
                                     f"within max_seq_len={limit}")
        bm = self.block_manager
        need = bm.blocks_for(seq.max_total_tokens(limit))
        if need > bm.num_blocks:
            raise EngineRequestError(f"request {rid!r} may reach {seq.max_total_tokens(limit)} tokens, which need "
                                     f"{need} KV blocks, but the KV cache has {bm.num_blocks}")
        seq.status = SequenceStatus.WAITING
        self._arrival_order[rid] = next(self._counter)
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request now with reason "abort", freeing its blocks; None if it is not unfinished."""
        for seq in self.running + self.waiting:
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire `seq` ("stop", "length" or "abort") and free its blocks at once."""
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        del self._arrival_order[seq.request_id]

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch: decodes, then prefill chunks, then admissions, within the budgets."""
        budget = self.config.max_num_tokens
        chunks: dict[str, ScheduledSeq] = {}
        preempted: list[Sequence] = []
        by_rank = sorted(self.running, key=self._rank)
        for seq in [s for s in by_rank if _remaining(s) == 1] + [s for s in by_rank if _remaining(s) > 1]:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an earlier one this step
                continue
            n = min(_remaining(seq), budget)
            while not self.block_manager.grow(seq, seq.num_computed_tokens + n):
                assert self.config.policy == "max_utilization", f"{seq!r} outgrew its reservation"
                victim = max(self.running, key=self._rank)
                self._preempt(victim)
                preempted.append(victim)
                if victim.request_id in chunks:
                    budget += chunks.pop(victim.request_id).num_new_tokens
                if victim is seq:
                    break
            else:
                chunks[seq.request_id] = ScheduledSeq(seq, n)
                budget -= n
        if not preempted:  # under pressure, admitting more would only be preempted again
            budget = self._admit(budget, chunks)
        return SchedulerOutput(tuple(chunks.values()), tuple(preempted))

    def _admit(self, budget: int, chunks: dict[str, ScheduledSeq]) -> int:
        bm = self.block_manager
        for seq in sorted(self.waiting, key=self._rank):
            if budget == 0 or len(self.running) >= self.config.max_batch_size:
                break
            matched = bm.match_prefix(seq)
            n = min(seq.num_tokens - len(matched) * bm.tokens_per_block, budget)
            if self.config.policy == "guaranteed_no_evict":
                target = seq.max_total_tokens(self.config.max_seq_len)
            else:
                target = len(matched) * bm.tokens_per_block + n
            if not bm.can_allocate(matched, target):
                break  # strict priority order: nobody overtakes the head of the queue
            bm.allocate(seq, matched, target)
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            chunks[seq.request_id] = ScheduledSeq(seq, n)
            budget -= n
        return budget

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Record a finished step: advance computed tokens, share newly full blocks, append samples.

        Sequences aborted between `schedule` and `update` are skipped.
        """
        for chunk in out.scheduled:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            samples = chunk.samples
            seq.num_computed_tokens += chunk.num_new_tokens
            self.block_manager.cache_computed(seq)
            if samples:
                seq.token_ids.append(sampled[seq.request_id])

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.append(seq)

    def _rank(self, seq: Sequence) -> tuple[int, float, int]:
        """Scheduling order: more important first, then earlier arrival; the last one is preempted first."""
        return seq.priority, seq.arrival_time, self._arrival_order[seq.request_id]


def _remaining(seq: Sequence) -> int:
    """Tokens not yet in the cache: 1 for a decode, more for a prompt (or a resumed sequence) in prefill."""
    return seq.num_tokens - seq.num_computed_tokens
