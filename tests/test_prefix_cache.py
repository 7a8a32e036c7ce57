"""Automatic prefix caching: the block store (chained keys, least recently used out, the byte bound),
the engine reusing cached prefixes (greedy output equal to prefilling everything, alone and in
batches, prompts sharing part of a block), and ``gasungbi serve`` through the official ``openai``
client (``usage.prompt_tokens_details.cached_tokens``, text equal to a server without the cache,
eviction under a tiny bound)."""

import pytest
import torch

import gasungbi
from gasungbi.infer.engine import Engine
from gasungbi.infer.prefix_cache import PrefixCache, block_keys

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# the block store
# ---------------------------------------------------------------------------------------------

def _blocks(n: int, width: int = 4, block: int = 16):
    """read(i, j) of a prompt whose block b holds the value b everywhere."""
    return lambda i, j: torch.arange(i, j, dtype=torch.float32).repeat_interleave(block)[:, None].expand(-1, width)


def test_block_keys_chain_over_the_whole_prefix():
    a, b = list(range(40)), list(range(40))
    b[3] = 99  # a change in block 0 changes every later key, though blocks 1, 2 hold the same ids
    ka, kb = block_keys(a), block_keys(b)
    assert len(ka) == 2 and len(block_keys(a[:15])) == 0 and len(block_keys(a[:32])) == 2
    assert all(x != y for x, y in zip(ka, kb))
    assert block_keys(a + [7] * 8)[:2] == ka and block_keys(a[:20]) == ka[:1]  # a key names its prefix only
    assert block_keys(list(range(16, 32))) != ka[1:]  # the same ids at another place: another key
    assert block_keys(a, 8)[:4] != ka  # the block size is part of what a key means


def test_store_matches_the_longest_prefix_and_evicts_least_recently_used():
    nbytes = 16 * 4 * 4  # one block: 16 tokens x 4 floats
    store = PrefixCache(3 * nbytes)
    a = block_keys(list(range(48)))  # 3 blocks
    assert store.match(a) == [] and store.insert(a, _blocks(3)) == 3 and store.bytes == 3 * nbytes
    assert [b[0, 0].item() for b in store.match(a)] == [0, 1, 2]
    assert len(store.match(a[:1] + block_keys([5] * 32)[1:])) == 1  # the run stops at the first miss
    b = block_keys([7] * 32)
    assert store.insert(b, _blocks(2)) == 2  # evicts a's last two blocks (a prefix's tail goes first)
    assert len(store) == 3 and store.bytes == 3 * nbytes and store.evicted == 2
    assert len(store.match(a)) == 1 and len(store.match(b)) == 2
    store.match(a)  # a's head is now the most recent: b's tail goes next, then b's head
    c = block_keys([8] * 16)
    store.insert(c, _blocks(1))
    assert len(store.match(b)) == 1 and len(store.match(a)) == 1 and len(store.match(c)) == 1


def test_store_keeps_a_prefix_head_when_the_bound_is_too_small():
    nbytes = 16 * 4 * 4
    store = PrefixCache(2 * nbytes)
    a = block_keys(list(range(64)))
    assert store.insert(a, _blocks(4)) == 2 and len(store.match(a)) == 2  # blocks 0, 1: usable
    assert store.insert(a, _blocks(4)) == 0  # nothing of its own is evicted for its own tail
    assert PrefixCache(nbytes - 1).insert(a, _blocks(4)) == 0  # a block over the bound is never stored
    assert PrefixCache(0).insert(a, _blocks(4)) == 0


# ---------------------------------------------------------------------------------------------
# the engine: a hit decodes what a full prefill decodes
# ---------------------------------------------------------------------------------------------

def _decode(engine: Engine, prompts, n: int = 12) -> list[list[int]]:
    last, _ = engine.join(prompts)
    out = [[t] for t in last.argmax(-1).tolist()]
    for _ in range(n):
        for o, t in zip(out, engine.step([o[-1] for o in out]).argmax(-1).tolist()):
            o.append(t)
    for i in reversed(range(engine.size)):
        engine.remove(i)
    return out


@pytest.mark.parametrize("preset", ["debug", "llama-debug", "v32-tiny"])
def test_engine_hits_decode_as_full_prefills(preset):
    """MLA latent + rope key, GQA's K and V, V3.2's indexer keys: prompts sharing 2 blocks and a bit,
    joined alone and in a batch with a miss, decode greedily what they decode with no cache."""
    cfg = gasungbi.get_preset(preset)
    cfg = cfg.replace(initializer_range=0.25) if preset != "v32-tiny" else cfg
    model = gasungbi.build_model(cfg, seed=0).eval()
    shared = torch.randint(1, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    first, second = shared + [5, 6, 7], [shared[:38] + [9] * 7, [3] * 20, shared + [8]]
    want = [_decode(Engine(model, 4, 128), [p])[0] for p in [first, *second, first]]
    engine = Engine(model, 4, 128, prefix_cache_bytes=2**24)
    got = _decode(engine, [first])
    assert engine.cached == [0] and len(engine.prefix) == 2
    got += _decode(engine, second)  # 32 cached of 45 and of 41, a miss beside them
    assert engine.cached == [45 - 20, 0, 41 - 20]  # the longest rest (the miss: 20) is fed to every row
    got += _decode(engine, [first])
    assert engine.cached == [32] and got == want
    again = first[:33]  # a prompt all cached but its last token
    assert _decode(engine, [again])[0] == _decode(Engine(model, 1, 128), [again])[0] and engine.cached == [32]


def test_engine_without_a_position_cache_has_no_prefix_cache():
    cfg = gasungbi.get_preset("v4-tiny")
    engine = Engine(gasungbi.build_model(cfg, seed=0).eval(), 1, 64, prefix_cache_bytes=2**20)
    assert engine.prefix is None
    engine.join([list(range(1, 40))])
    assert engine.cached == [0]


# ---------------------------------------------------------------------------------------------
# gasungbi serve, through the openai client
# ---------------------------------------------------------------------------------------------

SYSTEM = "You answer in one short line. Think before you answer, check the sum twice and never guess. " * 2
QUESTIONS = ["what is two plus two?", "and three plus three?", "hello", "count to five", "why?"]


@pytest.fixture(scope="module")
def clients(checkpoint, start_server):
    """Clients of two servers of the same checkpoint: the prefix cache on (the default) and off."""
    openai = pytest.importorskip("openai")
    on = start_server(checkpoint, "--max-batch", "4")
    off = start_server(checkpoint, "--max-batch", "4", "--prefix-cache-gib", "0")
    return [openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60) for s in (on, off)]


def _ask(client, question: str, **kw):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, **kw)


def test_a_shared_system_prompt_is_cached(clients):
    """The second request with the same system prompt prefills only what follows its cached blocks and
    answers, greedily, what a server without the cache answers; streamed usage and completions too."""
    on, off = clients
    first = _ask(on, QUESTIONS[0])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = _ask(on, QUESTIONS[1])
    cached, prompt = second.usage.prompt_tokens_details.cached_tokens, second.usage.prompt_tokens
    assert cached % 16 == 0 and prompt - 40 < cached < prompt  # the system prompt, less its last partial block
    want = _ask(off, QUESTIONS[1])
    assert want.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].message.content == want.choices[0].message.content
    chunks = list(_ask(on, QUESTIONS[1], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == prompt // 16 * 16  # all its full blocks now
    text = SYSTEM + "The answer is"
    plain = [c.completions.create(model="tiny", prompt=text, max_tokens=10, temperature=0) for c in (on, on, off)]
    # the chat template puts its own tokens before the system prompt: the first completion is a miss
    assert [p.usage.prompt_tokens_details.cached_tokens > 0 for p in plain] == [False, True, False]
    assert plain[0].choices[0].text == plain[1].choices[0].text == plain[2].choices[0].text


def test_batched_hits_answer_as_without_the_cache(clients):
    """Concurrent requests sharing the system prompt join the batch together, cached, and each answers
    what it answers on a server without the cache."""
    from concurrent.futures import ThreadPoolExecutor

    on, off = clients
    _ask(on, QUESTIONS[0])
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        got = list(pool.map(lambda q: _ask(on, q), QUESTIONS))
    want = [_ask(off, q) for q in QUESTIONS]
    assert all(g.usage.prompt_tokens_details.cached_tokens > 0 for g in got)
    assert [g.choices[0].message.content for g in got] == [w.choices[0].message.content for w in want]


def test_a_tiny_bound_evicts_the_oldest_prefix(checkpoint, start_server, model):
    """With room for 6 blocks, a 6-block prompt evicts another's: that one is a miss again, while the
    most recent prefix hits."""
    from gasungbi.infer.cache import KVCache

    openai = pytest.importorskip("openai")
    cfg = model.config
    block = 16 * 4 * sum(t[0, 0].numel() for bufs in KVCache(cfg, 1, 1).layers[:cfg.num_hidden_layers] for t in bufs)
    server = start_server(checkpoint, "--prefix-cache-gib", repr(6 * block / 2**30))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    ids = torch.randint(3, cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(2)).tolist()

    def cached(prompt):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
        return r.usage.prompt_tokens_details.cached_tokens

    a, b = ids
    assert cached(a) == 0 and cached(a[:96] + [5] * 4) == 96  # 6 blocks held, then hit
    assert cached(b) == 0  # stored, evicting all of a's blocks
    assert cached(b[:96] + [7] * 4) == 96 and cached(a) == 0
    assert server.metrics()["gasungbi_prefix_cache_bytes"] == 6 * block
