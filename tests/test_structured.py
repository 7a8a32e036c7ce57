"""Structured output through the official ``openai`` client: ``response_format`` json_schema and
json_object replies parse and validate whatever the weights (a random tiny model sampling at
temperature 1), the constraint stays with its own request, and a bad schema is a 400."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "n", "sure"],
          "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 99},
                         "sure": {"type": "boolean"}}}


def _valid(doc: dict) -> bool:
    return (set(doc) == {"answer", "n", "sure"} and doc["answer"] in ("yes", "no", "maybe")
            and isinstance(doc["n"], int) and not isinstance(doc["n"], bool) and 0 <= doc["n"] <= 99
            and isinstance(doc["sure"], bool))


@pytest.fixture(scope="module")
def client(checkpoint, start_server):
    server = start_server(checkpoint, "--reasoning-parser", "none")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_replies_validate_at_temperature_one(client, checkpoint):
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": "hello"}],
                                       temperature=1.0, n=8, seed=3, max_tokens=120, response_format=fmt)
    for c in r.choices:
        assert c.finish_reason == "stop", c
        assert _valid(json.loads(c.message.content)), c.message.content
    again = client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": "hello"}],
                                           temperature=1.0, n=8, seed=3, max_tokens=120, response_format=fmt)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # the seed holds
    plain = client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": "hello"}],
                                           temperature=0, max_tokens=12)
    with pytest.raises(json.JSONDecodeError):  # the model itself writes no JSON: the grammar did
        json.loads(plain.choices[0].message.content)


def test_json_object_streamed(client, checkpoint):
    stream = client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": "hi"}],
                                            temperature=0, max_tokens=200, stream=True,
                                            response_format={"type": "json_object"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_bad_schema_is_a_400(client, checkpoint):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, response_format=fmt)
    assert e.value.body["param"] == "response_format" and "nonsense" in e.value.body["message"]
