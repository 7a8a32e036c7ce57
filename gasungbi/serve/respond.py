"""From the scheduler thread to an HTTP response: one request's events, collected or streamed.

:func:`channel` gives a request the queue its events arrive on and the thread-safe ``emit`` its
sequences report through; :func:`respond` submits the sequences and answers either with the whole
response (waiting for every sequence to finish) or as server-sent events. Both ends cancel the
sequences when the client goes away: a stream is cancelled by Starlette (the generator's
``finally``), a waiting client is watched for ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from typing import Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from gasungbi.serve.openai_format import Reply, sse
from gasungbi.serve.protocol import ApiError
from gasungbi.serve.scheduler import Event, QueueFull, Scheduler, Sequence


class Outbox:
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


def channel(outboxes: dict[asyncio.AbstractEventLoop, Outbox]) -> tuple[asyncio.Queue, Callable[[Event], None]]:
    """A request's event queue, and the thread-safe ``emit`` the scheduler calls (one outbox per loop)."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    outbox = outboxes.get(loop) or outboxes.setdefault(loop, Outbox(loop))
    return queue, functools.partial(outbox.put, queue)


async def respond(request: Request, scheduler: Scheduler, queue: asyncio.Queue, seqs: list[Sequence], reply: Reply,
                  stream: bool) -> Response | dict:
    """Submit ``seqs`` (503 if the scheduler is down, 429 if its queue is full), then answer with
    ``reply``: its whole body, or its chunks as server-sent events ending with ``[DONE]``."""
    if not scheduler.alive:
        raise ApiError(503, "the model is not running", code="unavailable")
    try:
        scheduler.submit(seqs)
    except QueueFull as e:
        scheduler.metrics.reject()
        raise ApiError(429, f"the server is busy ({e}); retry shortly", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    if stream:
        return _stream(reply, scheduler, queue, seqs)
    watcher = asyncio.create_task(_watch_disconnect(request, queue))
    try:
        async for ev in _events(queue, len(seqs)):
            reply.add(ev)
    finally:
        watcher.cancel()
        scheduler.cancel(seqs)
    if len(reply.finish) < len(seqs):  # the client went away first
        return Response(status_code=499)
    # a body of many prompts' logprobs takes long enough to build and encode to stall /health: off the loop
    body = await asyncio.to_thread(lambda: json.dumps(reply.body(), ensure_ascii=False, separators=(",", ":")))
    return Response(body, media_type="application/json")


def _stream(reply: Reply, scheduler: Scheduler, queue: asyncio.Queue, seqs: list[Sequence]) -> StreamingResponse:
    async def chunks():
        for c in reply.start():
            yield reply.chunk(c)
        async for ev in _events(queue, len(seqs)):
            for c in reply.chunks(ev):
                yield reply.chunk(c)
        if reply.include_usage:
            yield reply.usage_chunk()

    async def body():
        pieces = []
        try:
            async for obj in chunks():
                pieces.append(sse(obj))
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


async def _events(queue: asyncio.Queue, n: int):
    """Yield events until all ``n`` sequences finished; stop early if the client went away (None)."""
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


async def _watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            queue.put_nowait(None)
            return
