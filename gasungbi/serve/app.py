"""The FastAPI app: OpenAI-compatible routes over the :class:`~gasungbi.serve.scheduler.Scheduler`.

    GET  /                      the chat page (static/index.html)
    GET  /health                200 while the scheduler runs
    GET  /metrics               Prometheus text
    GET  /v1/models             the one model served
    POST /v1/completions        prompt(s) as text or token ids; n, stop, seed, stream, echo + logprobs
    POST /v1/chat/completions   messages through the model's chat template; streaming as SSE

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad input
(400 invalid, 401 no/wrong key, 404 unknown model or route, 413 body too large, 429 queue full
with ``Retry-After``). The routes are in ``routes``, the OpenAI shapes in ``openai_format``, the
path from the scheduler's thread to a response in ``respond``; this module puts them together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gasungbi.data.conventions import Conventions
from gasungbi.serve.metrics import Metrics
from gasungbi.serve.openai_format import TokenText
from gasungbi.serve.protocol import ApiError
from gasungbi.serve.routes import router, v1
from gasungbi.serve.scheduler import Scheduler

log = logging.getLogger("gasungbi.serve")

STATIC = Path(__file__).parent / "static"
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


@dataclasses.dataclass
class ServeConfig:
    """What the server answers as: the model's name, the API key (None: open), the body size limit,
    and whether special-token text inside chat messages is read as control tokens (default: as text)."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    special_tokens_in_content: bool = False


def create_app(scheduler: Scheduler, tokenizer, config: ServeConfig, conventions=None) -> FastAPI:
    """The FastAPI app serving ``scheduler``'s model; the scheduler starts and stops with it.

    ``conventions``: the checkpoint's chat template and stops (default: gasungbi's template, the
    config's eos)."""

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close)

    app = FastAPI(title="gasungbi", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    st = app.state
    st.scheduler, st.tokenizer, st.config = scheduler, tokenizer, config
    if conventions is None:
        eos = scheduler.model.config.eos_token_id
        conventions = Conventions(tokenizer, eos_ids=[eos] if eos is not None else [])
    st.conventions = conventions
    st.tokens = TokenText(tokenizer)
    st.outboxes = {}  # event loop -> Outbox (see respond.channel)
    st.page = (STATIC / "index.html").read_text(encoding="utf-8")
    st.created = int(time.time())
    scheduler.metrics.watch(scheduler.gauges)
    app.include_router(router)
    app.include_router(v1)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_middleware(_CountRequests, metrics=scheduler.metrics)
    return app


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _api_error(request, e: ApiError) -> JSONResponse:
    return _error_response(e)


async def _http_error(request, e: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404 and 405 (no such route, wrong method) in the OpenAI error shape."""
    msg = {404: f"no route {request.method} {request.url.path}",
           405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return _error_response(ApiError(e.status_code, msg, code=code))


async def _server_error(request, e: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return _error_response(ApiError(500, f"internal error: {type(e).__name__}", code="internal_error"))


class _CountRequests:
    """ASGI middleware counting responses by route and status (it never touches the body, so
    streaming and disconnect detection are unaffected)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.request(route, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
