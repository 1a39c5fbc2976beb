"""One HTTP request run as several engine requests (n samples of each prompt), merged back into one stream.

The engine runs n=1 per sequence (SamplingParams.n), so the server fans a request out and owns the
bookkeeping: which engine request is choice k, which have finished, and aborting the rest, exactly once,
when the client goes away, the request times out or the server shuts down. Aborting explicitly (not only by
closing the engine's iterators) is what returns their KV blocks at the next engine step.
"""

from __future__ import annotations

import asyncio
import logging

from quantlab.engine.metrics import ServerMetrics

log = logging.getLogger("quantlab.serve")
_END = object()


class Fanout:
    """Engine requests `{base_id}-{k}` for choice k; `next()` yields their outputs as they arrive.

    Args:
        async_llm: the engine (`AsyncLLM` interface).
        metrics: each choice's outputs feed one `SequenceMetrics`.
        base_id: the HTTP request's id.
        jobs: (prompt, SamplingParams) per choice, in choice order.
        priority: vLLM's priority (lower is served first).
        n: choices per prompt (jobs come prompt by prompt); a prompt's tokens are counted once in
            prompt_tokens_total, as OpenAI's usage counts them, however many samples are drawn from it.
    """

    def __init__(self, async_llm, metrics: ServerMetrics, base_id: str, jobs: list, priority: int, n: int = 1):
        self._llm = async_llm
        self.ids = [f"{base_id}-{k}" for k in range(len(jobs))]
        self.seqs = [metrics.sequence(count_prompt=k % n == 0) for k in range(len(jobs))]
        self.last: list = [None] * len(jobs)
        self.refused = [False] * len(jobs)  # the engine raised instead of running it: not an abort
        self.closed = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = len(jobs)
        self._tasks = [asyncio.create_task(self._pump(k, async_llm.generate(prompt, params, self.ids[k], priority)))
                       for k, (prompt, params) in enumerate(jobs)]

    async def _pump(self, k: int, outputs) -> None:
        try:
            async for out in outputs:
                self._queue.put_nowait((k, out))
        except Exception as e:  # surfaced to the handler by next(); QuantlabError means a bad request
            self.refused[k] = True
            self._queue.put_nowait((k, e))
        finally:
            self._queue.put_nowait((k, _END))

    async def next(self):
        """(choice, RequestOutput) of the next output; None once all choices finished or after `cancel()`.

        Raises the first error an engine request raised (EngineRequestError before its first output).
        """
        while self._open and not self.closed:
            k, item = await self._queue.get()
            if self.closed:  # outputs queued before an abort are not delivered (and not counted twice)
                break
            if item is _END:
                self._open -= 1
            elif isinstance(item, BaseException):
                raise item
            elif item is not None:
                self.seqs[k].output(item)
                self.last[k] = item
                return k, item
        return None

    async def first_outputs(self) -> list:
        """Every output until each choice has produced one (or finished): what must be known before the
        HTTP status is chosen, since an over-long prompt raises only when the engine sees it."""
        got = []
        while any(s.num_tokens == 0 and not s.done for s in self.seqs):
            item = await self.next()
            if item is None:
                break
            got.append(item)
        return got

    async def cancel(self) -> None:
        """Abort every unfinished choice now (idempotent); `next()` then returns None."""
        if self.closed:
            return
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for rid, seq, refused in zip(self.ids, self.seqs, self.refused):
            if not seq.done and not refused:
                seq.abort()
                await self._llm.abort(rid)
        self._queue.put_nowait((0, None))
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                log.warning("engine request ended with %r while being aborted", r)
