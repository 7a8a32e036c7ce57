"""DeepSeek-V3.2's conversation format, which the release ships as Python (``encoding_dsv32.py``)
instead of a Jinja chat template; checked against the examples DeepSeek publishes with it
(``tests/data/deepseek_v32``).

    <｜begin▁of▁sentence｜>{system}[\\n\\n## Tools ... <functions>{schemas}</functions>\\n]
    <｜User｜>{user}<｜Assistant｜><think>           the last user turn, thinking mode
    {reasoning}</think>{answer}<｜end▁of▁sentence｜>
    <｜User｜>{user}<｜Assistant｜></think>          earlier turns, or chat mode
    {answer}\\n\\n<｜DSML｜function_calls>\\n<｜DSML｜invoke name="f">\\n
        <｜DSML｜parameter name="k" string="true">v</｜DSML｜parameter>\\n</｜DSML｜invoke>\\n
        </｜DSML｜function_calls><｜end▁of▁sentence｜>
    \\n\\n<function_results>\\n<result>{tool output}</result>\\n</function_results>\\n\\n<think>

A parameter marked ``string="true"`` is written raw (no quotes, no escapes); any other value as JSON.
In thinking mode the reasoning of assistant turns before the last user turn is dropped, and a
reply opens inside ``<think>`` after the last user turn or the tool results that follow it.
"""

from __future__ import annotations

import json
import re
from typing import Any

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
THINK, END_THINK = "<think>", "</think>"
DSML = "｜DSML｜"
CALLS_START = f"\n\n<{DSML}function_calls>"

TOOLS_BLOCK = (
    "## Tools\n\nYou have access to a set of tools you can use to answer the user's question.\n"
    f'You can invoke functions by writing a "<{DSML}function_calls>" block like the following as part of your '
    f"reply to the user:\n<{DSML}function_calls>\n<{DSML}invoke name=\"$FUNCTION_NAME\">\n"
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n...\n'
    f'</{DSML}invoke>\n<{DSML}invoke name="$FUNCTION_NAME2">\n...\n</{DSML}invoke>\n</{DSML}function_calls>\n\n'
    "String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects "
    'should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" '
    "for other types (numbers, booleans, arrays, objects).\n\nIf the thinking_mode is enabled, then after function "
    "results you should strongly consider outputting a thinking block. Here is an example:\n\n"
    f"<{DSML}function_calls>\n...\n</{DSML}function_calls>\n\n<function_results>\n...\n</function_results>\n\n"
    f"{THINK}...thinking about results{END_THINK}\n\nHere are the functions available in JSONSchema format:\n"
    "<functions>\n{schemas}\n</functions>\n")
RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _tools(tools: list[dict]) -> str:
    return TOOLS_BLOCK.format(schemas="\n".join(_json(t.get("function", t)) for t in tools))


def _invoke(call: dict) -> str:
    fn = call.get("function", call)
    args = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
    params = "\n".join(f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                       f"{v if isinstance(v, str) else _json(v)}</{DSML}parameter>" for k, v in args.items())
    return f'<{DSML}invoke name="{fn["name"]}">\n{params}\n</{DSML}invoke>'


def _extras(msg: dict) -> str:
    """A system or developer message's tools and response format blocks."""
    out = "\n\n" + _tools(msg["tools"]) if msg.get("tools") else ""
    if msg.get("response_format"):
        out += "\n\n" + RESPONSE_FORMAT.format(schema=_json(msg["response_format"]))
    return out


def _render(i: int, msgs: list[dict], last_user: int, thinking: bool) -> str:
    m, role = msgs[i], msgs[i].get("role")
    opens = THINK if thinking else END_THINK
    if role == "system":
        return (m.get("content") or "") + _extras(m)
    if role in ("user", "developer"):
        content = m.get("content") or ""
        if role == "developer":
            content = _extras(m) + "\n\n# The user's message is: " + content
        return f"<｜User｜>{content}<｜Assistant｜>" + (opens if i == last_user else END_THINK)
    if role == "tool":
        j = i - 1
        while j >= 0 and msgs[j].get("role") == "tool":
            j -= 1
        calls = (msgs[j].get("tool_calls") or []) if j >= 0 else []
        order = i - j
        if j < 0 or msgs[j].get("role") != "assistant" or order > len(calls):
            raise ValueError(f"message {i} is a tool result without a call of the assistant message before it")
        out = ("\n\n<function_results>" if order == 1 else "") + f"\n<result>{m.get('content') or ''}</result>"
        if order == len(calls):
            out += "\n</function_results>\n\n" + (opens if i >= last_user else END_THINK)
        return out
    if role == "assistant":
        reasoning = m.get("reasoning_content") or m.get("reasoning") or ""
        head = reasoning + END_THINK if thinking and i > last_user else ""
        calls = m.get("tool_calls") or []
        tail = (CALLS_START + "\n" + "\n".join(_invoke(c) for c in calls) + f"\n</{DSML}function_calls>"
                if calls else "")
        return head + (m.get("content") or "") + tail + EOS
    raise ValueError(f"unknown role {role!r} in message {i}; expected system, developer, user, assistant or tool")


def encode_messages(messages: list[dict], thinking: bool = True, drop_thinking: bool = True, bos: bool = True,
                    tools: list[dict] | None = None, response_format: dict | None = None) -> str:
    """The prompt text of ``messages`` (OpenAI's shape, ``reasoning_content`` on assistant turns).
    ``tools``, ``response_format``: attached to the leading system (or developer) message, one
    being made when there is none."""
    msgs = [dict(m) for m in messages]
    if tools or response_format:
        if not msgs or msgs[0].get("role") not in ("system", "developer"):
            msgs.insert(0, {"role": "system", "content": ""})
        msgs[0].update({k: v for k, v in (("tools", tools), ("response_format", response_format)) if v})
    last_user = max((i for i, m in enumerate(msgs) if m.get("role") in ("user", "developer")), default=-1)
    if thinking and drop_thinking:
        msgs = [{k: v for k, v in m.items() if k not in ("reasoning_content", "reasoning")}
                if m.get("role") == "assistant" and i < last_user else m for i, m in enumerate(msgs)]
    return (BOS if bos else "") + "".join(_render(i, msgs, last_user, thinking) for i in range(len(msgs)))


_INVOKE = re.compile(rf'<{DSML}invoke name="(.*?)">\n(.*?)</{DSML}invoke>', re.S)
_PARAM = re.compile(rf'<{DSML}parameter name="(.*?)" string="(true|false)">(.*?)</{DSML}parameter>', re.S)


def parse_tool_calls(text: str) -> list[dict]:
    """The ``{"name", "arguments"}`` calls of a ``<｜DSML｜function_calls>`` block (arguments a JSON
    string: raw string parameters quoted, the others read as JSON)."""
    calls = []
    for name, body in _INVOKE.findall(text):
        args = {}
        for key, string, value in _PARAM.findall(body):
            args[key] = value if string == "true" else json.loads(value)
        calls.append({"name": name, "arguments": _json(args)})
    return calls


def parse_completion(text: str, thinking: bool = True) -> dict:
    """A reply split as DeepSeek's ``parse_message_from_completion_text``: reasoning up to ``</think>``
    (thinking mode), content up to the calls or the end, then the calls."""
    reasoning = ""
    if thinking and END_THINK in text:
        reasoning, text = text.split(END_THINK, 1)
    text = text.split(EOS, 1)[0]
    content, _, calls = text.partition(CALLS_START)
    return {"role": "assistant", "content": content, "reasoning_content": reasoning,
            "tool_calls": parse_tool_calls(calls) if calls else []}
