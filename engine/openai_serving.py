"""One OpenAI request's life in the server: admit, fan out, wait for first tokens, then stream or collect.

A streaming response starts (status 200) only once every choice has its first token: until then the
request can still fail as a whole with a proper status (an over-long prompt is refused by the engine
when it first sees it; a request can time out while queued). Whatever ends a request early (the client
leaving, the timeout, shutdown) aborts its unfinished engine requests exactly once, in a task of its own
so a cancelled handler cannot stop the abort half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from quantlab.engine import openai_format as fmt
from quantlab.engine.fanout import Fanout
from quantlab.engine.metrics import ServerMetrics
from quantlab.errors import EngineDeadError, QuantlabError

log = logging.getLogger("quantlab.serve")


class HTTPError(Exception):
    """A refusal with its HTTP status; rendered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class ServerState:
    """What the handlers share: engine, settings, metrics, the queue count and the draining flag."""

    def __init__(self, async_llm, settings):
        self.llm, self.settings = async_llm, settings
        self.model_name = settings.model_name or async_llm.model_name
        self.metrics = ServerMetrics(async_llm.stats, self.model_name)
        self.queued = 0
        self.draining = False
        self.cleanups: set[asyncio.Task] = set()

    def admit(self, model: str | None, num_sequences: int) -> None:
        if self.draining:
            raise HTTPError(503, "the server is shutting down and admits no new requests")
        if (dead := self.llm.dead_reason) is not None:
            raise HTTPError(503, dead)
        if model is not None and model != self.model_name:
            raise HTTPError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`", "model")
        if self.queued + num_sequences > self.settings.max_queue:
            raise HTTPError(429, f"the queue is full ({self.queued} sequences wait for a first token, --max-queue "
                                 f"{self.settings.max_queue}); retry later")

    def abort_soon(self, fan: Fanout) -> asyncio.Task:
        """Abort `fan`'s unfinished choices in a task of its own (a no-op when all finished)."""
        task = asyncio.ensure_future(fan.cancel())
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)
        return task


async def respond(state: ServerState, request: Request, body, prompts: list, chat: bool) -> Response:
    """The HTTP response to a validated completions (`chat=False`) or chat request."""
    params = body.to_sampling_params()
    jobs = [(p, replace(params, seed=s)) for p in prompts for s in body.seeds()]
    state.admit(body.model, len(jobs))
    fan = Fanout(state.llm, state.metrics, fmt.new_id("chatcmpl" if chat else "cmpl"), jobs, body.priority, body.n)
    timeout = state.settings.request_timeout
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    watcher = asyncio.create_task(_abort_on_disconnect(request, state, fan))
    state.queued += len(jobs)
    queued, streaming = len(jobs), False
    try:
        try:
            async with asyncio.timeout_at(deadline):
                first = await fan.first_outputs()
                state.queued, queued = state.queued - queued, 0
                while not body.stream and await fan.next() is not None:
                    pass
        except TimeoutError:
            raise HTTPError(408, f"the request did not finish within --request-timeout {timeout} s") from None
        if fan.closed:  # the client left before the response started: nobody reads this
            return Response(status_code=499)
        reply = _Reply(fan, body, chat, len(prompts), state.model_name, state.llm.tokenizer,
                       abort=lambda: asyncio.shield(state.abort_soon(fan)))
        if not body.stream:
            return JSONResponse(reply.full())
        streaming = True
        return _EngineStream(reply.chunks(first, deadline, timeout), state, fan)
    finally:
        state.queued -= queued
        watcher.cancel()
        if not streaming:
            await asyncio.shield(state.abort_soon(fan))


async def _abort_on_disconnect(request: Request, state: ServerState, fan: Fanout) -> None:
    """Until the response starts, nothing else listens to the connection: a client gone aborts here."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    state.abort_soon(fan)


class _EngineStream(StreamingResponse):
    """An SSE response that aborts its unfinished choices however it ends (Starlette cancels the body
    iterator when the client disconnects; that alone would leave the engine requests running)."""

    def __init__(self, chunks, state: ServerState, fan: Fanout):
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._state, self._fan = state, fan

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            task = self._state.abort_soon(self._fan)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self.body_iterator.aclose()
            await asyncio.shield(task)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Reply:
    """The response body (whole or as stream chunks) from a Fanout's outputs."""

    def __init__(self, fan: Fanout, body, chat: bool, num_prompts: int, model: str, tokenizer, abort):
        self.fan, self.body, self.chat, self.model, self.tokenizer = fan, body, chat, model, tokenizer
        self.abort = abort  # awaited before an error event, so the blocks are back before the client hears
        self.num_prompts, self.n = num_prompts, body.n
        self.rid = fan.ids[0].rsplit("-", 1)[0]
        self.obj = "chat.completion" if chat else "text_completion"
        self.top = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
        self.created = None

    def _choice(self, k: int, text: str, ids: list[int], lps, offset: int, finish, stream: bool) -> dict:
        if self.chat:
            logprobs = fmt.chat_logprobs(self.tokenizer, ids, lps, self.top)
            if stream:
                return fmt.chat_chunk_choice(k, {"content": text}, logprobs, finish)
            return fmt.chat_choice(k, text, logprobs, finish)
        return fmt.completion_choice(k, text, fmt.completion_logprobs(self.tokenizer, ids, lps, offset, self.top), finish)

    def usage(self) -> dict:
        prompt = sum(len(self.fan.last[p * self.n].prompt_token_ids) for p in range(self.num_prompts))
        return fmt.usage(prompt, sum(len(out.outputs[0].token_ids) for out in self.fan.last))

    def full(self) -> dict:
        choices = []
        for k, out in enumerate(self.fan.last):
            c = out.outputs[0]
            choices.append(self._choice(k, c.text, c.token_ids, c.logprobs, 0, c.finish_reason, stream=False))
        return {**fmt.envelope(self.rid, self.obj, self.model, choices), "usage": self.usage()}

    def _chunk(self, choices: list, **extra) -> str:
        env = fmt.envelope(self.rid, self.obj + (".chunk" if self.chat else ""), self.model, choices, self.created)
        self.created = env["created"]
        return sse({**env, **extra})

    async def chunks(self, first: list, deadline: float | None, timeout: float | None):
        """SSE events: the first outputs, then each new one, the usage chunk if asked, `data: [DONE]`."""
        state = [fmt.Choice(k) for k in range(len(self.fan.ids))]
        if self.chat:
            yield self._chunk([fmt.chat_chunk_choice(k, {"role": "assistant", "content": ""}, None, None)
                               for k in range(len(state))])
        pending = list(first)
        try:
            while True:
                if pending:
                    item = pending.pop(0)
                else:
                    async with asyncio.timeout_at(deadline):
                        item = await self.fan.next()
                if item is None:
                    break
                k, out = item
                offset = state[k].text_sent
                text, ids, lps = state[k].delta(out.outputs[0])
                finish = out.outputs[0].finish_reason if out.finished else None
                yield self._chunk([self._choice(k, text, ids, lps, offset, finish, stream=True)])
            if self.body.include_usage:
                yield self._chunk([], usage=self.usage())
        except TimeoutError:
            await self.abort()
            yield sse(fmt.error_body(f"the request did not finish within --request-timeout {timeout} s", 408))
        except QuantlabError as e:
            await self.abort()
            yield sse(fmt.error_body(str(e), 400))
        except EngineDeadError as e:  # the traceback is in the log, written by the engine's thread
            await self.abort()
            yield sse(fmt.error_body(str(e), 503))
        except Exception:
            log.exception("a streaming request failed")
            await self.abort()
            yield sse(fmt.error_body("internal server error; the server log has the details", 500))
        yield "data: [DONE]\n\n"
