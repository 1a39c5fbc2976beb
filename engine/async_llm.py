"""``AsyncLLM``: the engine behind an asyncio server, streaming incremental outputs per request.

The step loop runs in one background thread (torch releases the GIL while kernels run, so the event loop
stays responsive). Only that thread touches the ``LLMEngine``: new requests and aborts are handed to it
through a queue and applied between steps, and outputs come back to each request's asyncio queue with
``call_soon_threadsafe``. A request whose consumer stops iterating (closed, cancelled, client gone) is
aborted, which frees its blocks at the next step boundary.

If a step raises, the thread stops for good (the engine's state is not trusted after a failed step): every
waiting request, including one handed over just then, ends with ``EngineDeadError``, so does every later
``generate``, and ``dead_reason`` says why in one sentence (the server's /health reads it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from quantlab.errors import EngineDeadError

from .llm import LLMEngine
from .outputs import EngineStats, RequestOutput
from .sampling import SamplingParams

log = logging.getLogger("quantlab.engine")


class AsyncLLM:
    """Async front of an ``LLMEngine`` (build it with ``from_engine_dir``)."""

    def __init__(self, engine: LLMEngine, model_name: str | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_seq_len = engine.max_seq_len
        self.model_name = model_name or engine.engine_dir.name
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        # Held while checking for death and queueing, and while the dying thread records its error, so
        # nothing lands in the inbox after the thread's last look at it (it would wait forever).
        self._death_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="quantlab-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_dir(cls, path: str | Path, **overrides) -> "AsyncLLM":
        """Load (verify, map weights, capture graphs) and start the step thread."""
        return cls(LLMEngine(path, **overrides))

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.engine.apply_chat_template(messages)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def dead_reason(self) -> str | None:
        """None while the step thread runs (or after ``shutdown``); else why it stopped, in one sentence."""
        if self._error is not None:
            first = (str(self._error).strip().splitlines() or [""])[0][:200]
            cause = f"{type(self._error).__name__}: {first}" if first else type(self._error).__name__
            return f"the engine stopped after its step loop failed ({cause}); restart the server"
        if not self._stopping and not self._thread.is_alive():
            return "the engine's step thread exited unexpectedly; restart the server"
        return None

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as tokens arrive; the last one has ``finished=True``.

        Raises EngineRequestError (before the first output) for an empty or over-long prompt, and
        EngineDeadError when the step loop has stopped (before this request or while it runs).
        """
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        added: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("add", request_id, prompt, params, priority, loop, stream, added))
        await asyncio.wrap_future(added)
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._submit(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Stop a request at the next step boundary; its stream ends with finish_reason "abort"."""
        self._submit(("abort", request_id))

    async def shutdown(self) -> None:
        """Abort every in-flight request and stop the step thread."""
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    def _submit(self, item: tuple) -> None:
        with self._death_lock:
            reason = self.dead_reason
            if reason is None:
                self._inbox.put(item)
        if reason is None:
            self._wake.set()
        elif item[0] != "abort":  # aborting on a dead engine has nothing left to stop
            raise self._dead_error()

    def _dead_error(self) -> EngineDeadError:
        err = EngineDeadError(self.dead_reason)
        err.__cause__ = self._error
        return err

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        if isinstance(item, BaseException) or item.finished:
            del self._streams[request_id]
        loop, stream = target
        loop.call_soon_threadsafe(stream.put_nowait, item)

    def _inbox_items(self):
        """What the inbox holds now, taken one item at a time until it is empty."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for item in self._inbox_items():
            if item[0] == "abort":
                out = self.engine.abort(item[1])
                if out is not None:
                    self._deliver(item[1], out)
                continue
            _, rid, prompt, params, priority, loop, stream, added = item
            try:
                self.engine.add_request(rid, prompt, params, priority)
            except Exception as e:  # EngineRequestError and friends go back to the caller
                loop.call_soon_threadsafe(added.set_exception, e)
                continue
            self._streams[rid] = (loop, stream)
            loop.call_soon_threadsafe(added.set_result, None)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(0.5)
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
            self._drain_inbox()
            for rid in list(self._streams):
                out = self.engine.abort(rid)
                if out is not None:
                    self._deliver(rid, out)
        except BaseException as e:  # noqa: BLE001 - every waiting stream must hear of it
            with self._death_lock:
                self._error = e
            self._fail_everyone()
            log.error("the engine step loop failed; every request now gets EngineDeadError", exc_info=e)

    def _fail_everyone(self) -> None:
        """End every stream and every request still in the inbox with EngineDeadError. A consumer whose
        event loop has closed cannot be told and must not stop the others from being told."""
        targets = [(loop, stream.put_nowait) for loop, stream in self._streams.values()]
        self._streams.clear()
        for item in self._inbox_items():
            if item[0] == "add":
                targets.append((item[5], item[7].set_exception))
        for loop, tell in targets:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(tell, self._dead_error())
