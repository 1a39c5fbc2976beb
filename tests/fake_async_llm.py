"""A test double of `AsyncLLM` (docs: /work/wt/INTERFACES.md, "Engine stream -> serving stream").

It honours the interface the server relies on: cumulative outputs, one per engine step for every running
sequence; EngineRequestError before the first output for an empty or over-long prompt; abort (explicit or
by closing the iterator) frees the request's KV blocks at once; stats(); shutdown(). Blocks come from a
small pool with an integrity check, admission reserves prompt + max_tokens blocks (no preemption), and
the step loop is an asyncio task with a configurable step time, so the server's timing, queueing and
disconnect paths run for real. Tokens are a deterministic function of the prompt, seed and position.
Its outputs are the engine's own dataclasses (quantlab.engine.outputs).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

from quantlab.engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from quantlab.errors import EngineRequestError

VOCAB = 200


def token_at(prompt_ids: list[int], position: int, seed: int | None) -> int:
    """The token the fake generates at `position` of the output (never the EOS id 0)."""
    return (sum(prompt_ids) * 31 + position * 7 + (seed or 0) * 13) % (VOCAB - 1) + 1


class FakeTokenizer:
    """One token per character each way; decode gives one letter (or a space) per id, so the text of n
    tokens has n characters and streamed text deltas line up with token deltas."""

    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % (VOCAB - 1) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) if i % 7 else " " for i in ids)


@dataclass
class _Seq:
    rid: str
    prompt: str | None
    ids: list[int]
    params: object
    priority: int
    metrics: RequestMetrics
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    out: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    finished: bool = False


class FakeAsyncLLM:
    def __init__(self, num_blocks: int = 256, tokens_per_block: int = 4, max_batch_size: int = 16,
                 max_seq_len: int = 96, step_time: float = 0.002):
        self.tokenizer, self.model_name, self.max_seq_len = FakeTokenizer(), "fake-model", max_seq_len
        self.num_blocks, self.tokens_per_block = num_blocks, tokens_per_block
        self.max_batch_size, self.step_time = max_batch_size, step_time
        self.free = list(range(num_blocks))
        self.waiting: deque[_Seq] = deque()
        self.running: dict[str, _Seq] = {}
        self.requests: dict[str, _Seq] = {}
        self.num_aborted = self.num_generated = 0
        self.shut_down = False
        self.dead_reason: str | None = None  # the fake's step loop never dies
        self._loop_task: asyncio.Task | None = None

    def apply_chat_template(self, messages: list[dict]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    async def generate(self, prompt, params, request_id: str, priority: int = 0):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise EngineRequestError("the prompt is empty")
        if len(ids) >= self.max_seq_len:
            raise EngineRequestError(f"the prompt has {len(ids)} tokens; this engine takes at most {self.max_seq_len - 1}")
        if request_id in self.requests:
            raise EngineRequestError(f"request id {request_id} is already running")
        seq = _Seq(request_id, prompt if isinstance(prompt, str) else None, ids, params, priority,
                   RequestMetrics(time.monotonic()))
        self.requests[request_id] = seq
        self.waiting.append(seq)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        try:
            while True:
                out = await seq.queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self._abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        seq = self.requests.get(request_id)
        if seq is None or seq.finished:
            return
        self.num_aborted += 1
        self._finish(seq, "abort")

    def stats(self) -> EngineStats:
        used = self.num_blocks - len(self.free)
        return EngineStats(len(self.running), len(self.waiting), used / self.num_blocks, 0, 0, 0,
                           self.num_blocks, len(self.free))

    def check_integrity(self) -> None:
        held = [b for s in self.running.values() for b in s.blocks]
        assert len(held) == len(set(held)), "a block is held by two sequences"
        assert sorted(held + self.free) == list(range(self.num_blocks)), \
            f"{len(self.free)} free + {len(held)} held != {self.num_blocks} blocks"

    async def shutdown(self) -> None:
        self.shut_down = True
        for rid in list(self.requests):
            self._abort(rid)
        if self._loop_task is not None:
            self._loop_task.cancel()

    def _finish(self, seq: _Seq, reason: str) -> None:
        seq.finished = True
        seq.metrics.finished_time = time.monotonic()
        self.free.extend(seq.blocks)
        seq.blocks = []
        self.running.pop(seq.rid, None)
        if seq in self.waiting:
            self.waiting.remove(seq)
        del self.requests[seq.rid]
        seq.queue.put_nowait(self._output(seq, reason))

    def _output(self, seq: _Seq, reason: str | None) -> RequestOutput:
        lps = None if seq.params.logprobs is None else [
            {t: -0.25, **{(t + j) % VOCAB: -1.0 - j for j in range(1, seq.params.logprobs + 1)}} for t in seq.out]
        text = self.tokenizer.decode(seq.out)
        completion = CompletionOutput(0, text, list(seq.out), reason, lps)
        return RequestOutput(seq.rid, seq.prompt, seq.ids, [completion], reason is not None, seq.metrics)

    def _admit(self) -> None:
        for seq in sorted(self.waiting, key=lambda s: (s.priority, s.metrics.arrival_time)):
            limit = seq.params.max_tokens or self.max_seq_len
            need = math.ceil(min(len(seq.ids) + limit, self.max_seq_len) / self.tokens_per_block)
            if len(self.running) >= self.max_batch_size or need > len(self.free):
                return
            self.waiting.remove(seq)
            seq.blocks, self.free = self.free[:need], self.free[need:]
            seq.metrics.first_scheduled_time = time.monotonic()
            self.running[seq.rid] = seq

    async def _run(self) -> None:
        while self.requests:
            self._admit()
            await asyncio.sleep(self.step_time)
            for seq in list(self.running.values()):
                seq.out.append(token_at(seq.ids, len(seq.out), seq.params.seed))
                self.num_generated += 1
                seq.metrics.first_token_time = seq.metrics.first_token_time or time.monotonic()
                text = self.tokenizer.decode(seq.out)
                if any(s in text for s in seq.params.stop):
                    self._finish(seq, "stop")
                elif len(seq.out) >= (seq.params.max_tokens or self.max_seq_len) or len(seq.ids) + len(seq.out) >= self.max_seq_len:
                    self._finish(seq, "length")
                else:
                    seq.queue.put_nowait(self._output(seq, None))
