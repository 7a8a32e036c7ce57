"""The OpenAI request bodies we accept, and the OpenAI error shape.

Bodies are validated strictly (a string where a number belongs is an error, not a conversion);
fields we do not implement (``user``, ``logit_bias``, ``presence_penalty``...) are ignored, as
other OpenAI-compatible servers do. ``top_k``, ``min_p``, ``repetition_penalty`` and
``ignore_eos`` are accepted as extensions under vLLM's names.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError


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
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


_UNIONS = {
    "prompt": "expected a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "expected a string or a list of strings",
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
