"""How our tokens and the scheduler's events are written in OpenAI's formats.

Prompt encoding (text or token ids, with character offsets), token text and bytes, the two
logprobs shapes (completions' parallel lists, chat's list of entries), and one :class:`Reply`
per endpoint that folds a request's events into the whole response or turns each event into
stream chunks. Nothing here touches HTTP.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from typing import NamedTuple

from gasungbi.data.conventions import encode
from gasungbi.infer.generate import Detokenizer
from gasungbi.serve.protocol import ApiError
from gasungbi.serve.reasoning import ReasoningSplitter
from gasungbi.serve.tools import ToolStream, openai_calls
from gasungbi.serve.scheduler import Event, PromptLogprobs, Sequence


def sse(obj: dict) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# --- tokens and prompts ----------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class TokenText:
    """A tokenizer's tokens one at a time, as OpenAI reports them in logprobs (cached per id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self.bytes = functools.lru_cache(maxsize=1 << 16)(self._bytes)
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)

    def _bytes(self, t: int) -> bytes:
        """The bytes token ``t`` stands for (byte-level BPE), or its decoded text's UTF-8."""
        piece = self.tokenizer.id_to_token(t)
        if piece is not None and all(c in self.byte_of for c in piece):
            return bytes(self.byte_of[c] for c in piece)
        return self.tokenizer.decode([t], skip_special_tokens=False).encode()

    def _text(self, t: int) -> str:
        """A token as text; part of a UTF-8 character is written ``bytes:\\xe5\\xa5`` as OpenAI does."""
        text = self.tokenizer.decode([t], skip_special_tokens=False)
        if "\ufffd" in text and "\ufffd".encode() not in self.bytes(t):
            return "bytes:" + "".join(f"\\x{b:02x}" for b in self.bytes(t))
        return text


class Prompt(NamedTuple):
    """One completions prompt: its token ids, its text, and each token's character offset in it."""

    ids: list[int]
    text: str
    offsets: list[int]


def prompt_count(prompt) -> int:
    """How many prompts a completions ``prompt`` field holds (a string or one id list is one)."""
    return 1 if _single(prompt) else len(prompt)


def _single(prompt) -> bool:
    return isinstance(prompt, str) or bool(prompt and isinstance(prompt[0], int))


def encode_prompts(tokenizer, prompt, vocab_size: int) -> list[Prompt]:
    """A completions ``prompt`` field as prompts; text prompts get the special tokens the
    tokenizer's own rule puts around text (:func:`gasungbi.data.conventions.encode`)."""
    if _single(prompt):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "'prompt' must not be empty", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids, offsets = encode(tokenizer, p)
            out.append(Prompt(ids, p, offsets))
            continue
        if not p:
            raise ApiError(400, "'prompt' holds an empty token list", param="prompt")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(400, f"token ids {bad[:5]} are out of range for a vocabulary of {vocab_size}",
                           param="prompt", code="invalid_token")
        detok, text, offsets = Detokenizer(tokenizer), "", []
        for t in p:
            offsets.append(len(text))
            text += detok.add(t)
        out.append(Prompt(list(p), text + detok.flush(), offsets))
    return out


def chat_prompt(conventions, messages: list[dict], content_as_text: bool = True,
                template_kwargs: dict | None = None, tools: list[dict] | None = None) -> list[int]:
    """A chat's prompt ids through the checkpoint's template (``apply_chat_template(...,
    add_generation_prompt=True, **template_kwargs)``). ``content_as_text``: special-token strings
    inside a message are encoded as text, as the OpenAI API treats content, so a message cannot
    forge another turn."""
    try:
        return conventions.chat_ids(messages, add_generation_prompt=True, content_as_text=content_as_text,
                                    template_kwargs=template_kwargs, tools=tools)
    except ValueError as e:  # the template's raise_exception, or an unknown role
        raise ApiError(400, str(e), param="messages") from None


# --- logprobs --------------------------------------------------------------------------------

class TextLogprobs:
    """The completions-style ``logprobs`` of one choice: tokens, their logprobs, the top
    alternatives as {token: logprob}, and each token's character offset in the text."""

    def __init__(self, tokens: TokenText):
        self.token_text = tokens.text
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def prompt(self, p: Prompt, pl: PromptLogprobs) -> None:
        for t, off, lp, top in zip(p.ids, p.offsets, pl.token_logprobs, pl.top):
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

    def extend(self, other: TextLogprobs) -> None:
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset

    def dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def chat_logprob(tokens: TokenText, ev: Event) -> dict:
    """The chat-style logprobs entry of ``ev``'s token: text, logprob, bytes and top alternatives."""
    return {"token": tokens.text(ev.token), "logprob": ev.logprob, "bytes": list(tokens.bytes(ev.token)),
            "top_logprobs": [{"token": tokens.text(t), "logprob": v, "bytes": list(tokens.bytes(t))}
                             for t, v in ev.top or []]}


# --- responses and chunks --------------------------------------------------------------------

class Reply:
    """One request's answer: ``add`` folds an event into the whole response (``body``); ``chunks``
    does the same and returns the choices to stream for it (``start``: those sent before any)."""

    object: str  # of the whole response
    chunk_object: str  # of each stream chunk

    def __init__(self, id_prefix: str, model: str, seqs: list[Sequence], prompt_tokens: int,
                 include_usage: bool, stop_tokens: list[int]):
        self.id, self.created = f"{id_prefix}-{uuid.uuid4().hex}", int(time.time())
        self.model, self.seqs, self.prompt_tokens = model, seqs, prompt_tokens
        self.include_usage, self.stop_tokens = include_usage, stop_tokens
        self.finish: dict[int, str] = {}

    def scored(self, ev: Event) -> bool:
        """Whether ev's token is part of the output (a stop token is not)."""
        return ev.token is not None and not (ev.finish_reason == "stop" and ev.token in self.stop_tokens)

    def _envelope(self, object: str, choices: list[dict], **more) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices,
                **more}

    def usage(self) -> dict:
        completion = sum(s.produced for s in self.seqs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens()}}

    def cached_tokens(self) -> int:
        """Prompt tokens not prefilled (prefix cache hits): one prompt, its choices' best."""
        return max((s.cached for s in self.seqs), default=0)

    def body(self) -> dict:
        """The whole (non-streamed) response, from the events ``add``ed."""
        return self._envelope(self.object, [self.choice(s.index) for s in self.seqs], usage=self.usage())

    def chunk(self, choice: dict) -> dict:
        """A stream chunk holding one choice (``usage`` is null in each when usage was asked for)."""
        obj = self._envelope(self.chunk_object, [choice])
        return dict(obj, usage=None) if self.include_usage else obj

    def usage_chunk(self) -> dict:
        """The last chunk when ``stream_options.include_usage``: no choices, the token counts."""
        return self._envelope(self.chunk_object, [], usage=self.usage())

    def start(self) -> list[dict]:
        return []

    def add(self, ev: Event) -> None:
        self.chunks(ev)

    def chunks(self, ev: Event) -> list[dict]:
        """The stream chunks of one event (each endpoint's reply says how)."""
        raise NotImplementedError(f"{type(self).__name__} must define chunks()")

    def choice(self, index: int) -> dict:
        """Choice ``index`` of the whole response (each endpoint's reply says how)."""
        raise NotImplementedError(f"{type(self).__name__} must define choice()")


class CompletionReply(Reply):
    """``/v1/completions``: text per choice, echo of the prompt, completions-style logprobs."""

    object = chunk_object = "text_completion"

    def __init__(self, model: str, seqs: list[Sequence], tokens: TokenText, prompts: list[Prompt], n: int,
                 echo: bool, logprobs: int | None, stop_tokens: list[int], include_usage: bool):
        super().__init__("cmpl", model, seqs, sum(len(p.ids) for p in prompts), include_usage, stop_tokens)
        self.tokens, self.prompts, self.n, self.echo, self.logprobs = tokens, prompts, n, echo, logprobs
        self.text = {s.index: self.prompt(s.index).text if echo else "" for s in seqs}
        self.lps = {s.index: TextLogprobs(tokens) for s in seqs}

    def prompt(self, index: int) -> Prompt:
        return self.prompts[index // self.n]

    def cached_tokens(self) -> int:
        """Per prompt its choices' best, summed (``prompt_tokens`` counts each prompt once too)."""
        best: dict[int, int] = {}
        for s in self.seqs:
            best[s.index // self.n] = max(best.get(s.index // self.n, 0), s.cached)
        return sum(best.values())

    def start(self) -> list[dict]:
        if not self.echo or self.logprobs is not None:  # with logprobs, the echo goes with the prompt's
            return []
        return [self._choice(s.index, self.prompt(s.index).text) for s in self.seqs]

    def chunks(self, ev: Event) -> list[dict]:
        i, text, part = ev.index, ev.text, None
        if self.logprobs is not None:
            part = TextLogprobs(self.tokens)
            if ev.prompt_logprobs is not None:  # only with echo
                part.prompt(self.prompt(i), ev.prompt_logprobs)
                text = self.prompt(i).text + text
            if self.scored(ev):
                part.add(ev.token, ev.logprob, ev.top, len(self.text[i]))
            self.lps[i].extend(part)
        self.text[i] += ev.text
        if ev.finish_reason is not None:
            self.finish[i] = ev.finish_reason
        # one chunk per token, its text may be ""
        return [self._choice(i, text, part.dict() if part and part.tokens else None, ev.finish_reason)]

    def choice(self, index: int) -> dict:
        # no finish: nothing was generated (max_tokens 0 with echo), the prompt is the whole text
        return self._choice(index, self.text[index], self.lps[index].dict() if self.logprobs is not None else None,
                            self.finish.get(index, "length"))

    @staticmethod
    def _choice(index: int, text: str, logprobs: dict | None = None, finish: str | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


class ChatReply(Reply):
    """``/v1/chat/completions``: an assistant message per choice, chat-style logprobs."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, seqs: list[Sequence], tokens: TokenText, prompt_tokens: int, logprobs: bool,
                 stop_tokens: list[int], include_usage: bool, reasoning: bool = False, inside: bool = False,
                 tool_format: str | None = None):
        """``reasoning``: split ``<think>...</think>`` into ``reasoning_content`` (:mod:`.reasoning`);
        ``inside``: the prompt left the reply inside the thoughts; ``tool_format``: parse the reply's
        tool calls written that way (:mod:`.tools`)."""
        super().__init__("chatcmpl", model, seqs, prompt_tokens, include_usage, stop_tokens)
        self.tokens, self.logprobs = tokens, logprobs
        self.text = {s.index: "" for s in seqs}
        self.thoughts = {s.index: "" for s in seqs}
        self.splitters = {s.index: ReasoningSplitter(inside) for s in seqs} if reasoning else None
        self.tool_streams = {s.index: ToolStream(tool_format) for s in seqs} if tool_format else None
        self.calls: dict[int, list[dict]] = {s.index: [] for s in seqs}
        self.lps: dict[int, list[dict]] = {s.index: [] for s in seqs}

    def start(self) -> list[dict]:
        return [self._choice(s.index, {"role": "assistant", "content": ""}) for s in self.seqs]

    def _split(self, i: int, text: str, last: bool) -> dict:
        """The delta of ``text``: content, or reasoning and content apart, and tool calls at the end."""
        r, c = "", text
        if self.splitters is not None:
            r, c = self.splitters[i].feed(text)
            if last:
                r2, c2 = self.splitters[i].flush()
                r, c = r + r2, c + c2
        calls = []
        if self.tool_streams is not None:
            c = self.tool_streams[i].feed(c)
            if last:
                rest, found = self.tool_streams[i].finish()
                c, calls = c + rest, openai_calls(found)
                self.calls[i] = calls
        self.thoughts[i] += r
        self.text[i] += c
        return {**({"reasoning_content": r} if r else {}), **({"content": c} if c else {}),
                **({"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]} if calls else {})}

    def chunks(self, ev: Event) -> list[dict]:
        i, out, lp = ev.index, [], None
        if self.logprobs and self.scored(ev):
            entry = chat_logprob(self.tokens, ev)
            self.lps[i].append(entry)
            lp = {"content": [entry]}
        delta = self._split(i, ev.text, ev.finish_reason is not None)
        if delta or lp:
            out.append(self._choice(i, delta, lp))
        if ev.finish_reason is not None:
            self.finish[i] = "tool_calls" if self.calls[i] else ev.finish_reason
            out.append(self._choice(i, {}, None, self.finish[i]))
        return out

    def choice(self, index: int) -> dict:
        message = {"role": "assistant", "content": self.text[index] or (None if self.calls[index] else "")}
        if self.splitters is not None:
            message["reasoning_content"] = self.thoughts[index]
        if self.calls[index]:
            message["tool_calls"] = self.calls[index]
        return {"index": index, "message": message,
                "logprobs": {"content": self.lps[index]} if self.logprobs else None,
                "finish_reason": self.finish[index]}

    @staticmethod
    def _choice(index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
