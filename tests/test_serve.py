"""``gasungbi serve``: the real server as a subprocess on a loopback port, driven by the official
``openai`` client (plain, streaming, n > 1, stop, seeds, logprobs), raw HTTP for bad input,
16 concurrent streaming clients against their sequential runs, cancellation on disconnect,
the bounded queue (429) and API keys, hostile input (huge prompts, foreign Host and Origin, slow and
abandoned uploads); plus the slot batch itself, in process."""

import asyncio
import json
import re
import socket
import time

import pytest
import torch

from gasungbi.data.conventions import render_chat
from gasungbi.infer.generate import generate
from gasungbi.infer.sampling import SamplingParams

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(checkpoint, start_server):
    # 16 concurrent clients: most wait, then join mid-flight
    return start_server(checkpoint, "--max-batch", "6", "--body-timeout", "3", "--cors-origin", "http://good.example")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------------------------------------
# the slot batch, in process
# ---------------------------------------------------------------------------------------------

def test_slot_batch_joins_leaves_and_moves(model):
    """Sequences joining a running batch at different clocks, with moves both ways (a prompt longer
    than the clock arriving late; the clock reaching max_len), decode exactly what each decodes alone."""
    from gasungbi.infer.engine import Engine
    # two rows of 48 slots: [3, 4] and [9]*3 start at clock 3; [8]*40 joins when [9]*3 leaves
    # (clock 32 -> moved right to 40); at 48 the batch moves left, twice; then [1, 2, 3] joins
    prompts, new = [[3, 4], [9] * 3, [8] * 40, [1, 2, 3]], [40, 30, 5, 20]
    ref = [generate(model, p, max_new_tokens=n, stop_tokens=())[0].tokens for p, n in zip(prompts, new)]
    b = Engine(model, 2, 48)
    waiting, running, out, clocks = list(range(len(prompts))), [], {i: [] for i in range(len(prompts))}, []

    def retire():
        for i in reversed([i for i, j in enumerate(running) if len(out[j]) >= new[j]]):
            b.remove(i)
            running[i] = running[-1]
            running.pop()

    while waiting or running:
        joining = []
        while waiting and b.fits([len(prompts[j]) for j in joining + waiting[:1]]):
            joining.append(waiting.pop(0))
        if joining:
            last, _ = b.join([prompts[j] for j in joining])
            for j, t in zip(joining, last.argmax(-1).tolist()):
                out[j].append(t)
            running += joining
        retire()
        if running:
            for j, t in zip(running, b.step([out[j][-1] for j in running]).argmax(-1).tolist()):
                out[j].append(t)
            retire()
        clocks.append(b.clock)
    assert [out[i] for i in range(len(prompts))] == ref
    jumps = [c2 - c1 for c1, c2 in zip(clocks, clocks[1:]) if c1 and c2]
    assert any(j > 1 for j in jumps) and any(j < 0 for j in jumps) and b.moves == 3, clocks
    assert max(clocks) == 48 and b.size == 0 and b.tokens_held == 0


# ---------------------------------------------------------------------------------------------
# the OpenAI client
# ---------------------------------------------------------------------------------------------

def test_models_and_plain_requests(server, client, model, tokenizer, chat_ref):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=10, temperature=0)
    want = generate(model, "hello world", max_new_tokens=10, tokenizer=tokenizer)[0]
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == 1 + len(tokenizer.encode("hello world").ids)  # <|bos|> is added
    assert r.usage.completion_tokens == len(want.tokens)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    c = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    want = chat_ref(model, tokenizer, msgs, 12)
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content == want.text
    assert c.choices[0].finish_reason == want.finish_reason
    assert c.usage.prompt_tokens == len(tokenizer.encode(render_chat(msgs)).ids)
    c = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=2)
    entries = c.choices[0].logprobs.content
    assert len(entries) == len(want.tokens)  # every output token, its bytes exact (the text may hold U+FFFD)
    assert b"".join(bytes(e.bytes) for e in entries).decode(errors="replace") == want.text
    assert all(len(e.top_logprobs) == 2 and e.logprob == e.top_logprobs[0].logprob for e in entries)  # greedy
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<textarea" in page.text and "/v1/chat/completions" in page.text


def test_streaming_chat(client, model, tokenizer, chat_ref):
    msgs = [{"role": "user", "content": "hello"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want = chat_ref(model, tokenizer, msgs, 15)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= len(want.tokens)
    # completions stream too, and the text equals the non-streamed one
    plain = client.completions.create(model="tiny", prompt="the quick", max_tokens=9, temperature=0).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="the quick", max_tokens=9, temperature=0, stream=True))
    assert streamed == plain


def test_n_stop_and_seeds(client, model, tokenizer):
    full = client.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0, stop=[stop, "\x00x"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"

    def sampled(seed, n=3):
        r = client.completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=1.0, n=n, seed=seed,
                                      extra_body={"ignore_eos": True})
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    a = sampled(7)
    assert len(a) == 3 and len(set(a)) == 3  # n choices, each drawn with its own generator
    assert sampled(7) == a and sampled(8) != a
    # choice 0 of a seeded request samples exactly as the engine does alone with that seed
    want = generate(model, "hello", max_new_tokens=12, stop_tokens=(), tokenizer=tokenizer,
                    sampling=SamplingParams(temperature=1.0, seed=7))[0]
    assert a[0] == want.text
    chat = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, seed=3,
                                           max_tokens=8, temperature=0.9) for _ in range(2)]
    assert [c.message.content for c in chat[0].choices] == [c.message.content for c in chat[1].choices]


def test_echo_logprobs_score_the_prompt(server, client, model, tokenizer):
    """What lm-evaluation-harness's local-completions sends for log-likelihoods: token-id prompts,
    echo, logprobs=1, max_tokens 0 (older) or 1 (newer)."""
    prompts = [[0, 40, 41, 42, 43], [0, 100, 7]]
    with torch.no_grad():
        ref = [model(torch.tensor([p]))[0].log_softmax(-1) for p in prompts]
    for max_tokens in (0, 1):
        r = httpx.post(server.url + "/v1/completions", json={
            "model": "tiny", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": max_tokens,
            "temperature": 0}).json()
        for p, lp, choice in zip(prompts, ref, sorted(r["choices"], key=lambda c: c["index"])):
            got = choice["logprobs"]
            assert len(got["token_logprobs"]) == len(p) + max_tokens == len(got["tokens"]) == len(got["text_offset"])
            assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
            want = [lp[i - 1, p[i]].item() for i in range(1, len(p))]
            assert got["token_logprobs"][1:len(p)] == pytest.approx(want, abs=1e-4)
            for i in range(1, len(p)):  # top-1 is the argmax
                assert max(got["top_logprobs"][i].values()) == pytest.approx(lp[i - 1].max().item(), abs=1e-4)
            if max_tokens:
                assert got["token_logprobs"][-1] == pytest.approx(lp[-1].max().item(), abs=1e-4)  # greedy token
            assert got["text_offset"] == sorted(got["text_offset"])
    # text prompts: <|bos|> is added, offsets point into the prompt
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    enc = tokenizer.encode("hello world")
    assert r.choices[0].text == "hello world" and lp.tokens[0] == "<|bos|>"
    assert lp.text_offset == [0] + [a for a, _ in enc.offsets] and "".join(lp.tokens[1:]) == "hello world"
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
BAD = [  # (route, body, status, words the message must contain, param)
    ("completions", b"{not json", 400, "not valid JSON", None),
    ("completions", b"", 400, "not valid JSON", None),
    ("completions", b"[1, 2]", 400, "JSON object", None),
    ("completions", {"prompt": 5}, 400, "prompt", "prompt"),
    ("completions", {}, 400, "'prompt' is required", "prompt"),
    ("completions", {"prompt": "x", "max_tokens": "ten"}, 400, "valid integer", "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, ">= 1", "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": -3}, 400, ">= 1", "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 100000}, 400, "maximum context length", "max_tokens"),
    ("completions", {"prompt": [1] * 300, "max_tokens": 1}, 400, "maximum context length", "prompt"),
    ("completions", {"prompt": [[]]}, 400, "empty", "prompt"),
    ("completions", {"prompt": []}, 400, "empty", "prompt"),
    ("completions", {"prompt": [99999]}, 400, "out of range", "prompt"),
    ("completions", {"prompt": "x", "temperature": 5}, 400, "temperature", "temperature"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "valid number", "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ("completions", {"prompt": "x", "n": 0}, 400, "'n'", "n"),
    ("completions", {"prompt": "x", "stop": 3}, 400, "stop", "stop"),
    ("completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop"),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "valid boolean", "stream"),
    ("completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs", "logprobs"),
    ("completions", {"prompt": "x", "model": "gpt-9"}, 404, "does not exist", "model"),
    ("chat/completions", {"messages": []}, 400, "must not be empty", "messages"),
    ("chat/completions", {"messages": "hi"}, 400, "valid array", "messages"),
    ("chat/completions", {"messages": [{"role": "user"}]}, 400, "required", "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "not supported", "messages.0.role"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "answers no call",
     "messages.0.tool_call_id"),  # a tool message without a call
    ("chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "content", "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x" * 2000}]}, 400, "maximum context length",
     "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x" * 20000}]}, 400, "20,000 characters",
     "messages"),  # refused before tokenizing
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, ">= 1",
     "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     400, "stream_options", "stream_options"),
    ("completions", {"prompt": "x", "seed": 2**70}, 400, "64 bits", "seed"),
    ("completions", b'{"prompt": "x", "repetition_penalty": NaN}', 400, "", "repetition_penalty"),
    ("completions", {"prompt": ["x"] * 100, "n": 2}, 400, "exceed the server's queue", "n"),
    ("nothing/here", {}, 404, "no route", None),
]


def test_bad_input_gets_an_openai_error_and_the_server_lives(server):
    with httpx.Client(base_url=server.url + "/v1", timeout=30) as http:
        for route, body, status, words, param in BAD:
            r = http.post(route, content=body, headers=JSON) if isinstance(body, bytes) else http.post(route, json=body)
            assert r.status_code == status, (route, body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, err
            assert words.lower() in err["message"].lower() and err["param"] == param, (body, err)
        big = http.post("completions", content=b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}', headers=JSON)
        assert big.status_code == 413 and "exceeds the limit" in big.json()["error"]["message"]
        r = http.get("completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        r = http.post("completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    assert not any(k.startswith("gasungbi_requests_total") and 'code="5' in k for k in server.metrics())


# ---------------------------------------------------------------------------------------------
# hostile input: huge prompts, web pages, slow and abandoned uploads
# ---------------------------------------------------------------------------------------------

def test_health_answers_while_huge_prompts_are_refused(server):
    """Prompts far beyond the context are refused before tokenizing; those that might fit are
    tokenized off the event loop, so /health answers meanwhile."""
    huge = {"prompt": "the quick brown fox 안녕 " * 150_000}  # 3.6 MB: seconds of tokenizing
    many = {"prompt": ["the quick brown fox 안녕 " * 700] * 60}  # 60 x 16 kB, each might fit: tokenized

    async def run():
        async with httpx.AsyncClient(timeout=60) as ac:
            async def health():
                await asyncio.sleep(0.3)
                worst = 0.0
                for _ in range(15):
                    t = time.perf_counter()
                    assert (await ac.get(server.url + "/health")).status_code == 200
                    worst = max(worst, time.perf_counter() - t)
                    await asyncio.sleep(0.1)
                return worst

            posts = [ac.post(server.url + "/v1/completions", json=b) for b in (huge, huge, many, many, many, many)]
            return await asyncio.gather(health(), *posts)

    worst, *answers = asyncio.run(run())
    # a deadline, not a speed figure: blocked behind the tokenizer, /health took 5-14 s here; answered, ~0.05 s
    assert worst < 3.0, worst
    assert all(r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded" for r in answers)
    assert "characters" in answers[0].json()["error"]["message"]  # refused by its length alone


def test_web_pages_cannot_drive_the_server(server):
    """Bound to loopback: loopback Host names only (DNS rebinding); a foreign Origin is refused
    (cross-site requests) unless --cors-origin allows it; bodies must be application/json."""
    body = {"prompt": "x", "max_tokens": 2}
    port = server.url.rsplit(":", 1)[1]
    r = httpx.get(server.url + "/health", headers={"Host": f"evil.example:{port}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "app.localhost"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200, host
    for origin in ("http://evil.example", "null", f"http://evil.example:{port}"):
        r = httpx.post(server.url + "/v1/completions", content=json.dumps(body), headers={
            "Origin": origin, "Content-Type": "text/plain"})  # what a page may send cross-site unasked
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", (origin, r.text)
        assert httpx.get(server.url + "/v1/models", headers={"Origin": origin}).status_code == 403
    r = httpx.post(server.url + "/v1/completions", content=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert httpx.post(server.url + "/v1/completions", content=json.dumps(body)).status_code == 415
    assert httpx.post(server.url + "/v1/completions", json=body, headers={"Origin": server.url}).status_code == 200
    # an allowed origin: preflight, then the request, both with CORS headers
    pre = {"Origin": "http://good.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://good.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert set(r.headers["access-control-allow-headers"].split(",")) >= {"authorization", "content-type"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=dict(pre, Origin="http://evil.example"))
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Origin": "http://good.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://good.example"


def test_slow_and_abandoned_uploads(server):
    """A half-sent body gets 408 after --body-timeout; a client hanging up mid-body is one log line."""
    host, port = server.url.removeprefix("http://").split(":")
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 1000\r\n\r\n{{\"prompt\": ").encode()
    logged = len(server.log.read_text())
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head)
        s.settimeout(20)
        t = time.monotonic()
        answer = b""
        while chunk := s.recv(65536):  # the server answers, then closes the connection
            answer += chunk
        assert 2.5 < time.monotonic() - t < 10, time.monotonic() - t
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer, answer
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head)
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while "hung up" not in server.log.read_text()[logged:] and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log.read_text()[logged:]
    assert log.count("hung up after 11 of 1,000 bytes") == 1 and "Traceback" not in log, log
    assert len(log.strip().splitlines()) == 1, log
    assert httpx.get(server.url + "/health").status_code == 200


def test_listening_beyond_loopback_without_a_key_warns():
    from gasungbi.serve.commands import exposure_warning
    assert "no API key" in exposure_warning("0.0.0.0", None) and "no API key" in exposure_warning("::", None)
    assert exposure_warning("0.0.0.0", "k") is None
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None


# ---------------------------------------------------------------------------------------------
# continuous batching under load
# ---------------------------------------------------------------------------------------------

def test_16_concurrent_streams_equal_their_sequential_runs(server, client):
    words = ["hello", "the quick brown fox", "def f(x):", "안녕하세요", "world", "lazy dog", "return x + 1", "fox"]
    jobs = [(words[i % 8] + " " * (i // 8), 6 + 3 * (i % 5), i % 2 == 0) for i in range(16)]  # text, max_tokens, chat

    def body(text, n, chat):
        kw = dict(model="tiny", max_tokens=n, temperature=0)
        return dict(kw, messages=[{"role": "user", "content": text}]) if chat else dict(kw, prompt=text)

    sequential = []
    for text, n, chat in jobs:
        if chat:
            sequential.append(client.chat.completions.create(**body(text, n, chat)).choices[0].message.content)
        else:
            sequential.append(client.completions.create(**body(text, n, chat)).choices[0].text)

    async def one(aclient, text, n, chat):
        out = []
        if chat:
            async for c in await aclient.chat.completions.create(stream=True, **body(text, n, chat)):
                out.append(c.choices[0].delta.content or "" if c.choices else "")
        else:
            async for c in await aclient.completions.create(stream=True, **body(text, n, chat)):
                out.append(c.choices[0].text if c.choices else "")
        return "".join(out)

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as ac:
            return await asyncio.gather(*(one(ac, *job) for job in jobs))

    before = server.metrics()
    concurrent = asyncio.run(all_at_once())
    assert concurrent == sequential
    m = server.metrics()
    assert m["gasungbi_time_to_first_token_seconds_count"] - before["gasungbi_time_to_first_token_seconds_count"] == 16
    assert m["gasungbi_generation_tokens_total"] > before["gasungbi_generation_tokens_total"]
    steps, rows = (m[k] - before[k] for k in ("gasungbi_decode_steps_total", "gasungbi_decode_rows_total"))
    assert rows / steps > 3, (rows, steps)  # they really were decoded together (6 rows at most)
    assert m["gasungbi_running_sequences"] == 0 and m["gasungbi_queue_depth"] == 0
    assert m["gasungbi_kv_cache_usage_ratio"] == 0 and m["gasungbi_kv_cache_rows"] == 6


def test_long_requests_run_together(server):
    """Chats without max_tokens may run to the end of the context; three of them still decode
    side by side (nothing is reserved ahead: the batch moves left when the clock reaches the end)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "ignore_eos": True}

    async def three():
        async with httpx.AsyncClient(timeout=60) as ac:
            return await asyncio.gather(*(ac.post(server.url + "/v1/chat/completions", json=body) for _ in range(3)))

    before = server.metrics()
    out = [r.json() for r in asyncio.run(three())]
    assert all(o["choices"][0]["finish_reason"] == "length" for o in out)
    assert all(o["usage"]["prompt_tokens"] + o["usage"]["completion_tokens"] == 256 for o in out)
    m = server.metrics()
    steps, rows = (m[k] - before[k] for k in ("gasungbi_decode_steps_total", "gasungbi_decode_rows_total"))
    assert rows / steps > 2.5, (rows, steps)


def _settled(server, before) -> dict:
    """Metrics once nothing runs or waits and a cancellation was counted since ``before``."""
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        if (m["gasungbi_running_sequences"] == 0 and m["gasungbi_queue_depth"] == 0
                and m["gasungbi_requests_cancelled_total"] > before["gasungbi_requests_cancelled_total"]) \
                or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_a_client_that_disconnects_is_cancelled(server):
    before = server.metrics()
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 240, "n": 4, "stream": True, "ignore_eos": True,
            "temperature": 0}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert next(r.iter_lines()).startswith("data: ")  # generation has started; now hang up
    m = _settled(server, before)
    assert m["gasungbi_requests_cancelled_total"] > before["gasungbi_requests_cancelled_total"]
    assert m["gasungbi_running_sequences"] == 0 and m["gasungbi_kv_cache_rows_used"] == 0
    assert m["gasungbi_generation_tokens_total"] - before["gasungbi_generation_tokens_total"] < 4 * 240
    # a client waiting for a whole (non-streamed) completion that gives up is cancelled too
    before = m
    with pytest.raises(httpx.ReadTimeout):  # 12 x 240 tokens in 6 rows: seconds of work
        httpx.post(server.url + "/v1/completions", json=dict(body, stream=False, n=12),
                   timeout=httpx.Timeout(5, read=0.2))
    m = _settled(server, before)
    assert m["gasungbi_requests_cancelled_total"] > before["gasungbi_requests_cancelled_total"]
    assert m["gasungbi_running_sequences"] == 0 and m["gasungbi_queue_depth"] == 0
    assert m["gasungbi_generation_tokens_total"] - before["gasungbi_generation_tokens_total"] < 12 * 240


# ---------------------------------------------------------------------------------------------
# a small, locked server: queue limit and API keys
# ---------------------------------------------------------------------------------------------

def test_queue_full_is_429_and_api_keys_are_checked(checkpoint, start_server):
    s = start_server(checkpoint, "--max-batch", "1", "--max-queue", "1", env={"GASUNGBI_API_KEY": "s3cret"})
    v1 = s.url + "/v1"
    assert httpx.get(v1 + "/models").status_code == 401
    r = httpx.post(v1 + "/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    key = {"Authorization": "Bearer s3cret"}
    assert httpx.get(v1 + "/models", headers=key).status_code == 200
    assert httpx.get(s.url + "/health").status_code == 200
    assert httpx.get(s.url + "/metrics").status_code == 401  # the key guards the metrics too
    assert httpx.get(s.url + "/metrics", headers=key).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=v1, api_key="wrong", max_retries=0).models.list()

    async def flood():
        body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
        async with httpx.AsyncClient(timeout=60) as ac:
            return await asyncio.gather(*(ac.post(v1 + "/completions", json=body, headers=key) for _ in range(5)))

    codes = [r.status_code for r in asyncio.run(flood())]
    assert 200 in codes and 429 in codes, codes  # one runs, one waits, the rest are turned away
    busy = [r for r in asyncio.run(flood()) if r.status_code == 429][0]
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
    assert s.metrics()["gasungbi_requests_rejected_total"] >= 2


def test_api_key_flag_wins_over_the_environment(monkeypatch):
    from gasungbi.serve.commands import api_key_of
    monkeypatch.setenv("GASUNGBI_API_KEY", "from-env")
    assert api_key_of(None) == "from-env"
    assert api_key_of("flag") == "flag"
    monkeypatch.delenv("GASUNGBI_API_KEY")
    assert api_key_of(None) is None


def test_cli_reports_a_busy_port(checkpoint, capsys):
    from gasungbi.cli import main
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        rc = main(["serve", str(checkpoint), "--port", str(busy.getsockname()[1])])
    assert rc == 2 and "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_metrics_are_prometheus_text(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("gasungbi_requests_total", "gasungbi_prompt_tokens_total", "gasungbi_generation_tokens_total",
                 "gasungbi_time_to_first_token_seconds", "gasungbi_generation_tokens_per_second",
                 "gasungbi_queue_depth", "gasungbi_kv_cache_usage_ratio"):
        assert f"# TYPE {name} " in text
    counted = re.findall(r'^gasungbi_requests_total\{(.*)\} ([\d.]+)$', text, re.M)
    assert any(sorted(labels.split(",")) == ['code="200"', 'route="/v1/completions"'] and float(n) >= 1
               for labels, n in counted), counted
    assert json.loads(httpx.get(server.url + "/v1/models").text)["data"][0]["max_model_len"] == 256
