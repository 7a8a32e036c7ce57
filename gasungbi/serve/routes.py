"""The server's routes: ``router`` (the page, health, metrics) and ``v1`` (the OpenAI API); /v1 and
/metrics are behind the API key when one is set. What they serve is read from ``request.app.state``
(``scheduler``, ``tokenizer``, ``conventions``, ``tokens``, ``config``, ``outboxes``, ``tokenizing``, ``page``,
``created``: set by :func:`gasungbi.serve.app.create_app`).

Each generation route checks its body, builds the scheduler's sequences and an OpenAI
:class:`~gasungbi.serve.openai_format.Reply`, and hands both to :func:`~gasungbi.serve.respond.respond`.
"""

from __future__ import annotations

import asyncio
import functools
import hmac

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from gasungbi.data.conventions import ROLES
from gasungbi.serve.metrics import CONTENT_TYPE
from gasungbi.serve.openai_format import (
    ChatReply,
    CompletionReply,
    chat_prompt,
    encode_prompts,
    prompt_count,
)
from gasungbi.serve.protocol import (
    COMPLETION_MAX_TOKENS,
    MAX_LOGPROBS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    NamedToolChoice,
    check_context,
    check_max_tokens,
    check_model,
    check_prompt_size,
    include_usage,
    read_body,
    sampling_of,
    seed_of,
    stops_of,
)
from gasungbi.serve.reasoning import opens_thinking
from gasungbi.serve.respond import channel, respond
from gasungbi.serve.tools import call_grammar, tool_format
from gasungbi.serve.scheduler import Sequence

router = APIRouter()


async def authorize(request: Request) -> None:
    """With an API key configured, /v1 routes and /metrics need ``Authorization: Bearer <key>`` (401 otherwise)."""
    key = request.app.state.config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])


async def off_loop(request: Request, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in the app's tokenizing threads, so that the event loop keeps answering."""
    work = functools.partial(fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(request.app.state.tokenizing, work)


def check_messages(messages) -> None:
    """Roles we render, and every tool message answering a call of the assistant message before it."""
    calls: set[str] = set()
    for i, m in enumerate(messages):
        if m.role not in ROLES and m.role != "tool":
            raise ApiError(400, f"messages[{i}].role {m.role!r} is not supported; expected one of "
                                f"{', '.join(ROLES)}, tool", param=f"messages.{i}.role")
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise ApiError(400, f"'messages.{i}.content' is required (only an assistant message with tool_calls "
                                "may leave it out)", param=f"messages.{i}.content", code="missing_field")
        if m.role == "assistant":
            calls = {c.id for c in m.tool_calls or []}
        elif m.role == "tool":
            if m.tool_call_id not in calls:
                raise ApiError(400, f"messages[{i}] is a tool message whose tool_call_id {m.tool_call_id!r} answers "
                                    "no call of the assistant message before it", param=f"messages.{i}.tool_call_id")
        else:
            calls = set()


def chat_tools(req) -> tuple[list[dict] | None, str | None]:
    """The tools the template lists (none with ``tool_choice: "none"``) and the call the reply must be:
    a function's name, "" for any of them (``required``), None where the model chooses (``auto``)."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    names = [t["function"]["name"] for t in tools]
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ApiError(400, f"tool_choice names the function {choice.function.name!r}, which is not among the "
                                f"request's tools ({', '.join(names) or 'none'})", param="tool_choice")
        return tools, choice.function.name
    if choice == "required":
        if not tools:
            raise ApiError(400, "tool_choice 'required' needs 'tools'", param="tool_choice")
        return tools, ""
    return (tools or None) if choice == "auto" else None, None


def constraints_of(st, response_format, n: int, calls: tuple = (None, None, None)) -> list:
    """Each choice's grammar: a call of the forced tool (``calls``: format, tools, name or "" for any),
    else ``response_format``'s JSON object or JSON valid under a schema (:mod:`gasungbi.infer.grammar`);
    None for free text. An invalid schema is a 400."""
    fmt, tools, forced = calls
    if forced is None and (response_format is None or response_format.type == "text"):
        return [None] * n
    from gasungbi.infer.grammar import GrammarError, Grammars

    if getattr(st, "grammars", None) is None:
        st.grammars = Grammars(st.tokenizer, st.scheduler.model.config.vocab_size, st.conventions.stop_ids)
    try:
        if forced is not None:
            grammar = call_grammar(fmt, tools, forced or None, st.tokenizer.token_to_id)
            return [st.grammars.lark(grammar) for _ in range(n)]
        if response_format.type == "json_object":
            return [st.grammars.json_object() for _ in range(n)]
        if response_format.json_schema is None:
            raise ApiError(400, "'response_format' of type json_schema needs 'json_schema'", param="response_format")
        return [st.grammars.json_schema(response_format.json_schema.json_schema) for _ in range(n)]
    except GrammarError as e:
        raise ApiError(400, f"invalid 'response_format': {e}", param="response_format") from None


@router.get("/", response_class=HTMLResponse)
async def index(request: Request):
    return HTMLResponse(request.app.state.page)


@router.get("/health")
async def health(request: Request):
    if not request.app.state.scheduler.alive:
        raise ApiError(503, "the scheduler is not running", code="unavailable")
    return {"status": "ok", "model": request.app.state.config.model_name}


@router.get("/metrics", dependencies=[Depends(authorize)])
async def metrics(request: Request):
    return Response(request.app.state.scheduler.metrics.render(), media_type=CONTENT_TYPE)


def _model_card(state) -> dict:
    return {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "gasungbi",
            "max_model_len": state.scheduler.max_len}


@v1.get("/models")
async def models(request: Request):
    return {"object": "list", "data": [_model_card(request.app.state)]}


@v1.get("/models/{model_id:path}")
async def model(model_id: str, request: Request):
    check_model(model_id, request.app.state.config.model_name)
    return _model_card(request.app.state)


@v1.post("/completions")
async def completions(request: Request):
    """Prompt(s) as text or token ids; n, stop, seed, stream, and echo + logprobs to score a prompt."""
    st = request.app.state
    scheduler, name, model_cfg = st.scheduler, st.config.model_name, st.scheduler.model.config
    req = await read_body(request, CompletionRequest, st.config.max_body_bytes, st.config.body_timeout)
    check_model(req.model, name)
    sampling, stop = sampling_of(req), stops_of(req)
    max_tokens = COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    check_max_tokens(max_tokens, allow_zero=req.echo)
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {req.logprobs}", param="logprobs")
    n_prompts = prompt_count(req.prompt)
    if n_prompts * req.n > scheduler.max_queue:
        raise ApiError(400, f"{n_prompts} prompts x n={req.n} sequences exceed the server's queue of "
                            f"{scheduler.max_queue}", param="n")
    check_prompt_size(req.prompt, scheduler.max_len, "prompt")  # then tokenize off the event loop
    prompts = await off_loop(request, encode_prompts, st.tokenizer, req.prompt, model_cfg.vocab_size)
    for p in prompts:
        check_context(len(p.ids), max_tokens, scheduler.max_len, "prompt")
    stop_tokens = [] if req.ignore_eos else st.conventions.eos_ids
    queue, emit = channel(st.outboxes)
    seqs = [Sequence(i * req.n + j, p.ids, max_tokens, seed_of(sampling, j), emit, st.tokenizer, stop_tokens, stop,
                     req.logprobs, req.echo)
            for i, p in enumerate(prompts) for j in range(req.n)]
    reply = CompletionReply(name, seqs, st.tokens, prompts, req.n, req.echo, req.logprobs, stop_tokens,
                            include_usage(req))
    if max_tokens == 0 and req.logprobs is None:  # echo only: nothing to compute
        return reply.body()
    return await respond(request, scheduler, queue, seqs, reply, req.stream)


@v1.post("/chat/completions")
async def chat_completions(request: Request):
    """Messages through the model's chat template; n, stop, seed, logprobs, streaming."""
    st = request.app.state
    scheduler, name = st.scheduler, st.config.model_name
    req = await read_body(request, ChatRequest, st.config.max_body_bytes, st.config.body_timeout)
    check_model(req.model, name)
    sampling, stop = sampling_of(req), stops_of(req)
    if not req.messages:
        raise ApiError(400, "'messages' must not be empty", param="messages")
    if len(req.messages) > scheduler.max_len:  # every message renders at least one token
        raise ApiError(400, f"this model's maximum context length is {scheduler.max_len} tokens; "
                            f"{len(req.messages):,} messages cannot fit it", param="messages",
                       code="context_length_exceeded")
    check_messages(req.messages)
    tools, forced = chat_tools(req)
    k = req.top_logprobs
    if k is not None and (not req.logprobs or not 0 <= k <= MAX_LOGPROBS):
        raise ApiError(400, f"'top_logprobs' must be in [0, {MAX_LOGPROBS}] and needs 'logprobs': true",
                       param="top_logprobs")
    messages = [m.template_dict() for m in req.messages]
    check_prompt_size("".join(m["content"] or "" for m in messages), scheduler.max_len, "messages")
    ids = await off_loop(request, chat_prompt, st.conventions, messages,
                         content_as_text=not st.config.special_tokens_in_content,
                         template_kwargs=req.chat_template_kwargs, tools=tools)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:  # the rest of the context
        if len(ids) >= scheduler.max_len:
            check_context(len(ids), 1, scheduler.max_len, "messages")
        max_tokens = scheduler.max_len - len(ids)
    check_max_tokens(max_tokens)
    check_context(len(ids), max_tokens, scheduler.max_len, "messages")
    if req.n > scheduler.max_queue:
        raise ApiError(400, f"n={req.n} exceeds the server's queue of {scheduler.max_queue}", param="n")
    stop_tokens = [] if req.ignore_eos else st.conventions.stop_ids
    fmt = tool_format(st.conventions.template, st.conventions.encoder) if tools else None
    constraints = await off_loop(request, constraints_of, st, req.response_format, req.n, (fmt, tools, forced))
    queue, emit = channel(st.outboxes)
    seqs = [Sequence(j, ids, max_tokens, seed_of(sampling, j), emit, st.tokenizer, stop_tokens, stop,
                     (k or 0) if req.logprobs else None, constraint=constraints[j])
            for j in range(req.n)]
    inside = st.reasoning and opens_thinking(st.tokenizer.decode(ids[-16:], skip_special_tokens=False))
    reply = ChatReply(name, seqs, st.tokens, len(ids), req.logprobs, stop_tokens, include_usage(req),
                      reasoning=st.reasoning, inside=inside, tool_format=fmt)
    return await respond(request, scheduler, queue, seqs, reply, req.stream)

