"""The HTTP side: OpenAI-compatible routes over the :class:`~gasungbi.serve.scheduler.Scheduler`.

    GET  /                      the chat page (static/index.html)
    GET  /health                200 while the scheduler runs
    GET  /metrics               Prometheus text
    GET  /v1/models             the one model served
    POST /v1/completions        prompt(s) as text or token ids; n, stop, seed, stream, echo + logprobs
    POST /v1/chat/completions   messages through the model's chat template; streaming as SSE

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad input
(400 invalid, 401 no/wrong key, 404 unknown model or route, 413 body too large, 429 queue full
with ``Retry-After``). Bodies are read by hand (size limit, then strict validation) so that no
input reaches the model unchecked. A streaming client that disconnects is cancelled by Starlette
(the generator's ``finally`` cancels its sequences); a waiting non-streaming client is watched
for ``http.disconnect`` the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gasungbi.infer.chat import END, ROLES, encode_chat
from gasungbi.infer.generate import Detokenizer
from gasungbi.infer.sampling import SamplingParams
from gasungbi.serve.metrics import Metrics
from gasungbi.serve.protocol import ApiError, ChatRequest, CompletionRequest, validation_error
from gasungbi.serve.scheduler import Event, PromptLogprobs, QueueFull, Scheduler, Sequence

log = logging.getLogger("gasungbi.serve")

STATIC = Path(__file__).parent / "static"
MAX_N = 64
MAX_LOGPROBS = 20
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


class _Outbox:
    """Hands the scheduler thread's events to one event loop, many per wake-up: ``put`` queues
    them and schedules one flush (``call_soon_threadsafe``) unless one is already pending, so a
    decode step of B sequences costs one wake-up of the loop, not B."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.pending: list[tuple[asyncio.Queue, Event]] = []

    def put(self, queue: asyncio.Queue, event: Event) -> None:
        with self.lock:
            self.pending.append((queue, event))
            if len(self.pending) > 1:
                return
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for queue, event in items:
            queue.put_nowait(event)


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


class _TextLogprobs:
    """The completions-style ``logprobs`` of one choice: tokens, their logprobs, the top
    alternatives as {token: logprob}, and each token's character offset in the text."""

    def __init__(self, token_text):
        self.token_text = token_text
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def prompt(self, ids, offsets, pl: PromptLogprobs) -> None:
        for t, off, lp, top in zip(ids, offsets, pl.token_logprobs, pl.top):
            self.add(t, lp, top, off)

    def add(self, t: int, lp: float | None, top, offset: int) -> None:
        self.tokens.append(self.token_text(t))
        self.token_logprobs.append(lp)
        if top is None:
            self.top_logprobs.append(None)
        else:
            d: dict[str, float] = {}
            for tid, v in top:  # two ids can print the same: keep the larger
                d[self.token_text(tid)] = max(v, d.get(self.token_text(tid), float("-inf")))
            self.top_logprobs.append(d)
        self.text_offset.append(offset)

    def dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


@dataclasses.dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    max_tokens_default: int = 16
    """Completions' default max_tokens (OpenAI's); chat defaults to the rest of the context."""


def create_app(scheduler: Scheduler, tokenizer, config: ServeConfig) -> FastAPI:
    """The FastAPI app serving ``scheduler``'s model; the scheduler starts and stops with it."""
    model_cfg = scheduler.model.config
    V = model_cfg.vocab_size
    metrics = scheduler.metrics
    end_id = tokenizer.token_to_id(END)
    created = int(time.time())
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close)

    app = FastAPI(title="gasungbi", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    # --- errors ------------------------------------------------------------------------------

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(ApiError(e.status_code, msg, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error_response(ApiError(400, f"invalid request: {e.errors()[0].get('msg')}"))

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        log.exception("unhandled error")
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", code="internal_error"))

    # --- helpers -----------------------------------------------------------------------------

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request, model_cls):
        limit = config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared):,} bytes exceeds the limit of {limit:,} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit:,} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            return model_cls.model_validate_json(b"".join(chunks))
        except ValidationError as e:
            raise validation_error(e) from None

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{config.model_name}'",
                           param="model", code="model_not_found")

    def sampling_of(req) -> SamplingParams:
        if not 0 <= req.temperature <= 2:
            raise ApiError(400, f"'temperature' must be in [0, 2], got {req.temperature}", param="temperature")
        if not 1 <= req.n <= MAX_N:
            raise ApiError(400, f"'n' must be in [1, {MAX_N}], got {req.n}", param="n")
        if req.seed is not None and not -2**63 <= req.seed < 2**63:
            raise ApiError(400, f"'seed' must fit in 64 bits (-2**63 <= seed < 2**63), got {req.seed}", param="seed")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
        try:
            return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                                  repetition_penalty=req.repetition_penalty, seed=req.seed)
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise ApiError(400, str(e), param=param) from None

    def stops_of(req) -> list[str]:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "'stop' takes at most 4 non-empty strings", param="stop")
        return stop

    def check_context(L: int, max_tokens: int, param: str) -> None:
        limit = scheduler.max_len
        if L + max_tokens > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the prompt has {L} "
                                f"tokens and max_tokens is {max_tokens} ({L + max_tokens} in all): shorten the "
                                f"{param} or lower max_tokens", param=param if L > limit else "max_tokens",
                           code="context_length_exceeded")

    def check_max_tokens(m: int, allow_zero: bool = False) -> None:
        if m < 0 or (m == 0 and not allow_zero):
            hint = " (0 is allowed only with 'echo': true, to score the prompt)" if m == 0 else ""
            raise ApiError(400, f"'max_tokens' must be >= 1, got {m}{hint}", param="max_tokens")

    def seed_of(sampling: SamplingParams, k: int) -> SamplingParams:
        """Choice k > 0 of a seeded request gets its own seed (choice 0 uses the seed itself)."""
        if sampling.seed is None or k == 0:
            return sampling
        return dataclasses.replace(sampling, seed=(sampling.seed + k * 0x9E3779B97F4A7C15) % 2**63)

    byte_of = {c: b for b, c in _bytes_to_unicode().items()}

    @functools.lru_cache(maxsize=1 << 16)
    def token_bytes(t: int) -> bytes:
        """The bytes token ``t`` stands for (byte-level BPE), or its decoded text's UTF-8."""
        piece = tokenizer.id_to_token(t)
        if piece is not None and all(c in byte_of for c in piece):
            return bytes(byte_of[c] for c in piece)
        return tokenizer.decode([t], skip_special_tokens=False).encode()

    @functools.lru_cache(maxsize=1 << 16)
    def token_text(t: int) -> str:
        """A token as text; part of a UTF-8 character is written ``bytes:\\xe5\\xa5`` as OpenAI does."""
        text = tokenizer.decode([t], skip_special_tokens=False)
        if "\ufffd" in text and "\ufffd".encode() not in token_bytes(t):
            return "bytes:" + "".join(f"\\x{b:02x}" for b in token_bytes(t))
        return text

    def submit(seqs: list[Sequence]) -> None:
        if not scheduler.alive:
            raise ApiError(503, "the model is not running", code="unavailable")
        try:
            scheduler.submit(seqs)
        except QueueFull as e:
            metrics.reject()
            raise ApiError(429, f"the server is busy ({e}); retry shortly", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None

    outboxes: dict[asyncio.AbstractEventLoop, _Outbox] = {}

    def channel() -> tuple[asyncio.Queue, callable]:
        """A request's event queue, and the thread-safe ``emit`` the scheduler calls."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        outbox = outboxes.get(loop) or outboxes.setdefault(loop, _Outbox(loop))
        return queue, functools.partial(outbox.put, queue)

    async def events(queue: asyncio.Queue, n: int):
        """Yield events until all ``n`` sequences finished; None means the client went away."""
        finished = 0
        while finished < n:
            ev = await queue.get()
            if ev is None:
                return
            if ev.error is not None:
                raise ApiError(500, f"generation failed: {ev.error}", code="internal_error")
            if ev.finish_reason is not None:
                finished += 1
            yield ev

    async def watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                queue.put_nowait(None)
                return

    async def collect(request: Request, queue: asyncio.Queue, seqs: list[Sequence]) -> list[Event] | None:
        """All events of a non-streaming request (None if the client disconnected first)."""
        watcher = asyncio.create_task(watch_disconnect(request, queue))
        out: list[Event] = []
        try:
            async for ev in events(queue, len(seqs)):
                out.append(ev)
            return out if sum(e.finish_reason is not None for e in out) == len(seqs) else None
        finally:
            watcher.cancel()
            scheduler.cancel(seqs)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def streaming(gen, queue: asyncio.Queue, seqs: list[Sequence]) -> StreamingResponse:
        async def body():
            pieces = []
            try:
                async for piece in gen:
                    pieces.append(piece)
                    if queue.empty():  # one write for all the events that are already here
                        yield "".join(pieces)
                        pieces.clear()
                if pieces:
                    yield "".join(pieces)
            except ApiError as e:
                yield sse(e.body())
            finally:  # the client went away (Starlette cancels us) or we finished
                scheduler.cancel(seqs)
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # --- routes ------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            raise ApiError(503, "the scheduler is not running", code="unavailable")
        return {"status": "ok", "model": config.model_name}

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(metrics.render(scheduler.gauges()), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "gasungbi",
                "max_model_len": scheduler.max_len}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_route(model_id: str, request: Request):
        authorize(request)
        check_model(model_id)
        return model_card()

    # --- /v1/completions ---------------------------------------------------------------------

    def encode_prompts(prompt) -> list[tuple[list[int], str, list[int]]]:
        """-> (ids, text, character offset of each token) per prompt; text prompts get <|bos|>."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "'prompt' must not be empty", param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                enc = tokenizer.encode(p)
                ids, offsets = list(enc.ids), [o[0] for o in enc.offsets]
                bos = model_cfg.bos_token_id
                if bos is not None and (not ids or ids[0] != bos):
                    ids, offsets = [bos] + ids, [0] + offsets
                out.append((ids, p, offsets))
            else:
                if not p:
                    raise ApiError(400, "'prompt' holds an empty token list", param="prompt")
                bad = [t for t in p if not 0 <= t < V]
                if bad:
                    raise ApiError(400, f"token ids {bad[:5]} are out of range for a vocabulary of {V}",
                                   param="prompt", code="invalid_token")
                detok, text, offsets = Detokenizer(tokenizer), "", []
                for t in p:
                    offsets.append(len(text))
                    text += detok.add(t)
                out.append((list(p), text + detok.flush(), offsets))
        return out

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = await read_body(request, CompletionRequest)
        check_model(req.model)
        sampling = sampling_of(req)
        stop = stops_of(req)
        max_tokens = config.max_tokens_default if req.max_tokens is None else req.max_tokens
        check_max_tokens(max_tokens, allow_zero=req.echo)
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {req.logprobs}", param="logprobs")
        n_prompts = 1 if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) \
            else len(req.prompt)
        if n_prompts * req.n > scheduler.max_queue:
            raise ApiError(400, f"{n_prompts} prompts x n={req.n} sequences exceed the server's queue of "
                                f"{scheduler.max_queue}", param="n")
        prompts = encode_prompts(req.prompt)
        for ids, _, _ in prompts:
            check_context(len(ids), max_tokens, "prompt")
        stop_tokens = [] if req.ignore_eos or model_cfg.eos_token_id is None else [model_cfg.eos_token_id]
        n_seqs = len(prompts) * req.n
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(ids) for ids, _, _ in prompts)

        if max_tokens == 0 and req.logprobs is None:  # echo only: nothing to compute
            choices = [{"index": i * req.n + j, "text": text, "logprobs": None, "finish_reason": "length"}
                       for i, (_, text, _) in enumerate(prompts) for j in range(req.n)]
            return {"id": cid, "object": "text_completion", "created": now, "model": config.model_name,
                    "choices": choices, "usage": usage(prompt_tokens, 0)}

        queue, emit = channel()
        seqs = [Sequence(i * req.n + j, ids, max_tokens, seed_of(sampling, j), emit, tokenizer, stop_tokens, stop,
                         req.logprobs, req.echo)
                for i, (ids, _, _) in enumerate(prompts) for j in range(req.n)]
        submit(seqs)

        def prompt_of(index: int):
            return prompts[index // req.n]

        def scored_token(ev: Event) -> bool:
            """Whether ev's token is part of the output (a stop token is not)."""
            return ev.token is not None and not (ev.finish_reason == "stop" and ev.token in stop_tokens)

        if not req.stream:
            evs = await collect(request, queue, seqs)
            if evs is None:
                return Response(status_code=499)
            texts = {s.index: prompt_of(s.index)[1] if req.echo else "" for s in seqs}
            lps = {s.index: _TextLogprobs(token_text) for s in seqs}
            finish = {}
            for ev in evs:
                if ev.prompt_logprobs is not None and req.echo:
                    ids, _, offsets = prompt_of(ev.index)
                    lps[ev.index].prompt(ids, offsets, ev.prompt_logprobs)
                if req.logprobs is not None and scored_token(ev):
                    lps[ev.index].add(ev.token, ev.logprob, ev.top, len(texts[ev.index]))
                texts[ev.index] += ev.text
                if ev.finish_reason is not None:
                    finish[ev.index] = ev.finish_reason
            choices = [{"index": s.index, "text": texts[s.index],
                        "logprobs": lps[s.index].dict() if req.logprobs is not None else None,
                        "finish_reason": finish[s.index]} for s in seqs]
            return {"id": cid, "object": "text_completion", "created": now, "model": config.model_name,
                    "choices": choices, "usage": usage(prompt_tokens, sum(s.produced for s in seqs))}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index, text, finish=None, logprobs=None):
            obj = {"id": cid, "object": "text_completion", "created": now, "model": config.model_name,
                   "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return sse(obj)

        async def gen():
            pos = {s.index: len(prompt_of(s.index)[1]) if req.echo else 0 for s in seqs}
            if req.echo and req.logprobs is None:
                for s in seqs:
                    yield chunk(s.index, prompt_of(s.index)[1])
            async for ev in events(queue, n_seqs):
                text, lp = ev.text, None
                if ev.prompt_logprobs is not None and req.echo:
                    text = prompt_of(ev.index)[1] + text  # the echo goes with the prompt's logprobs
                if req.logprobs is not None:
                    part = _TextLogprobs(token_text)
                    if ev.prompt_logprobs is not None and req.echo:
                        ids, _, offsets = prompt_of(ev.index)
                        part.prompt(ids, offsets, ev.prompt_logprobs)
                    if scored_token(ev):
                        part.add(ev.token, ev.logprob, ev.top, pos[ev.index])
                    lp = part.dict() if part.tokens else None
                pos[ev.index] += len(ev.text)
                yield chunk(ev.index, text, ev.finish_reason, lp)  # one chunk per token, text may be ""
            if include_usage:
                yield sse({"id": cid, "object": "text_completion", "created": now, "model": config.model_name,
                           "choices": [], "usage": usage(prompt_tokens, sum(s.produced for s in seqs))})

        return streaming(gen(), queue, seqs)

    # --- /v1/chat/completions ----------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = await read_body(request, ChatRequest)
        check_model(req.model)
        sampling = sampling_of(req)
        stop = stops_of(req)
        if not req.messages:
            raise ApiError(400, "'messages' must not be empty", param="messages")
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise ApiError(400, f"messages[{i}].role {m.role!r} is not supported; expected one of "
                                    f"{', '.join(ROLES)}", param=f"messages.{i}.role")
        k = req.top_logprobs
        if k is not None and (not req.logprobs or not 0 <= k <= MAX_LOGPROBS):
            raise ApiError(400, f"'top_logprobs' must be in [0, {MAX_LOGPROBS}] and needs 'logprobs': true",
                           param="top_logprobs")
        ids = encode_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
        L = len(ids)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            if L >= scheduler.max_len:
                check_context(L, 1, "messages")
            max_tokens = scheduler.max_len - L
        check_max_tokens(max_tokens)
        check_context(L, max_tokens, "messages")
        if req.n > scheduler.max_queue:
            raise ApiError(400, f"n={req.n} exceeds the server's queue of {scheduler.max_queue}", param="n")
        stop_tokens = [] if req.ignore_eos else [t for t in (end_id, model_cfg.eos_token_id) if t is not None]
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        queue, emit = channel()
        seqs = [Sequence(j, ids, max_tokens, seed_of(sampling, j), emit, tokenizer, stop_tokens, stop,
                         (k or 0) if req.logprobs else None)
                for j in range(req.n)]
        submit(seqs)

        def lp_entry(ev: Event) -> dict | None:
            if not req.logprobs or ev.token is None or (ev.finish_reason == "stop" and ev.token in stop_tokens):
                return None
            s = token_text(ev.token)
            return {"token": s, "logprob": ev.logprob, "bytes": list(token_bytes(ev.token)),
                    "top_logprobs": [{"token": token_text(t), "logprob": v, "bytes": list(token_bytes(t))}
                                     for t, v in ev.top or []]}

        if not req.stream:
            evs = await collect(request, queue, seqs)
            if evs is None:
                return Response(status_code=499)
            texts, finish, lps = {s.index: "" for s in seqs}, {}, {s.index: [] for s in seqs}
            for ev in evs:
                texts[ev.index] += ev.text
                entry = lp_entry(ev)
                if entry is not None:
                    lps[ev.index].append(entry)
                if ev.finish_reason is not None:
                    finish[ev.index] = ev.finish_reason
            choices = [{"index": s.index, "message": {"role": "assistant", "content": texts[s.index]},
                        "logprobs": {"content": lps[s.index]} if req.logprobs else None,
                        "finish_reason": finish[s.index]} for s in seqs]
            return {"id": cid, "object": "chat.completion", "created": now, "model": config.model_name,
                    "choices": choices, "usage": usage(L, sum(s.produced for s in seqs))}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index, delta, finish=None, logprobs=None):
            obj = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": config.model_name,
                   "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return sse(obj)

        async def gen():
            for s in seqs:
                yield chunk(s.index, {"role": "assistant", "content": ""})
            async for ev in events(queue, len(seqs)):
                entry = lp_entry(ev)
                lp = {"content": [entry]} if entry is not None else None
                if ev.text or lp:
                    yield chunk(ev.index, {"content": ev.text}, None, lp)
                if ev.finish_reason is not None:
                    yield chunk(ev.index, {}, ev.finish_reason)
            if include_usage:
                yield sse({"id": cid, "object": "chat.completion.chunk", "created": now, "model": config.model_name,
                           "choices": [], "usage": usage(L, sum(s.produced for s in seqs))})

        return streaming(gen(), queue, seqs)

    app.add_middleware(_CountRequests, metrics=metrics)
    return app


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
