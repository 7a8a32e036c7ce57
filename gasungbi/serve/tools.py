"""Tool calls: the request's tools go to the checkpoint's chat template, the reply's calls come back
as ``message.tool_calls`` (``finish_reason: "tool_calls"``), as OpenAI's API and vLLM return them.

Each family writes calls its own way, and :func:`tool_format` reads which from the template:

* ``hermes`` (Qwen2.5/Qwen3, and gasungbi's own template)::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Seoul"}}
      </tool_call>

* ``deepseek`` (DeepSeek-V3, R1 and the R1 distills)::

      <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
      ```json
      {"city": "Seoul"}
      ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

* ``deepseek-v3.1`` (DeepSeek-V3.1): ``<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Seoul"}<｜tool▁call▁end｜>``
* ``dsml`` (DeepSeek-V3.2's encoder, :mod:`gasungbi.data.dsv32`): ``<｜DSML｜function_calls>`` blocks.

With ``tool_choice`` ``required`` or a named function, the reply is constrained (:func:`call_grammar`,
a Lark grammar for llguidance) to calls whose arguments are valid JSON under the tool's
``parameters`` schema, whatever the weights; with ``auto`` the model chooses and the reply is parsed.
Streaming holds back the text from the first call marker on and sends the calls when the reply ends.
"""

from __future__ import annotations

import json
import re
import uuid

from gasungbi.data import dsv32

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

STRICT = {"x-guidance": {"whitespace_flexible": False}}
"""JSON inside a forced call has no free whitespace: the model cannot spend its tokens on blanks."""

_HERMES = re.compile(re.escape(HERMES_START) + r"\s*(.*?)\s*" + re.escape(HERMES_END), re.S)
_DS = re.compile(re.escape(DS_CALL_BEGIN) + r"(?:function" + re.escape(DS_SEP) + r")?(.*?)(?:" + re.escape(DS_SEP)
                 + r"|\n```json\n)(.*?)(?:\n```)?" + re.escape(DS_CALL_END), re.S)


def tool_format(template: str | None, encoder: str | None = None) -> str:
    """The call format of a chat template (None: gasungbi's own, which writes hermes calls), or of
    DeepSeek-V3.2's encoder (``dsml``)."""
    if encoder == "dsv32":
        return "dsml"
    if template and DS_CALL_BEGIN in template:
        return "deepseek" if "```json" in template else "deepseek-v3.1"
    return "hermes"


def start_marker(fmt: str) -> str:
    return {"hermes": HERMES_START, "dsml": dsv32.CALLS_START}.get(fmt, DS_CALLS_BEGIN)


def parse(text: str, fmt: str) -> tuple[str, list[dict]]:
    """(content before the first call, calls as ``{"name", "arguments"}`` with arguments a JSON
    string); a call whose arguments are not JSON is left in the content."""
    marker = start_marker(fmt)
    i = text.find(marker) if fmt in ("hermes", "dsml") else min(
        (j for j in (text.find(DS_CALLS_BEGIN), text.find(DS_CALL_BEGIN)) if j >= 0), default=-1)
    if i < 0:
        return text, []
    calls = []
    if fmt == "dsml":
        try:
            calls = dsv32.parse_tool_calls(text[i:])
        except ValueError:
            return text, []
    elif fmt == "hermes":
        for body in _HERMES.findall(text[i:]):
            try:
                obj = json.loads(body)
                calls.append({"name": str(obj["name"]), "arguments": json.dumps(obj.get("arguments", {}),
                                                                                ensure_ascii=False)})
            except (ValueError, KeyError, TypeError):
                return text, []
    else:
        for name, args in _DS.findall(text[i:]):
            try:
                calls.append({"name": name.strip(), "arguments": json.dumps(json.loads(args), ensure_ascii=False)})
            except ValueError:
                return text, []
    return (text[:i], calls) if calls else (text, [])


def openai_calls(calls: list[dict]) -> list[dict]:
    """Parsed calls in OpenAI's ``tool_calls`` shape, each with a fresh id."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


class ToolStream:
    """One reply's content, fed as it streams: what may be sent now, and the calls at the end."""

    def __init__(self, fmt: str):
        self.fmt, self.marker = fmt, start_marker(fmt)
        self.text, self.sent, self.holding = "", 0, False

    def feed(self, delta: str) -> str:
        """The content that can be sent now: everything before a (possible) call marker."""
        self.text += delta
        if self.holding:
            return ""
        i = self.text.find(self.marker)
        if i >= 0:
            self.holding = True
            out, self.sent = self.text[self.sent:i], i
            return out
        keep = max((n for n in range(1, len(self.marker)) if self.text.endswith(self.marker[:n])), default=0)
        out, self.sent = self.text[self.sent:len(self.text) - keep], len(self.text) - keep
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(the content still to send, the calls) when the reply ends."""
        content, calls = parse(self.text, self.fmt)
        return content[self.sent:] if calls else self.text[self.sent:], calls


def call_grammar(fmt: str, tools: list[dict], name: str | None, token_id) -> str:
    """A Lark grammar (llguidance) of a reply that is one call to tool ``name`` (or, None, to any of
    ``tools``) with arguments valid under its ``parameters`` schema. ``token_id(text)``: the id of
    a special token, which the grammar names as ``<[id]>``."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]

    def schema(t: dict) -> dict:
        return t["function"].get("parameters") or {"type": "object"}

    if fmt == "hermes":
        alternatives = [json.dumps({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                                    "properties": {"name": {"const": t["function"]["name"]}, "arguments": schema(t)},
                                    **STRICT}) for t in chosen]
        body = " | ".join(f"%json {a}" for a in alternatives)
        return f'start: "{HERMES_START}\\n" call "\\n{HERMES_END}"\ncall: {body}\n'
    if fmt == "dsml":
        return _dsml_grammar(chosen, schema)
    calls_begin, calls_end, begin, end, sep = (f"<[{token_id(t)}]>" for t in
                                               (DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END, DS_SEP))
    rules = []
    for t in chosen:
        fn = json.dumps(t["function"]["name"])
        args = f"%json {json.dumps({**schema(t), **STRICT})}"
        rules.append(f'{begin} "function" {sep} {fn} "\\n```json\\n" {args} "\\n```" {end}' if fmt == "deepseek"
                     else f"{begin} {fn} {sep} {args} {end}")
    return f"start: {calls_begin} call {calls_end}\ncall: " + " | ".join(rules) + "\n"


def _dsml_grammar(chosen: list[dict], schema) -> str:
    """DeepSeek-V3.2's call: each required parameter of the tool's (flat) schema in order, strings
    raw (no ``<``), other values as JSON under their own schema."""
    d = dsv32.DSML

    def q(v) -> str:
        return json.dumps(v, ensure_ascii=False)

    rules = []
    for t in chosen:
        props, required = schema(t).get("properties", {}), schema(t).get("required", [])
        params = []
        for k in required:
            sub = props.get(k, {})
            enum = sub.get("enum")
            is_str = sub.get("type") == "string" or bool(enum) and all(isinstance(v, str) for v in enum)
            if is_str:
                value = " | ".join(q(v) for v in enum) if enum else "/[^<]*/"
            else:
                value = "%json " + q({**sub, **STRICT})
            open_tag = f'<{d}parameter name="{k}" string="{"true" if is_str else "false"}">'
            params.append(f"{q(open_tag)} ({value}) {q(f'</{d}parameter>')}")
        name = t["function"]["name"]
        body = f' {q(chr(10))} '.join(params) if params else '""'
        rules.append(f'{q(f"<{d}invoke name=" + q(name) + ">" + chr(10))} {body} '
                     f'{q(chr(10) + f"</{d}invoke>")}')
    start = q(dsv32.CALLS_START + "\n")
    end = q(f"\n</{d}function_calls>")
    return f"start: {start} call {end}\ncall: " + " | ".join(rules) + "\n"
