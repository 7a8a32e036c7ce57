"""Reasoning apart from the answer: ``reasoning_content`` as DeepSeek's API and vLLM's deepseek_r1
parser return it, streamed and not, through the official ``openai`` client."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from gasungbi.serve.reasoning import ReasoningSplitter, opens_thinking, split

CASES = [  # (reply, inside the thoughts already, reasoning, content)
    ("<think>3+3=6</think><answer>6</answer>", False, "3+3=6", "<answer>6</answer>"),
    ("  <think>a</think>b", False, "a", "b"),
    ("no thoughts here", False, "", "no thoughts here"),
    ("<thin", False, "", "<thin"),
    ("thinking...</think>\n\nanswer", True, "thinking...", "\n\nanswer"),
    ("<think>\nrepeated opening</think>x", True, "\nrepeated opening", "x"),
    ("never closed </thi", True, "never closed </thi", ""),
    ("a < b </think> <think> stays", True, "a < b ", " <think> stays"),
]


@pytest.mark.parametrize("reply,inside,reasoning,content", CASES)
def test_split_streamed_in_any_pieces_equals_whole(reply, inside, reasoning, content):
    assert split(reply, inside) == (reasoning, content)
    rng = random.Random(len(reply))
    for _ in range(20):
        s, r, c, i = ReasoningSplitter(inside), "", "", 0
        while i < len(reply):
            n = rng.randint(1, 4)
            dr, dc = s.feed(reply[i:i + n])
            r, c, i = r + dr, c + dc, i + n
        dr, dc = s.flush()
        assert (r + dr, c + dc) == (reasoning, content)


def test_the_prompt_says_where_the_reply_starts():
    assert opens_thinking("<｜User｜>hi<｜Assistant｜><think>\n")  # DeepSeek-R1
    assert not opens_thinking("<｜User｜>hi<｜Assistant｜></think>")  # V3.1, thinking off
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, enable_thinking=False
    assert not opens_thinking("<|user|>hi<|assistant|>")


@pytest.fixture(scope="module")
def r1_like(checkpoint, tmp_path_factory):
    """The tiny checkpoint with a template that opens <think> in the prompt, as DeepSeek-R1's does."""
    path = tmp_path_factory.mktemp("reasoning") / "r1-like"
    shutil.copytree(checkpoint, path)
    template = ("<|bos|>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|><think>{% endif %}")
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    cfg_file.write_text(json.dumps({**cfg, "chat_template": template}))
    return path


def test_server_returns_reasoning_content(r1_like, model, start_server, one_thread):
    openai = pytest.importorskip("openai")
    from gasungbi.data.conventions import Conventions
    from gasungbi.infer.generate import generate

    conv = Conventions.load(r1_like)
    messages = [{"role": "user", "content": "hello"}]
    [ref] = generate(model, [conv.chat_ids(messages)], max_new_tokens=16, stop_tokens=conv.stop_ids,
                     tokenizer=conv.tokenizer)
    want = split(ref.text, inside=True)
    assert want[0]
    for args, expect in (((), want), (("--reasoning-parser", "none"), (None, ref.text))):
        server = start_server(r1_like, *args)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="r1-like", messages=messages, max_tokens=16, temperature=0)
        msg = r.choices[0].message
        assert (getattr(msg, "reasoning_content", None), msg.content) == expect
        stream = client.chat.completions.create(model="r1-like", messages=messages, max_tokens=16, temperature=0,
                                                stream=True)
        reasoning, content = "", ""
        for chunk in stream:
            for c in chunk.choices:
                reasoning += getattr(c.delta, "reasoning_content", None) or ""
                content += c.delta.content or ""
        assert (reasoning or None, content) == expect
