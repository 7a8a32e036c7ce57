"""Tool calls through the official ``openai`` client: a forced call (``tool_choice`` required or a
named function) is a valid call whatever the weights, in gasungbi's own (Hermes) format and in
DeepSeek's; calls parse back into ``message.tool_calls`` streamed and not; tool results go back in
as ``role: "tool"``; bad requests are 400s."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gasungbi.serve.tools import ToolStream, parse, tool_format

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"enum": ["Seoul", "Busan"]}, "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 7}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["KST", "UTC"]}}}}}

REPLIES = {  # format -> a reply with text before one call
    "hermes": 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul", "days": 2}}\n</tool_call>',
    "deepseek": ("Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                 '{"city": "Seoul", "days": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
    "deepseek-v3.1": ('Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>'
                      '{"city": "Seoul", "days": 2}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
}


@pytest.mark.parametrize("fmt", list(REPLIES))
def test_calls_parse_whole_and_streamed(fmt):
    content, calls = parse(REPLIES[fmt], fmt)
    assert content == "Let me look." and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Seoul", "days": 2}
    rng = random.Random(0)
    for _ in range(10):
        s, text, i = ToolStream(fmt), "", 0
        while i < len(REPLIES[fmt]):
            n = rng.randint(1, 5)
            text, i = text + s.feed(REPLIES[fmt][i:i + n]), i + n
        rest, found = s.finish()
        assert text + rest == "Let me look." and found == calls
    assert parse("no call here", fmt) == ("no call here", [])


def test_the_template_says_the_format():
    assert tool_format(None) == "hermes"
    assert tool_format("{{'<｜tool▁call▁begin｜>' + name + '\\n```json\\n'}}") == "deepseek"
    assert tool_format("{{'<｜tool▁call▁begin｜>' + name + '<｜tool▁sep｜>'}}") == "deepseek-v3.1"


@pytest.fixture(scope="module")
def long_ckpt(tokenizer, tmp_path_factory):
    """The debug model with a 2,048-token context (a tool list is long in a 400-token vocabulary)."""
    import gasungbi
    from gasungbi.data.tokenizer import save_tokenizer

    path = tmp_path_factory.mktemp("tools") / "tiny"
    save_tokenizer(tokenizer, path)
    cfg = gasungbi.get_preset("debug").replace(vocab_size=tokenizer.get_vocab_size(), initializer_range=0.25,
                                               max_position_embeddings=2048)
    gasungbi.save_model(gasungbi.build_model(cfg, seed=0), path, tokenizer=path)
    return path


@pytest.fixture(scope="module")
def checkpoint(long_ckpt):
    return long_ckpt


@pytest.fixture(scope="module")
def client(checkpoint, start_server):
    server = start_server(checkpoint, "--reasoning-parser", "none")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _check(call, tool) -> dict:
    args = json.loads(call.function.arguments)
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == tool["function"]["name"]
    props = tool["function"]["parameters"]["properties"]
    assert set(args) == set(props)
    for k, v in args.items():
        assert v in props[k]["enum"] if "enum" in props[k] else props[k]["minimum"] <= v <= props[k]["maximum"]
    return args


def test_forced_calls_are_valid_and_come_back_as_tool_calls(client, checkpoint):
    msgs = [{"role": "user", "content": "weather?"}]
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=checkpoint.name, messages=msgs, tools=[WEATHER, TIME], tool_choice=named,
                                       temperature=1.0, n=4, seed=1, max_tokens=100)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and not c.message.content
        _check(c.message.tool_calls[0], TIME)
    r = client.chat.completions.create(model=checkpoint.name, messages=msgs, tools=[WEATHER, TIME],
                                       tool_choice="required", temperature=1.0, n=4, seed=2, max_tokens=100)
    for c in r.choices:
        call = c.message.tool_calls[0]
        _check(call, WEATHER if call.function.name == "get_weather" else TIME)
    stream = client.chat.completions.create(model=checkpoint.name, messages=msgs, tools=[WEATHER],
                                            tool_choice="required", temperature=0, max_tokens=100, stream=True)
    deltas, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(deltas) == 1
    args = _check(deltas[0], WEATHER)
    # the result goes back in as a tool message; the conversation grows by it
    call = {"id": deltas[0].id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": deltas[0].id, "content": '{"temp": 21}'}]
    r = client.chat.completions.create(model=checkpoint.name, messages=history, tools=[WEATHER], max_tokens=4)
    before = client.chat.completions.create(model=checkpoint.name, messages=msgs, tools=[WEATHER], max_tokens=4)
    assert r.usage.prompt_tokens > before.usage.prompt_tokens + 10


def test_bad_tool_requests_are_400(client, checkpoint):
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(messages=msgs + [{"role": "tool", "tool_call_id": "x", "content": "1"}]), "messages.1.tool_call_id"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": checkpoint.name, "messages": msgs, "max_tokens": 4, **kwargs})
        assert e.value.status_code == 400 and e.value.body["param"] == param


def test_deepseek_format_forced_call(tokenizer, tmp_path, start_server, one_thread):
    """A DeepSeek-style template and vocabulary (the tool-call markers are special tokens): the forced
    call is written with them and parsed back."""
    from tokenizers import AddedToken, Tokenizer

    import gasungbi
    from gasungbi.data.tokenizer import save_tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    markers = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
               "<｜tool▁sep｜>"]
    tok.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in markers])
    template = ("<|bos|>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}<|end|>{% endfor %}"
                "{% if tools %}<|system|>{{ tools | tojson }}<|end|>{% endif %}"
                "{# <｜tool▁call▁begin｜>function<｜tool▁sep｜>name\\n```json\\n #}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    path = tmp_path / "ds-tools"
    save_tokenizer(tok, path, chat_template=template)
    cfg = gasungbi.get_preset("debug").replace(vocab_size=tok.get_vocab_size(), initializer_range=0.25,
                                               max_position_embeddings=2048)
    torch.manual_seed(0)
    gasungbi.save_model(gasungbi.build_model(cfg, seed=0), path, tokenizer=path)
    server = start_server(path, "--reasoning-parser", "none")
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = c.chat.completions.create(model="ds-tools", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                  temperature=1.0, seed=5, max_tokens=100)
    assert r.choices[0].finish_reason == "tool_calls"
    _check(r.choices[0].message.tool_calls[0], WEATHER)


def test_deepseek_v32_encoder_and_its_dsml_calls(tokenizer, tmp_path, start_server, one_thread):
    """A DeepSeek-V3.2 checkpoint has no chat template: its conversations go through the release's
    encoder (gasungbi.data.dsv32) and a forced call is written and parsed in its DSML format."""
    import gasungbi
    from gasungbi.data.conventions import Conventions
    from gasungbi.data.tokenizer import save_tokenizer

    path = tmp_path / "v32"
    save_tokenizer(tokenizer, path)
    cfg = gasungbi.get_preset("debug").replace(model_type="deepseek_v32", index_n_heads=4, index_head_dim=16,
                                               index_topk=32, vocab_size=tokenizer.get_vocab_size(),
                                               initializer_range=0.25, max_position_embeddings=4096)
    gasungbi.save_model(gasungbi.build_model(cfg, seed=0), path, tokenizer=path)
    (path / "tokenizer_config.json").unlink(missing_ok=True)  # as released: no chat template
    conv = Conventions.load(path)
    assert conv.encoder == "dsv32"
    assert conv.render_chat([{"role": "user", "content": "hi"}]).endswith("<｜User｜>hi<｜Assistant｜></think>")
    server = start_server(path, "--reasoning-parser", "none", "--max-len", "4096")
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = c.chat.completions.create(model="v32", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                                  tool_choice="required", temperature=1.0, seed=7, max_tokens=400)
    assert r.choices[0].finish_reason == "tool_calls"
    _check(r.choices[0].message.tool_calls[0], WEATHER)
