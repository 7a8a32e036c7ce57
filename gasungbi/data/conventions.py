"""A checkpoint's own conventions: how its text and chats become token ids, and when a reply ends.

Read from the checkpoint folder the way transformers reads them, so that a transformers
checkpoint gets the same prompt ids here as from ``AutoTokenizer`` and ``apply_chat_template``:

- **special tokens around text** (:func:`encode`): what tokenizer.json's post-processor adds
  (``Tokenizer.encode(text, add_special_tokens=True)``), as transformers 5 does; it ignores
  tokenizer_config.json's ``add_bos_token`` when tokenizer.json is present, and so do we.
  gasungbi's own tokenizer has no post-processor, but every document it was trained on opens
  with ``<|bos|>`` (the shard builder adds it), so text prompts for it open with ``<|bos|>`` too.
- **the chat template**: ``chat_template.jinja``, else tokenizer_config.json's ``chat_template``
  (a string, or the one named ``default``), rendered as ``apply_chat_template`` renders it
  (a sandboxed Jinja environment with trim_blocks/lstrip_blocks, ``raise_exception``,
  ``strftime_now``, ``tojson``, ``bos_token``/``eos_token``/... from the tokenizer config), and
  encoded without adding special tokens again. gasungbi's own template (:func:`render_chat`,
  below) is the fallback where the checkpoint has none.
- **stops**: the ``eos_token_id`` of generation_config.json (an int or a list; else config.json's)
  and the tokenizer's eos token; with gasungbi's template also ``<|end|>``, its end of turn.

Message content can be encoded as text (``content_as_text``): special-token strings inside a
message are then ordinary characters, never control tokens, so a message cannot forge a turn
(the OpenAI API behaves so). The template's own special tokens are still recognised.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

from tokenizers import Tokenizer

from gasungbi.data.tokenizer import BOS_ID, SPECIAL_TOKENS, load_tokenizer

NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# --- gasungbi's own chat template -------------------------------------------------------------
# How a conversation becomes one token sequence for gasungbi's own checkpoints (SFT and GRPO use it):
#
#     <|bos|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{reply}<|end|><|user|>...
#
# Every message is its role marker, the content, and ``<|end|>``; the sequence opens with
# ``<|bos|>`` as every pretraining document does. To ask for a reply, the rendering ends with an open
# ``<|assistant|>``; the model ends its reply with ``<|end|>`` (the stop token of a chat). No
# whitespace is added around the markers: the tokenizer's special tokens split the text there.
# Reasoning traces, when a model produces them, stay inside the assistant content as
# ``<think>...</think><answer>...</answer>``.

ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
BOS, END = "<|bos|>", "<|end|>"


TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query. The function signatures "
    "are within <tools></tools> tags:\n<tools>\n")
TOOLS_INSTRUCTIONS = (
    "</tools>\n\nFor each function call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call>")


def render_chat(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True, bos: bool = True,
                tools: list[dict] | None = None) -> str:
    """Render ``[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]`` as one string.

    ``add_generation_prompt``: end with an open ``<|assistant|>`` turn for the model to complete.
    ``tools`` (OpenAI's function schemas) open the conversation as a system turn listing them; an
    assistant's ``tool_calls`` follow its content as ``<tool_call>{"name", "arguments"}</tool_call>``
    and a tool's result comes back in a user turn as ``<tool_response>...</tool_response>``
    (the Hermes / Qwen convention, which :mod:`gasungbi.serve.tools` parses).
    """
    parts = [BOS] if bos else []
    if tools:
        listed = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools)
        parts.append(f"{ROLES['system']}{TOOLS_PREAMBLE}{listed}{TOOLS_INSTRUCTIONS}{END}")
    for m in messages:
        role = m["role"]
        if role == "tool":
            parts.append(f"{ROLES['user']}<tool_response>\n{m.get('content') or ''}\n</tool_response>{END}")
            continue
        if role not in ROLES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}, tool")
        calls = ""
        for call in m.get("tool_calls") or []:
            fn = call["function"]
            args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"], ensure_ascii=False)
            calls += f"<tool_call>\n{{\"name\": {json.dumps(fn['name'], ensure_ascii=False)}, \"arguments\": {args}}}\n</tool_call>"
        parts.append(f"{ROLES[role]}{m.get('content') or ''}{calls}{END}")
    if add_generation_prompt:
        parts.append(ROLES["assistant"])
    return "".join(parts)


# The same template in Jinja, written into tokenizer_config.json so that transformers'
# ``apply_chat_template`` renders exactly what :func:`render_chat` does (tests/test_sft.py).
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- if tools -%}"
    "{{- '<|system|>' + " + json.dumps(TOOLS_PREAMBLE) + " -}}"
    "{%- for tool in tools -%}{{- tool | tojson + '\\n' -}}{%- endfor -%}"
    "{{- " + json.dumps(TOOLS_INSTRUCTIONS) + " + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|user|><tool_response>\\n' + (message['content'] or '') + '\\n</tool_response><|end|>' -}}"
    "{%- else -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + (message['content'] or '') -}}"
    "{%- for call in (message['tool_calls'] or []) -%}"
    "{%- set args = call['function']['arguments'] -%}"
    "{{- '<tool_call>\\n{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' "
    "+ (args if args is string else (args | tojson)) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


class Encoded(NamedTuple):
    """Token ids and each token's start offset (characters) in the text."""

    ids: list[int]
    offsets: list[int]


def is_gasungbi_tokenizer(tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer`` is one :func:`gasungbi.data.tokenizer.train_tokenizer` made (its special
    tokens at ids 0.. in order, and no post-processor)."""
    return tokenizer.post_processor is None and all(
        tokenizer.id_to_token(i) == t for i, t in enumerate(SPECIAL_TOKENS))


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> Encoded:
    """``text`` as ids with the special tokens the tokenizer's own rule puts around it (none when
    ``add_special_tokens`` is False); special-token strings inside ``text`` become their ids."""
    enc = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    ids, offsets = list(enc.ids), [o[0] for o in enc.offsets]
    if add_special_tokens and is_gasungbi_tokenizer(tokenizer) and (not ids or ids[0] != BOS_ID):
        ids, offsets = [BOS_ID] + ids, [0] + offsets
    return Encoded(ids, offsets)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    return obj if isinstance(obj, dict) else {}


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


MAX_RENDER_CHARS = 4 * 2**20
"""The longest text a chat template may render (and the largest string or list it may build)."""
MAX_RENDER_SECONDS = 10.0
"""How long a chat template may take to render one conversation."""
MAX_RANGE = 100_000
"""The longest ``range`` a template may loop over (Jinja's sandbox default)."""


def _size(x) -> int:
    return len(x) if isinstance(x, (str, list, tuple)) else 0


def _compile(template: str):
    """The template compiled as transformers' ``apply_chat_template`` compiles it."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Bounded(ImmutableSandboxedEnvironment):
        """The sandbox with bounded work: no string or list grows past :data:`MAX_RENDER_CHARS` by ``*``
        or ``+``, and ``range`` is capped at :data:`MAX_RANGE` items."""

        intercepted_binops = frozenset(["*", "+", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise jinja2.exceptions.TemplateError(f"the chat template computes a power of {right}")
            size = (_size(left) * right if operator == "*" and isinstance(right, int) else
                    _size(right) * left if operator == "*" and isinstance(left, int) else
                    _size(left) + _size(right) if operator == "+" else 0)
            if size > MAX_RENDER_CHARS:
                raise jinja2.exceptions.TemplateError(f"the chat template builds a value of {size:,} items "
                                                      f"(limit {MAX_RENDER_CHARS:,})")
            return super().call_binop(context, operator, left, right)

    def bounded_range(*args):
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise jinja2.exceptions.TemplateError(f"the chat template asks for a range of {len(r):,} (limit {MAX_RANGE:,})")
        return r

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.globals["range"] = bounded_range
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the checkpoint's chat template does not compile: {e}") from None


class Conventions:
    """A tokenizer with its checkpoint's chat template, special tokens and stop ids.

    ``template`` None (or gasungbi's own ``CHAT_TEMPLATE``) means gasungbi's template. Built from a
    checkpoint folder by :meth:`load`; from a bare tokenizer (gasungbi's template, no eos ids
    beyond the tokenizer's) by ``Conventions(tokenizer)``.
    """

    def __init__(self, tokenizer: Tokenizer, template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None, eos_ids: Iterable[int] = (),
                 encoder: str | None = None):
        """``encoder``: ``"dsv32"`` for DeepSeek-V3.2, whose release ships its format as Python
        (:mod:`gasungbi.data.dsv32`) instead of a template."""
        self.tokenizer = tokenizer
        self.template = None if template == CHAT_TEMPLATE else template
        self.encoder = encoder if self.template is None else None
        if special_tokens is None and is_gasungbi_tokenizer(tokenizer):
            special_tokens = {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1],
                              "pad_token": SPECIAL_TOKENS[2]}
        self.special_tokens = dict(special_tokens or {})
        self.eos_ids = list(dict.fromkeys(eos_ids))
        """The ids that end a generation (generation_config.json's eos_token_id), for plain text."""
        stops = [tokenizer.token_to_id(END)] if self.template is None and self.encoder is None else []
        stops += self.eos_ids + [self.tokenizer.token_to_id(self.special_tokens.get("eos_token") or "")]
        self.stop_ids = list(dict.fromkeys(t for t in stops if t is not None))
        """The ids that end a chat reply: (gasungbi's template) ``<|end|>`` first, eos_ids, the tokenizer's eos."""
        self._compiled = _compile(self.template) if self.template is not None else None
        # the markers a message must not forge: special tokens, and added tokens the template writes
        # itself (DeepSeek's R1 distills add <｜User｜> and <｜Assistant｜> as non-special tokens)
        writes = self.template or ("<｜User｜><｜Assistant｜><think></think><｜DSML｜>" if self.encoder else "")
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values()
                    if t.special or (writes and t.content in writes)]
        self._specials = sorted(set(specials), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, self._specials))) if self._specials else None
        self._text_tokenizer: Tokenizer | None = None

    @classmethod
    def load(cls, path: str | Path) -> Conventions:
        """The conventions of the checkpoint folder ``path`` (it needs a tokenizer.json)."""
        path = Path(path)
        tokenizer = load_tokenizer(path)
        config = _read_json(path / "tokenizer_config.json")
        special = {k: _token_text(v) for k, v in _read_json(path / "special_tokens_map.json").items()}
        special.update({k: _token_text(config[k]) for k in NAMED_SPECIAL if k in config})
        special = {k: v for k, v in special.items() if k in NAMED_SPECIAL and v is not None}
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        elif isinstance(config.get("chat_template"), list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
            template = named.get("default")
        gen = _read_json(path / "generation_config.json")
        model_config = _read_json(path / "config.json")
        eos = gen["eos_token_id"] if "eos_token_id" in gen else model_config.get("eos_token_id")
        encoder = "dsv32" if model_config.get("model_type") == "deepseek_v32" and template is None else None
        return cls(tokenizer, template, special, _ids(eos), encoder)

    # --- text ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text`` as ids, with the special tokens the tokenizer's rule adds (see :func:`encode`)."""
        return encode(self.tokenizer, text, add_special_tokens).ids

    # --- chat ---------------------------------------------------------------------------------

    def render_chat(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True,
                    template_kwargs: Mapping[str, Any] | None = None, tools: list[dict] | None = None) -> str:
        """The conversation as the checkpoint's template writes it (``apply_chat_template(...,
        tokenize=False, **template_kwargs)``); a template's ``raise_exception`` is a ValueError.
        ``template_kwargs``: the template's own switches, e.g. ``{"thinking": True}`` (DeepSeek-V3.1)
        or ``{"enable_thinking": False}`` (Qwen3), as vLLM's ``chat_template_kwargs``. ``tools``: OpenAI's
        function schemas, for the template to list."""
        messages = [dict(m) for m in messages]
        if self.encoder == "dsv32":  # thinking off by default, as DeepSeek's chat endpoint
            from gasungbi.data.dsv32 import encode_messages

            kw = template_kwargs or {}
            return encode_messages(messages, thinking=bool(kw.get("thinking", kw.get("enable_thinking", False))),
                                   tools=tools)
        if self._compiled is None:
            return render_chat(messages, add_generation_prompt, tools=tools)
        import jinja2

        kwargs = {**(template_kwargs or {}), **self.special_tokens}
        try:  # streamed, so that a template that writes too much or too long is stopped
            parts, size, start = [], 0, time.monotonic()
            for piece in self._compiled.generate(**{"documents": None, **kwargs}, tools=tools, messages=messages,
                                                 add_generation_prompt=add_generation_prompt):
                parts.append(piece)
                size += len(piece)
                if size > MAX_RENDER_CHARS or time.monotonic() - start > MAX_RENDER_SECONDS:
                    raise ValueError(f"chat template: the rendered conversation passed {size:,} characters "
                                     f"or {MAX_RENDER_SECONDS:g} s (limits {MAX_RENDER_CHARS:,} characters, "
                                     f"{MAX_RENDER_SECONDS:g} s)")
            return "".join(parts)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template: {e}") from None

    def chat_ids(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True,
                 content_as_text: bool = True, template_kwargs: Mapping[str, Any] | None = None,
                 tools: list[dict] | None = None) -> list[int]:
        """Token ids of :meth:`render_chat`, with no special tokens added around it (as
        ``apply_chat_template(..., tokenize=True)``).

        ``content_as_text``: special-token strings inside message contents are encoded as
        ordinary text. Contents are escaped before rendering (so templates may trim or split
        them), the render is split at the template's own special tokens, and the text between
        them is encoded with the escapes restored and special tokens not recognised.
        """
        messages = [dict(m) for m in messages]
        if not content_as_text or self._special_re is None:
            return self.tokenizer.encode(self.render_chat(messages, add_generation_prompt, template_kwargs, tools),
                                         add_special_tokens=False).ids
        originals: list[str] = []
        escapes = re.compile("\ue000|" + self._special_re.pattern)

        def escape(m: re.Match) -> str:
            originals.append(m.group(0))
            return f"\ue000{len(originals) - 1}\ue001"

        for m in messages:
            if isinstance(m.get("content"), str):
                m["content"] = escapes.sub(escape, m["content"])
        text = self.render_chat(messages, add_generation_prompt, template_kwargs, tools)
        if not originals:  # nothing to protect: exactly what the tokenizer gives the whole render
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        unescape = re.compile("\ue000(\\d+)\ue001")
        ids, pos = [], 0
        for m in [*self._special_re.finditer(text), None]:
            piece = text[pos:m.start() if m else len(text)]
            if piece:
                piece = unescape.sub(lambda e: originals[int(e.group(1))], piece)
                ids += self._as_text().encode(piece, add_special_tokens=False).ids
            if m is not None:
                ids.append(self.tokenizer.token_to_id(m.group(0)))
                pos = m.end()
        return ids

    def chat_ids_and_mask(self, messages: list[Mapping[str, Any]]) -> tuple[list[int], list[bool]]:
        """(ids, train_mask) of a whole conversation through the checkpoint's template (no generation
        prompt), the mask marking the assistant turns: for assistant message i, the text that
        ``messages[:i + 1]`` renders beyond ``messages[:i]`` with its generation prompt (the reply
        and the template's end of turn). A token is a target when it starts inside such a span. A
        template whose renders are not prefixes of one another cannot be labelled so: ValueError."""
        whole = self.render_chat(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render_chat(messages[:i], add_generation_prompt=True)
            upto = self.render_chat(messages[:i + 1], add_generation_prompt=False)
            if not (upto.startswith(prefix) and whole.startswith(upto)):
                raise ValueError("the chat template renders a conversation's turns differently as it grows "
                                 "(not prefix-stable), so its assistant tokens cannot be found for SFT")
            spans.append((len(prefix), len(upto)))
        ids, offsets = encode(self.tokenizer, whole, add_special_tokens=False)
        return ids, [any(a <= o < b for a, b in spans) for o in offsets]

    def _as_text(self) -> Tokenizer:
        """A copy of the tokenizer that encodes the markers' strings (special tokens, and the added
        tokens the template writes) as ordinary text."""
        if self._text_tokenizer is None:
            from tokenizers import AddedToken

            t = Tokenizer.from_str(self.tokenizer.to_str())
            t.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in self._specials])
            t.encode_special_tokens = True
            self._text_tokenizer = t
        return self._text_tokenizer

    @property
    def native(self) -> bool:
        """Whether chats use gasungbi's own template (the checkpoint has none, or has ours)."""
        return self.template is None and self.encoder is None


__all__ = ["Conventions", "Encoded", "encode", "is_gasungbi_tokenizer"]
