"""The OpenAI request bodies we accept, the checks on them, and the OpenAI error shape.

Bodies are read by hand (:func:`read_body`: JSON only, the size limit, a time limit, then strict
validation) so that no input reaches the model unchecked. Validation is strict (a string where a number belongs is an
error, not a conversion); fields we do not implement (``user``, ``logit_bias``,
``presence_penalty``...) are ignored, as other OpenAI-compatible servers do. ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos`` and ``chat_template_kwargs`` (the template's own switches, e.g.
DeepSeek-V3.1's ``thinking``, Qwen3's ``enable_thinking``) are accepted as extensions under vLLM's names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from gasungbi.infer.sampling import SamplingParams

log = logging.getLogger("gasungbi.serve")

MAX_N = 64
MAX_LOGPROBS = 20
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions (chat defaults to the rest of the context)


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = COMPLETION_MAX_TOKENS  # null means the default too
    echo: bool = False
    logprobs: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class CallFunction(_Body):
    name: str
    arguments: str  # JSON


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: CallFunction


class ChatMessage(_Body):
    role: str
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_dict(self) -> dict:
        """The message as chat templates read it (OpenAI's shape)."""
        d = {"role": self.role, "content": self.text() if self.content is not None else None}
        if self.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class _FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: _FunctionName


class JsonSchemaFormat(_Body):
    name: str | None = None
    json_schema: dict = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Union[bool, int, float, str, None]] | None = None  # vLLM's: {"thinking": true}
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None


_UNIONS = {
    "prompt": "expected a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "expected a string or a list of strings",
    "tool_choice": "expected \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
}


def validation_error(e: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the field."""
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                        code="invalid_json")
    loc = [str(x) for x in err["loc"]]
    if not loc:
        return ApiError(400, f"the request body must be a JSON object ({err['msg'].lower()})", code="invalid_body")
    param = loc[0]
    if param in _UNIONS and err["type"] != "missing":
        return ApiError(400, f"invalid '{param}': {_UNIONS[param]}", param=param, code="invalid_type")
    # drop pydantic's union branch tags ("str", "list[...]") from the path
    path = ".".join(x for x in loc if not (x in ("str", "int") or "[" in x))
    if err["type"] == "missing":
        return ApiError(400, f"'{path}' is required", param=path, code="missing_field")
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return ApiError(400, f"invalid '{path}': {err['msg'][0].lower() + err['msg'][1:]} (got {got})", param=path,
                    code="invalid_type")


# --- reading and checking a request ----------------------------------------------------------

async def read_body(request, model_cls: type[_Body], limit: int, timeout: float) -> _Body:
    """``request``'s JSON body validated as ``model_cls`` (else 400): 415 if it is not
    ``application/json``, 413 beyond ``limit`` bytes, 408 if it takes over ``timeout`` seconds to arrive.
    A client that hangs up mid-body is logged in one line (499, never sent)."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the request body must be JSON sent as 'Content-Type: application/json', "
                            f"not {kind or 'no content type'!r}", code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared):,} bytes exceeds the limit of {limit:,} bytes",
                       code="request_too_large")
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit:,} bytes", code="request_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s ({size:,} bytes came)",
                       code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        client = request.client
        log.warning("%s hung up after %s of %s bytes of its %s body", f"{client.host}:{client.port}" if client
                    else "a client", f"{size:,}", f"{int(declared):,}" if declared.isdigit() else "?",
                    request.url.path)
        raise ApiError(499, "the client hung up while sending its request body", code="client_closed_request") \
            from None
    try:  # parsing megabytes of JSON takes long enough to stall /health: off the event loop
        return await asyncio.to_thread(model_cls.model_validate_json, b"".join(chunks))
    except ValidationError as e:
        raise validation_error(e) from None


def check_model(name: str | None, served: str) -> None:
    """A request naming a model must name the ``served`` one (404 otherwise)."""
    if name is not None and name != served:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")


def sampling_of(req: _Sampling) -> SamplingParams:
    """The sampling parameters of a request, with its ranges checked."""
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


def seed_of(sampling: SamplingParams, k: int) -> SamplingParams:
    """Choice k > 0 of a seeded request gets its own seed (choice 0 uses the seed itself)."""
    if sampling.seed is None or k == 0:
        return sampling
    return dataclasses.replace(sampling, seed=(sampling.seed + k * 0x9E3779B97F4A7C15) % 2**63)


MAX_STOP_CHARS = 1000
"""The longest stop string: every decoded token is checked against each stop's tail."""


def stops_of(req: _Sampling) -> list[str]:
    """The request's stop strings as a list (at most 4, none empty, none over :data:`MAX_STOP_CHARS`)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "'stop' takes at most 4 non-empty strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"a stop string may have at most {MAX_STOP_CHARS:,} characters, got "
                            f"{max(map(len, stop)):,}", param="stop")
    return stop


def include_usage(req: _Sampling) -> bool:
    """Whether a streamed answer ends with a usage chunk (``stream_options.include_usage``)."""
    return bool(req.stream_options and req.stream_options.include_usage)


def check_max_tokens(m: int, allow_zero: bool = False) -> None:
    """``max_tokens`` must be >= 1 (0 only where ``allow_zero``: echo, to score a prompt)."""
    if m < 0 or (m == 0 and not allow_zero):
        hint = " (0 is allowed only with 'echo': true, to score the prompt)" if m == 0 else ""
        raise ApiError(400, f"'max_tokens' must be >= 1, got {m}{hint}", param="max_tokens")


def check_context(L: int, max_tokens: int, limit: int, param: str) -> None:
    """A prompt of ``L`` tokens plus ``max_tokens`` must fit the ``limit`` cache slots of a sequence."""
    if L + max_tokens > limit:
        raise ApiError(400, f"this model's maximum context length is {limit} tokens; the prompt has {L} "
                            f"tokens and max_tokens is {max_tokens} ({L + max_tokens} in all): shorten the "
                            f"{param} or lower max_tokens", param=param if L > limit else "max_tokens",
                       code="context_length_exceeded")


MAX_CHARS_PER_TOKEN = 64  # generous: a token of a real vocabulary rarely spans more characters


def check_prompt_size(prompt, limit: int, param: str) -> None:
    """Refuse a prompt that cannot fit the ``limit`` cache slots before spending seconds tokenizing
    it: a token-id list longer than ``limit``, or a text of more characters than ``limit`` tokens of
    :data:`MAX_CHARS_PER_TOKEN` characters hold. ``prompt``: a text, an id list, or a list of either."""
    single = isinstance(prompt, str) or bool(prompt and isinstance(prompt[0], int))
    for p in [prompt] if single else prompt:
        if isinstance(p, str) and len(p) > limit * MAX_CHARS_PER_TOKEN:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the {param} of "
                                f"{len(p):,} characters is far longer: shorten the {param}", param=param,
                           code="context_length_exceeded")
        if isinstance(p, list) and len(p) > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the {param} has "
                                f"{len(p):,} tokens: shorten the {param}", param=param, code="context_length_exceeded")
