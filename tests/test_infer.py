"""The inference engine: sampling, batched generation, stops, streaming, the context limit, parity
with transformers' greedy ``generate``, MTP speculative decoding, placement, and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

import gasungbi
from gasungbi.infer.cache import KVCache
from gasungbi.data.conventions import render_chat
from gasungbi.infer.generate import ContextLengthError, Detokenizer, generate, stream
from gasungbi.infer.placement import apply_placement, offload_experts, plan_placement
from gasungbi.infer.sampling import SamplingParams, apply_repetition_penalty, draw, filter_logits, sample
from gasungbi.model.accounting import count_params


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return gasungbi.build_model(gasungbi.get_preset("debug").replace(initializer_range=0.25), seed=0).eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400], [42]]


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------

def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.8)) == [0, 1]  # 0.5 + 0.3 reaches 0.8
    assert kept(filter_logits(logits, top_p=0.81)) == [0, 1, 2]
    assert kept(filter_logits(logits, top_p=0.1)) == [0]  # always the most likely one
    assert kept(filter_logits(logits, min_p=0.35)) == [0, 1]  # 0.15 < 0.35 x 0.5
    assert kept(filter_logits(logits, top_k=3, top_p=0.9)) == [0, 1, 2]
    # filters see the renormalized distribution left by the previous one (transformers' order)
    assert kept(filter_logits(logits, top_p=0.6)) == [0, 1]
    assert kept(filter_logits(logits, top_k=2, top_p=0.6)) == [0]  # after top-k: 0.5/0.8 = 0.625 >= 0.6
    assert kept(filter_logits(logits, top_k=2, top_p=0.7)) == [0, 1]
    assert kept(filter_logits(logits, top_k=2, top_p=0.7, min_p=0.7)) == [0]  # 0.375 < 0.7 x 0.625


def test_repetition_penalty_and_greedy():
    logits = torch.tensor([[2.0, -1.0, 1.9, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 1.9, 0.5]]))
    assert sample(logits).item() == 0
    assert sample(logits, SamplingParams(repetition_penalty=2.0), seen=seen).item() == 2


def test_draws_are_seeded_and_follow_the_distribution():
    probs = torch.tensor([[0.6, 0.3, 0.1, 0.0]]).expand(20000, 4)
    a = draw(probs, torch.Generator().manual_seed(1))
    b = draw(probs, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=4).float() / a.numel()
    assert torch.allclose(freq, probs[0], atol=0.015)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------

def test_batched_prompts_of_different_lengths_equal_each_alone(model):
    batch = generate(model, PROMPTS, max_new_tokens=12, stop_tokens=())
    for p, c in zip(PROMPTS, batch):
        alone = generate(model, p, max_new_tokens=12, stop_tokens=())[0]
        assert c.tokens == alone.tokens and len(c.tokens) == 12
        assert c.finish_reason == "length" and c.prompt_tokens == p
    assert len({tuple(c.tokens) for c in batch}) == len(PROMPTS)


def test_decode_matches_a_full_forward(model):
    """Greedy tokens equal the argmax of a fresh full forward over prompt + generated tokens."""
    p = PROMPTS[0]
    out = generate(model, p, max_new_tokens=8, stop_tokens=())[0].tokens
    with torch.no_grad():
        logits = model(torch.tensor([p + out]))[0]
    assert logits[len(p) - 1:-1].argmax(-1).tolist() == out


def test_seeded_sampling_is_reproducible(model):
    sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.2, seed=7)
    a = generate(model, PROMPTS, max_new_tokens=10, sampling=sp, stop_tokens=())
    b = generate(model, PROMPTS, max_new_tokens=10, sampling=sp, stop_tokens=())
    c = generate(model, PROMPTS, max_new_tokens=10, sampling=SamplingParams(temperature=1.0, seed=8),
                 stop_tokens=())
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_repetition_penalty_reduces_repeats(model):
    base = generate(model, [1, 2, 3], max_new_tokens=40, stop_tokens=())[0].tokens
    pen = generate(model, [1, 2, 3], max_new_tokens=40, stop_tokens=(),
                   sampling=SamplingParams(repetition_penalty=100.0))[0].tokens
    assert len(set(pen)) == 40 and len(set(base)) < 40  # the untrained model loops; penalized, it cannot


def test_stop_token(model):
    ref = generate(model, PROMPTS[0], max_new_tokens=12, stop_tokens=())[0].tokens
    stop = ref[5]
    first = ref.index(stop)
    out = generate(model, PROMPTS[0], max_new_tokens=12, stop_tokens=[stop])[0]
    assert out.tokens == ref[:first] and out.finish_reason == "stop"
    # in a batch, the other rows continue
    batch = generate(model, [PROMPTS[0], PROMPTS[1]], max_new_tokens=12, stop_tokens=[stop])
    assert batch[0].tokens == ref[:first]
    alone = generate(model, PROMPTS[1], max_new_tokens=12, stop_tokens=[stop])[0]
    assert batch[1].tokens == alone.tokens


def test_stop_strings_and_streaming_text(model, tokenizer):
    prompt = "hello"
    full = generate(model, prompt, max_new_tokens=30, stop_tokens=(), tokenizer=tokenizer)[0]
    assert full.text == tokenizer.decode(full.tokens, skip_special_tokens=False)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    s = stream(model, prompt, max_new_tokens=30, stop_tokens=(), stop_strings=["\x00never", stop], tokenizer=tokenizer)
    deltas = list(s)
    out = s.completions[0]
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.index(stop)]
    assert "".join(d.text for d in deltas) == out.text  # the streamed text never includes the stop string
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])
    # without stops, the stream concatenates to the whole text
    s = stream(model, prompt, max_new_tokens=30, stop_tokens=(), tokenizer=tokenizer)
    assert "".join(d.text for d in s) == full.text


def test_detokenizer_holds_back_partial_characters(tokenizer):
    ids = tokenizer.encode("안녕 🙂 ok").ids
    d = Detokenizer(tokenizer)
    pieces = [d.add(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == "안녕 🙂 ok" and not any("\ufffd" in p for p in pieces)


def test_context_limit_is_a_clear_error(model):
    limit = model.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match=f"exceeds the model's context of {limit} tokens"):
        generate(model, [1] * (limit - 5), max_new_tokens=10)
    assert len(generate(model, [1] * (limit - 10), max_new_tokens=10, stop_tokens=())[0].tokens) == 10
    with pytest.raises(ValueError, match="out of range"):
        generate(model, [100000])
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[]])


def test_cache_holds_only_the_latent_and_rope_key():
    cfg = gasungbi.get_preset("small")
    cache = KVCache(gasungbi.get_preset("debug"), 1, 8)
    latent, rope_key = cache.layers[0]
    assert cache.names == ("latent", "rope_key") and latent.shape[-1] == 32 and rope_key.shape[-1] == 8
    assert KVCache.bytes_per_token(cfg, torch.bfloat16) == (128 + 32) * 8 * 2
    assert KVCache.bytes_per_token(cfg, torch.float32) == (128 + 32) * 8 * 4


# ---------------------------------------------------------------------------------------------
# parity with transformers
# ---------------------------------------------------------------------------------------------

def test_greedy_equals_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    gasungbi.save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf.generation_config.eos_token_id = None  # generate the full length, as with stop_tokens=()
    hf.generation_config.pad_token_id = 0
    ours = generate(model, PROMPTS, max_new_tokens=16, stop_tokens=())
    for p, c in zip(PROMPTS, ours):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=16, do_sample=False)
        assert ref[0, len(p):].tolist() == c.tokens
    # transformers' own left-padded batch agrees too
    P = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in PROMPTS])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert ref[:, P:].tolist() == [c.tokens for c in ours]


# ---------------------------------------------------------------------------------------------
# speculative decoding with MTP
# ---------------------------------------------------------------------------------------------

def test_speculative_greedy_is_identical(model):
    for p in PROMPTS:
        plain = generate(model, p, max_new_tokens=20, stop_tokens=())[0]
        s = stream(model, p, max_new_tokens=20, stop_tokens=(), speculative=True)
        list(s)
        assert s.completions[0].tokens == plain.tokens
        assert s.stats.drafted > 0 and s.stats.new_tokens == 20


def test_speculative_errors(model):
    with pytest.raises(ValueError, match="one prompt at a time"):
        generate(model, PROMPTS, speculative=True)
    no_mtp = gasungbi.build_model(gasungbi.get_preset("debug").replace(num_nextn_predict_layers=0), seed=0)
    with pytest.raises(ValueError, match="MTP"):
        generate(no_mtp, [1, 2], speculative=True)


def _corpus(n_chars: int, seed: int = 0) -> torch.Tensor:
    """Byte tokens of a repetitive text: a few sentences in random order."""
    import random
    rng = random.Random(seed)
    sentences = ["the cat sat on the mat. ", "a dog ran to the big red log. ", "we like to eat green apples. ",
                 "my old car is slow but it runs. ", "birds sing in the tall trees at dawn. "]
    text = ""
    while len(text) < n_chars:
        text += rng.choice(sentences)
    return torch.tensor(list(text.encode()[:n_chars]))


def _fit(data: torch.Tensor, steps: int, batch: int, mtp_weight: float) -> torch.nn.Module:
    """The debug model after ``steps`` AdamW steps (main + MTP loss) on windows of ``data``."""
    torch.manual_seed(0)
    m = gasungbi.build_model(gasungbi.get_preset("debug"), seed=0).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - 65, (batch,), generator=g)
        windows = torch.stack([data[s:s + 65] for s in starts])
        x, y = windows[:, :-1], windows[:, 1:]
        h = m.hidden_states(x)
        loss = torch.nn.functional.cross_entropy(m.lm_head(h).flatten(0, 1), y.flatten())
        for k, lg in enumerate(m.mtp_logits(h, x), start=1):
            loss = loss + mtp_weight * torch.nn.functional.cross_entropy(lg.flatten(0, 1), y[:, k:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def trained():
    """The debug model after 120 AdamW steps (main + MTP loss) on the repetitive corpus."""
    return _fit(_corpus(40000), 120, 16, 0.3)


CYCLE = [5, 17, 42, 9, 100, 3, 77, 250, 31, 64, 12]


@pytest.fixture(scope="module")
def cyclic():
    """The debug model after 150 AdamW steps (main + MTP loss) on one repeating cycle of 11 tokens: a
    task it learns to a loss near 0 with wide logit margins (checked on seeds 0-7: all continue the
    cycle exactly and accept every draft), so what the tests below assert holds on any machine."""
    return _fit(torch.tensor(CYCLE * 400), 150, 8, 1.0)


def test_speculative_on_a_trained_model_accepts_its_drafts(cyclic):
    prompt = (CYCLE * 3)[:20]
    plain = generate(cyclic, prompt, max_new_tokens=48, stop_tokens=())[0]
    assert plain.tokens == [(CYCLE * 10)[20 + i] for i in range(48)]  # the model learned the cycle
    s = stream(cyclic, prompt, max_new_tokens=48, stop_tokens=(), speculative=True)
    list(s)
    assert s.completions[0].tokens == plain.tokens
    assert s.stats.acceptance_rate > 0.9, s.stats
    assert s.stats.forwards <= 0.6 * 47  # about one main-model forward per two tokens
    # sampling: reproducible with a seed
    sp = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    a = generate(cyclic, prompt, max_new_tokens=24, sampling=sp, stop_tokens=(), speculative=True)[0]
    b = generate(cyclic, prompt, max_new_tokens=24, sampling=sp, stop_tokens=(), speculative=True)[0]
    assert a.tokens == b.tokens and len(a.tokens) == 24


# ---------------------------------------------------------------------------------------------
# placement
# ---------------------------------------------------------------------------------------------

def test_plan_counts_every_weight_and_splits_the_experts():
    cfg = gasungbi.get_preset("deepseek-v3-671b")
    total = count_params(cfg).total_with_mtp
    one = plan_placement(cfg, "cpu", None, torch.bfloat16)
    assert not one.split and list(one.bytes_per_device) == ["cpu"]
    assert one.bytes_per_device["cpu"] == pytest.approx(2 * total, rel=1e-6)
    split = plan_placement(cfg, "cuda", "cpu", torch.bfloat16)
    routed = dict(count_params(cfg).components)["routed_experts"] + count_params(cfg).mtp["routed_experts"]
    assert split.bytes_per_device["cpu"] == 2 * routed
    assert split.bytes_per_device["cuda"] + split.bytes_per_device["cpu"] == one.bytes_per_device["cpu"]
    assert 30e9 < split.bytes_per_device["cuda"] < 40e9  # ~17B non-expert params in bf16 (+ MTP)
    q4 = plan_placement(cfg, "cuda", "cpu", torch.bfloat16, quant="int4")
    assert q4.bytes_per_device["cpu"] < 0.3 * split.bytes_per_device["cpu"]
    assert "GiB" in split.format(4096) and "KV cache" in split.format(4096)


def test_apply_placement_moves_all_but_the_experts():
    m = gasungbi.build_model(gasungbi.get_preset("debug"), seed=0)
    apply_placement(m, plan_placement(m.config, "meta", "cpu"))
    for name, p in m.named_parameters():
        assert p.device.type == ("cpu" if ".experts." in name else "meta"), name


def test_offloaded_experts_give_the_same_output(model):
    m = gasungbi.build_model(gasungbi.get_preset("debug").replace(initializer_range=0.25), seed=0).eval()
    assert offload_experts(m, "cpu") == 3  # two MoE layers + the MTP block's
    assert generate(m, PROMPTS, max_new_tokens=8) == generate(model, PROMPTS, max_new_tokens=8)
    p = plan_placement(m.config, "cpu", "cpu")
    assert apply_placement(m, p) is m and not p.split  # CPU only: a no-op


# ---------------------------------------------------------------------------------------------
# chat template and CLI
# ---------------------------------------------------------------------------------------------

def test_chat_template(tokenizer):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    text = render_chat(msgs)
    assert text == ("<|bos|><|system|>be brief<|end|><|user|>hi<|end|><|assistant|>hello<|end|>"
                    "<|user|>bye<|end|><|assistant|>")
    ids = tokenizer.encode(render_chat(msgs)).ids
    assert ids[:2] == [0, tokenizer.token_to_id("<|system|>")] and ids[-1] == tokenizer.token_to_id("<|assistant|>")
    assert ids.count(tokenizer.token_to_id("<|end|>")) == 4
    with pytest.raises(ValueError, match="unknown chat role"):
        render_chat([{"role": "robot", "content": "x"}])


def _cli(*args, stdin=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "gasungbi", *args], capture_output=True, text=True, timeout=120,
                          input=stdin, env=env)


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory):
    from gasungbi.data.tokenizer import save_tokenizer
    path = tmp_path_factory.mktemp("ckpt")
    save_tokenizer(tokenizer, path / "tok")
    gasungbi.save_model(model, path, tokenizer=path / "tok")
    return path


def test_cli_generate_and_quantize(checkpoint, model, tokenizer, tmp_path):
    r = _cli("generate", str(checkpoint), "--prompt-ids", "5,6,7,8,9,10,11", "--prompt-ids", "3 4",
             "--max-new-tokens", "6", "--stats")
    assert r.returncode == 0, r.stderr
    want = generate(model, PROMPTS[:2], max_new_tokens=6, tokenizer=tokenizer)
    assert r.stdout == "".join(f"[{i}] {c.text}\n" for i, c in enumerate(want))
    assert "tokens/s" in r.stderr and "KV cache" in r.stderr
    r = _cli("generate", str(checkpoint), "--prompt", "hello", "--max-new-tokens", "5", "--speculative", "--stats")
    assert r.returncode == 0 and "acceptance" in r.stderr, r.stderr
    # --report: the figures `plan backtest --decode` predicts, from this machine
    r = _cli("generate", str(checkpoint), "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--quant", "int8",
             "--report", str(tmp_path / "decode.json"))
    report = json.loads((tmp_path / "decode.json").read_text())
    assert r.returncode == 0 and report["weights"] == "int8" and report["batch_size"] == 1, r.stderr
    assert report["prompt_tokens"] == 3 and report["new_tokens"] == 6 and report["decode_tokens_per_s"] > 0
    assert report["config"] == json.loads((checkpoint / "config.json").read_text())
    r = _cli("plan", "backtest", "--decode", str(tmp_path / "decode.json"), "--json")
    row = json.loads(r.stdout)["rows"][-1]
    assert row["name"].startswith("this machine:") and row["published"] == report["decode_tokens_per_s"], r.stderr
    r = _cli("quantize", str(checkpoint), "--mode", "int8", "--out", str(tmp_path / "q8"))
    assert r.returncode == 0 and "int8" in r.stdout, r.stderr
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization_config"]["mode"] == "int8"
    r = _cli("generate", str(tmp_path / "q8"), "--prompt", "hello", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    r = _cli("generate", str(checkpoint), "--prompt-ids", "1,2", "--max-new-tokens", "1000")
    assert r.returncode == 2 and "exceeds the model's context" in r.stderr and "Traceback" not in r.stderr


def test_cli_chat(checkpoint):
    r = _cli("chat", str(checkpoint), "--max-new-tokens", "4", stdin="hi there\n/reset\n/nope\nhello\n/quit\nnever\n")
    assert r.returncode == 0, r.stderr
    assert "conversation cleared" in r.stderr and "unknown command /nope" in r.stderr
    assert len(r.stdout.splitlines()) == 2  # two replies; nothing after /quit


# ---------------------------------------------------------------------------------------------
# weight-only quantization
# ---------------------------------------------------------------------------------------------

def test_quantizers_round_trip_within_half_a_step():
    from gasungbi.infer.quant import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
    w = torch.randn(3, 32, 256)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (3, 32)
    assert ((dequantize_int8(q, s) - w).abs() <= s[..., None] / 2 + 1e-6).all()
    p, sz = quantize_int4(w, 64)
    assert p.dtype == torch.uint8 and p.shape == (3, 32, 128) and sz.shape == (3, 4, 32, 2)
    step = sz[..., 0].transpose(-1, -2).repeat_interleave(64, dim=-1)  # (3, 32, 256) scale of each weight
    assert ((dequantize_int4(p, sz) - w).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cpu_kernels_equal_the_dequantized_matmul(mode):
    from gasungbi.infer.quant import _quantize, dequantize_int4, dequantize_int8
    from gasungbi.infer.quant_modules import QuantLinear
    w, x = torch.randn(48, 128), torch.randn(5, 128)
    q, s = _quantize(w, mode, 32)
    ref = x @ (dequantize_int8(q, s) if mode == "int8" else dequantize_int4(q, s)).T
    lin = QuantLinear(128, 48, mode, 128 // 32 if mode == "int4" else None)
    lin.load_state_dict({"weight": q, "weight_scales": s}, strict=True, assign=True)
    lin.prepare(torch.device("cpu"))
    got = lin(x[None])[0]
    assert (got - ref).abs().max() < 2e-2 * ref.abs().max()  # activations go through bf16


def _dequantized(qsd: dict) -> dict:
    """A float state dict from a portable quantized one (the reference the kernels must match)."""
    from gasungbi.infer.quant import dequantize_int4, dequantize_int8
    out = {}
    for k, v in qsd.items():
        if k.endswith("_scales"):
            continue
        if f"{k}_scales" in qsd:
            v = (dequantize_int8 if v.dtype == torch.int8 else dequantize_int4)(v, qsd[f"{k}_scales"])
        out[k] = v
    return out


def _naive_ffn(ffn, x: torch.Tensor) -> torch.Tensor:
    """A float MLP, or a MoE computed token by token: shared(x) + sum_k g_k expert_k(x)."""
    if not hasattr(ffn, "experts"):
        return ffn(x)
    flat = x.reshape(-1, x.shape[-1])
    weights, idx, _ = ffn.gate(flat)
    rows = [sum(w * ffn.experts.expert(e, t[None])[0] for w, e in zip(wt.tolist(), it.tolist()))
            for t, wt, it in zip(flat, weights, idx)]
    return torch.stack(rows).view(x.shape) + ffn.shared_experts(x)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_ffns_equal_the_dequantized_float_ones(mode):
    """The fused gate/up ``QuantMLP`` (dense layer, shared experts) and ``QuantExperts`` on one token
    (the direct loop over its K experts) and on several (the sorted dispatch)."""
    from gasungbi.infer.quant import quantize_state_dict
    from gasungbi.infer.quant_modules import QuantExperts, QuantMLP, from_quantized_state_dict
    cfg = gasungbi.get_preset("debug").replace(first_k_dense_replace=1)
    model = gasungbi.build_model(cfg, seed=0).eval()
    qsd = quantize_state_dict(model, mode, 32)
    quant = from_quantized_state_dict(cfg, qsd)
    ref = gasungbi.build_model(cfg, seed=1).eval()
    ref.load_state_dict(_dequantized(qsd))
    assert isinstance(quant.model.layers[0].mlp, QuantMLP)
    assert isinstance(quant.model.layers[1].mlp.experts, QuantExperts)
    assert isinstance(quant.model.layers[1].mlp.shared_experts, QuantMLP)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (0, 1):
            for tokens in (1, 6):
                x = torch.randn(2 if tokens > 1 else 1, tokens, cfg.hidden_size, generator=g)
                got, want = quant.model.layers[layer].mlp(x), _naive_ffn(ref.model.layers[layer].mlp, x)
                assert got.dtype == x.dtype
                assert (got - want).abs().max() < 2e-2 * want.abs().max()  # activations go through bf16


def test_quantize_save_load(trained, tmp_path):
    from gasungbi.infer.load import load_quantized
    from gasungbi.infer.quant import quantize_state_dict
    from gasungbi.infer.quant_modules import QuantExperts, QuantLinear, quantize
    from gasungbi.interop.quantized import save_quantized
    q = quantize(trained, "int4", 128)
    layer = q.model.layers[1]
    assert isinstance(layer.mlp.experts, QuantExperts) and isinstance(q.lm_head, QuantLinear)
    assert layer.self_attn.o_proj.qweight.mode == "int4" and layer.self_attn.o_proj.qweight.group_size == 64
    assert layer.self_attn.kv_a_proj_with_mqa.qweight.mode == "int8"  # 40 rows: int4 kernels need 16k
    assert isinstance(layer.self_attn.kv_b_proj, torch.nn.Linear)  # read as a tensor by absorbed MLA
    save_quantized(quantize_state_dict(trained, "int4", 128), trained.config, tmp_path, "int4", 128)
    loaded = load_quantized(tmp_path)
    x = _corpus(50, seed=5)[None]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert (tmp_path / "model.safetensors").stat().st_size < 0.45 * sum(
        p.numel() * 4 for p in trained.parameters())
    prompt = _corpus(30, seed=4).tolist()
    plain = generate(loaded, prompt, max_new_tokens=16, stop_tokens=())[0].tokens
    assert generate(loaded, prompt, max_new_tokens=16, stop_tokens=(), speculative=True)[0].tokens == plain


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_checkpoint_round_trip(model, tmp_path, mode):
    """One naming scheme (values under the float name, scales under ``<name>_scales``), and save ->
    load gives the in-memory quantized model's logits exactly: fused MLPs, routed experts, and under
    int4 the matrix that falls back to int8."""
    from gasungbi.infer.load import load_quantized
    from gasungbi.infer.quant import quantize_state_dict
    from gasungbi.infer.quant_modules import QuantExperts, QuantLinear, QuantMLP, quantize
    from gasungbi.interop.quantized import save_quantized
    qsd = quantize_state_dict(model, mode, 32)
    quantized = {k for k, v in qsd.items() if v.dtype in (torch.int8, torch.uint8)}
    assert {k for k in qsd if "scales" in k} == {f"{k}_scales" for k in quantized}
    values = torch.int8 if mode == "int8" else torch.uint8
    assert qsd["model.layers.1.mlp.experts.gate_proj"].dtype == qsd["model.layers.0.mlp.up_proj.weight"].dtype == values
    assert qsd["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.int8  # 40 rows: no int4
    save_quantized(qsd, model.config, tmp_path, mode, 32)
    loaded, q = load_quantized(tmp_path), quantize(model, mode, 32)
    assert isinstance(loaded.model.layers[1].mlp.experts, QuantExperts)
    assert isinstance(loaded.model.layers[0].mlp, QuantMLP) and isinstance(loaded.lm_head, QuantLinear)
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_quantized_checkpoint_with_a_tensor_missing_or_renamed_does_not_load(model, tmp_path):
    import re

    from safetensors.torch import load_file, save_file

    from gasungbi.config import CheckpointError
    from gasungbi.infer.load import load_quantized
    from gasungbi.infer.quant import quantize_state_dict
    from gasungbi.interop.quantized import save_quantized
    path = save_quantized(quantize_state_dict(model, "int4", 32), model.config, tmp_path, "int4", 32)
    f = path / "model.safetensors"
    full = load_file(f)
    for gone in ("model.layers.1.mlp.experts.down_proj_scales", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        save_file({k: v for k, v in full.items() if k != gone}, f)
        with pytest.raises(CheckpointError, match=re.escape(str(f)) + ".*Missing.*" + re.escape(f'"{gone}"')):
            load_quantized(path)
    old, new = "model.layers.0.self_attn.o_proj.weight_scales", "model.layers.0.self_attn.o_proj.scales"
    save_file({(new if k == old else k): v for k, v in full.items()}, f)
    with pytest.raises(CheckpointError, match=f'Missing.*"{re.escape(old)}".*Unexpected.*"{re.escape(new)}"'):
        load_quantized(path)
    save_file(full, f)
    load_quantized(path)
    hf = json.loads((path / "config.json").read_text())
    del hf["quantization_config"]["format_version"]  # format 1
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="format 1.*re-run `gasungbi quantize`"):
        load_quantized(path)


def test_perplexity_change_of_a_trained_model(trained):
    """Targets: int8 within +1%, int4 (group 128, here 64 = the width) within +5% of fp32."""
    from gasungbi.eval.perplexity import perplexity
    from gasungbi.infer.quant_modules import quantize
    val = _corpus(8192, seed=1)
    base = perplexity(trained, val, 128)
    assert base < 5  # trained: the untrained model is at ~512
    assert perplexity(quantize(trained, "int8"), val, 128) < 1.01 * base
    assert perplexity(quantize(trained, "int4", 128), val, 128) < 1.05 * base


def test_quantize_leaves_widths_the_int8_kernel_cannot_take_in_float():
    """q_lora_rank 24: q_b_proj's input width is not a multiple of 16, where torch's CPU int8 kernel
    segfaults; it stays in floating point and the model generates (as its float twin does for it)."""
    from gasungbi.infer.quant import quantize_state_dict
    from gasungbi.infer.quant_modules import quantize

    cfg = gasungbi.get_preset("debug").replace(q_lora_rank=24, initializer_range=0.25)
    m = gasungbi.build_model(cfg, seed=0).eval()
    qsd = quantize_state_dict(m, "int8")
    q_b = [k for k in qsd if k.endswith("q_b_proj.weight")]
    assert q_b and all(qsd[k].is_floating_point() and f"{k}_scales" not in qsd for k in q_b)
    out = generate(quantize(m, "int8"), [list(range(5, 69))] * 2, max_new_tokens=4, stop_tokens=())[0]  # M = 128 rows
    assert len(out.tokens) == 4
