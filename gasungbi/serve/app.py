"""The FastAPI app: OpenAI-compatible routes over the :class:`~gasungbi.serve.scheduler.Scheduler`.

    GET  /                      the chat page (static/index.html)
    GET  /health                200 while the scheduler runs
    GET  /metrics               Prometheus text
    GET  /v1/models             the one model served
    POST /v1/completions        prompt(s) as text or token ids; n, stop, seed, stream, echo + logprobs
    POST /v1/chat/completions   messages through the model's chat template; streaming as SSE

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad input
(400 invalid, 401 no/wrong key, 404 unknown model or route, 408 body too slow, 413 body too large,
415 body not JSON, 429 queue full with ``Retry-After``).

Who may call (:class:`_Guard`): a web page the user visits must not drive the server, whether by
posting to it from another site or by DNS rebinding (a name of the attacker's that resolves to
127.0.0.1, read back as same-origin). So a server bound to loopback answers only loopback Host names
(``allowed_hosts`` adds others; 400 otherwise), any request carrying an ``Origin`` must come from
the server's own page or a ``cors_origins`` entry (403 otherwise; those get CORS headers and
preflights), and bodies must be ``application/json``, which a page can send cross-site only after a
preflight. The API key, when set, guards /v1 and /metrics.

The routes are in ``routes``, the OpenAI shapes in ``openai_format``, the path from the scheduler's
thread to a response in ``respond``; this module puts them together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from gasungbi.data.conventions import Conventions
from gasungbi.serve.metrics import Metrics
from gasungbi.serve.openai_format import TokenText
from gasungbi.serve.protocol import ApiError
from gasungbi.serve.reasoning import has_think_tags
from gasungbi.serve.routes import router, v1
from gasungbi.serve.scheduler import Scheduler

log = logging.getLogger("gasungbi.serve")

STATIC = Path(__file__).parent / "static"
TOKENIZE_THREADS = 1  # with 2, /health took 0.15 s (not 0.04 s) behind six 1-4 MB prompts: the GIL
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


@dataclasses.dataclass
class ServeConfig:
    """What the server answers as: the model's name, the API key (None: open), the body size limit,
    and whether special-token text inside chat messages is read as control tokens (default: as text)."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    special_tokens_in_content: bool = False
    body_timeout: float = 30.0  # seconds a request body may take to arrive (408 after)
    allowed_hosts: tuple[str, ...] | None = ()  # Host names besides loopback ones (None: any Host)
    cors_origins: tuple[str, ...] = ()  # web origins whose pages may call the API ("*": any)
    reasoning_parser: str = "auto"  # auto (on where the template or vocabulary has the think tags), none, deepseek-r1


def create_app(scheduler: Scheduler, tokenizer, config: ServeConfig, conventions=None) -> FastAPI:
    """The FastAPI app serving ``scheduler``'s model; the scheduler starts and stops with it.

    ``conventions``: the checkpoint's chat template and stops (default: gasungbi's template, the
    config's eos)."""

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close)
        app.state.tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="gasungbi", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    st = app.state
    st.scheduler, st.tokenizer, st.config = scheduler, tokenizer, config
    if conventions is None:
        eos = scheduler.model.config.eos_token_id
        conventions = Conventions(tokenizer, eos_ids=[eos] if eos is not None else [])
    st.conventions = conventions
    st.reasoning = config.reasoning_parser == "deepseek-r1" or (
        config.reasoning_parser == "auto" and has_think_tags(conventions))
    st.tokens = TokenText(tokenizer)
    st.outboxes = {}  # event loop -> Outbox (see respond.channel)
    # prompts are rendered and tokenized here, off the event loop, one at a time so that the loop
    # still gets the GIL often while a huge one is tokenized
    st.tokenizing = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize")
    st.page = (STATIC / "index.html").read_text(encoding="utf-8")
    st.created = int(time.time())
    scheduler.metrics.watch(scheduler.gauges)
    app.include_router(router)
    app.include_router(v1)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    origins = [o.rstrip("/").lower() for o in config.cors_origins]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["*"],
                           max_age=600)
    app.add_middleware(_Guard, hosts=config.allowed_hosts, origins=origins)
    app.add_middleware(_CountRequests, metrics=scheduler.metrics)  # outermost: refusals are counted too
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


def is_loopback(host: str) -> bool:
    """Whether a host name or address means this machine only (``localhost``, ``*.localhost``, 127/8, ::1)."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Guard:
    """ASGI middleware refusing requests a web page could forge: a Host name not allowed (400;
    DNS rebinding), an ``Origin`` other than the server itself or ``cors_origins`` (403)."""

    def __init__(self, app, hosts: tuple[str, ...] | None, origins: list[str]):
        self.app, self.hosts = app, None if hosts is None else {h.lower().rstrip(".") for h in hosts}
        self.origins = set(origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host, origin = headers.get("host", ""), headers.get("origin")
        if not self.host_allowed(host):
            error = ApiError(400, f"this server does not answer to the Host {host!r}, only to loopback names and "
                                  f"those given with --allowed-host", code="host_not_allowed")
        elif origin is not None and not self.origin_allowed(origin, host):
            error = ApiError(403, f"requests from the web origin {origin!r} are not allowed (allow one with "
                                  f"--cors-origin)", type="permission_error", code="origin_not_allowed")
        else:
            return await self.app(scope, receive, send)
        await _error_response(error)(scope, receive, send)

    def host_allowed(self, host: str) -> bool:
        if self.hosts is None or not host:  # no Host: HTTP/1.0, not a browser
            return True
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
        return is_loopback(name) or name.lower().rstrip(".") in self.hosts

    def origin_allowed(self, origin: str, host: str) -> bool:
        """The server's own page (the Origin names the Host it was sent to), or a ``cors_origins`` entry."""
        origin = origin.lower()
        same = host and origin.partition("://")[2] == host.lower()
        return bool(same) or origin in self.origins or "*" in self.origins
