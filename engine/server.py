"""The OpenAI-compatible HTTP server: `create_app(async_llm, settings)` and `serve(async_llm, settings)`.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models, /health,
/metrics. Every error is OpenAI's JSON error object with the status a client can act on: 400 for a bad
field (named in the message and in `param`) or a prompt the engine refuses, 404 for another model's name
or an unknown route, 408 past --request-timeout, 429 past --max-queue, 503 while shutting down or once
the engine's step loop has died (/health too, so a liveness probe restarts the process), 500 for anything
else (the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from quantlab.engine import openai_format as fmt
from quantlab.engine.openai_serving import HTTPError, ServerState, respond
from quantlab.engine.protocol import ChatCompletionRequest, CompletionRequest, RequestFieldError
from quantlab.errors import EngineDeadError, EngineRequestError, QuantlabError

log = logging.getLogger("quantlab.serve")
_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)


class ServeError(QuantlabError):
    """A server setting is invalid (port, queue size, timeouts)."""


@dataclass(frozen=True)
class ServerSettings:
    """How the server listens, admits and bounds requests.

    Args:
        host, port: where uvicorn listens (loopback by default: exposing it is a decision).
        max_queue: sequences admitted but still without their first token; one more gets 429.
        request_timeout: seconds from arrival to the last token (None = no limit); past it, 408.
        grace_period: seconds SIGTERM waits for in-flight requests before aborting them.
        model_name: the name /v1/models lists and requests may give (default: the engine's).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 1024
    request_timeout: float | None = None
    grace_period: float = 30.0
    model_name: str | None = None

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port must be in [0, 65535] (got {self.port})")
        if self.max_queue < 1:
            raise ServeError(f"--max-queue must be at least 1 (got {self.max_queue})")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ServeError(f"--request-timeout must be a positive number of seconds (got {self.request_timeout})")
        if not self.grace_period >= 0:
            raise ServeError(f"--grace-period must be >= 0 seconds (got {self.grace_period})")


def create_app(async_llm, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `async_llm` (the `AsyncLLM` interface); its shutdown shuts the engine down."""
    state = ServerState(async_llm, settings or ServerSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.draining = True
        await asyncio.gather(*state.cleanups, return_exceptions=True)
        await async_llm.shutdown()

    app = FastAPI(title="quantlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = state
    _install_error_handlers(app, state)

    @app.get("/health")
    async def health():
        if state.draining:
            raise HTTPError(503, "the server is shutting down")
        if (dead := async_llm.dead_reason) is not None:
            raise HTTPError(503, dead)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "quantlab",
                "max_model_len": async_llm.max_seq_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await respond(state, request, body, body.prompts(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        from jinja2 import TemplateError

        try:
            prompt = async_llm.apply_chat_template(body.template_messages())
        except TemplateError as e:  # e.g. a template that insists roles alternate: the client's to fix
            raise RequestFieldError(f"messages were refused by the model's chat template: {e}") from None
        return await respond(state, request, body, [prompt], chat=True)

    return app


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    def reply(status: int, message: str, param: str | None = None) -> JSONResponse:
        state.metrics.rejected(status)
        return JSONResponse(fmt.error_body(message, status, param), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError):
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            return reply(400, "the request body is not valid JSON")
        # Union members appear in `loc` as type names (prompt.list[int].0); keep the field path only.
        path = [str(p) for p in err["loc"][1:] if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)]
        field = ".".join(path) or "body"
        if err["type"] == "extra_forbidden":
            return reply(400, f"{field} is not a field this endpoint accepts", field)
        if err["type"] == "missing":
            return reply(400, f"{field} is required", field)
        return reply(400, f"{field}: {err['msg'][0].lower()}{err['msg'][1:]}", field)

    @app.exception_handler(HTTPError)
    async def refused(request, exc: HTTPError):
        return reply(exc.status, exc.message, exc.param)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request, exc: EngineDeadError):  # the engine's thread logged the traceback
        return reply(503, str(exc))

    @app.exception_handler(QuantlabError)
    async def bad_request(request, exc: QuantlabError):
        first = str(exc).split(" ", 1)[0]
        param = first if first in _FIELDS else "prompt" if isinstance(exc, EngineRequestError) else None
        return reply(400, str(exc), param)

    @app.exception_handler(HTTPException)
    async def http_exception(request, exc: HTTPException):
        return reply(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        log.error("request failed", exc_info=exc)
        return reply(500, "internal server error; the server log has the details")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "literal"}


class _Server(uvicorn.Server):
    """uvicorn's server, which also stops admitting (503) the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig, frame) -> None:
        self._state.draining = True
        super().handle_exit(sig, frame)


def make_server(async_llm, settings: ServerSettings, log_level: str = "info") -> _Server:
    """A uvicorn server for the app; on shutdown it waits `grace_period` for in-flight requests, then
    cancels them (which aborts their engine requests) and shuts the engine down."""
    app = create_app(async_llm, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=settings.grace_period, lifespan="on")
    return _Server(config, app.state.serving)


def serve(async_llm, settings: ServerSettings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully and return (exit code 0).

    uvicorn re-raises the signal it handled once it has shut down, to end the process the default way
    (exit status 143 for SIGTERM); a graceful, complete shutdown is a success, so the re-raise is caught.
    The socket is bound here so that a port in use is one sentence (ServeError), not uvicorn's exit.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {settings.host}:{settings.port} ({e.strerror or e})") from None
    server = make_server(async_llm, settings)
    logging.getLogger("uvicorn.error").info(  # uvicorn's logger: one format for every startup line
        "serving %s at http://%s:%d (SIGTERM drains for up to %g s, then exits)",
                server.config.app.state.serving.model_name, settings.host, sock.getsockname()[1], settings.grace_period)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def background_server(async_llm, settings: ServerSettings | None = None, log_level: str = "warning",
                      startup_timeout: float = 60.0) -> Iterator[tuple[str, ServerState]]:
    """Serve on a free loopback port from a background thread (bench, tests); yield (base URL, state).

    On exit the server shuts down as on SIGTERM (grace period, then abort) and the thread is joined.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(async_llm, replace(settings or ServerSettings(grace_period=2.0), port=port), log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="quantlab-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ServeError(f"the server did not start within {startup_timeout:.0f} s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server.config.app.state.serving
    finally:
        server.should_exit = True
        thread.join(timeout=(settings or ServerSettings(grace_period=2.0)).grace_period + 30)
