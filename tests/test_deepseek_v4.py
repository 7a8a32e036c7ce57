"""DeepSeek-V4 (``deepseek_v4``): its config.json in DeepSeek's and transformers' dialects and the
validation of its fields; the model streaming over its position-keyed cache, training, hash routing;
the engine's rows joining, leaving and moving; the cache's bytes. Logit parity with transformers is in
``test_hf_parity.py``, greedy decoding against transformers' generate in ``test_releases.py``, llama.cpp
in ``test_gguf.py``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gasungbi.config import from_hf_config, to_hf_config
from gasungbi.data.prepare import prepare_corpus
from gasungbi.infer.cache import KVCache
from gasungbi.infer.engine import Engine
from gasungbi.interop.hf import load_model
from gasungbi.model.accounting import count_params, v4_cache_shapes
from gasungbi.model.attention import DecodeContext
from gasungbi.model.transformer import build_model
from gasungbi.presets import deepseek_v3_671b, deepseek_v4_flash, deepseek_v4_pro, v4_tiny
from gasungbi.train.objective import Objective, update_expert_bias
from gasungbi.train.trainer import TrainConfig, train

V4_PRESETS = {"deepseek-v4-flash": deepseek_v4_flash, "deepseek-v4-pro": deepseek_v4_pro, "v4-tiny": v4_tiny}

# DeepSeek-V4-Flash's config.json as released (DeepSeek's keys: compress_ratios with the MTP block's entry,
# num_hash_layers, qk_rope_head_dim, a top-level rope_scaling)
FLASH_OFFICIAL = dict(
    architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", vocab_size=129280, hidden_size=4096,
    num_hidden_layers=43, num_attention_heads=64, num_key_value_heads=1, head_dim=512, q_lora_rank=1024,
    qk_rope_head_dim=64, o_groups=8, o_lora_rank=1024, moe_intermediate_size=2048, n_routed_experts=256,
    n_shared_experts=1, num_experts_per_tok=6, norm_topk_prob=True, routed_scaling_factor=1.5,
    scoring_func="sqrtsoftplus", topk_method="noaux_tc", swiglu_limit=10.0, sliding_window=128,
    compress_rope_theta=160000, compress_ratios=[0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)] + [0],
    num_hash_layers=3, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, index_n_heads=64, index_head_dim=128,
    index_topk=512, max_position_embeddings=1048576, rope_theta=10000,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                  "beta_slow": 1},
    rms_norm_eps=1e-6, num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    hidden_act="silu", expert_dtype="fp4")


@pytest.mark.parametrize("name", list(V4_PRESETS))
def test_v4_config_round_trip(name):
    cfg = V4_PRESETS[name]()
    assert from_hf_config(to_hf_config(cfg)) == cfg


def test_official_config_json_is_the_flash_preset():
    cfg = from_hf_config(FLASH_OFFICIAL)
    assert cfg == deepseek_v4_flash()
    assert cfg.v4_layer_types[:4] == ["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                                      "heavily_compressed_attention"]
    assert [cfg.compress_rate(i) for i in (0, 2, 3, 42)] == [0, 4, 128, 4]


def test_transformers_reads_what_we_write_as_it_reads_the_release():
    """DeepseekV4Config of our config.json equals DeepseekV4Config of the released one (the fields that
    drive the model), and transformers' own save reads back as the same ModelConfig."""
    transformers = pytest.importorskip("transformers")

    def hf(d):
        return transformers.DeepseekV4Config(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})

    ours, release = hf(to_hf_config(deepseek_v4_flash())), hf(FLASH_OFFICIAL)
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "qk_rope_head_dim", "partial_rotary_factor",
                "o_groups", "o_lora_rank", "hc_mult", "index_topk", "swiglu_limit", "sliding_window"):
        assert getattr(ours, key) == getattr(release, key), key
    for kind in ("main", "compress"):
        a, b = ours.rope_parameters[kind], release.rope_parameters[kind]
        assert {k: a[k] for k in a if k != "type"} == {k: b[k] for k in b if k != "type"}
    assert from_hf_config(ours.to_dict()) == deepseek_v4_flash()
    tiny = hf(to_hf_config(v4_tiny()))
    assert from_hf_config(tiny.to_dict()) == v4_tiny()


def test_transformers_defaults_fill_absent_keys():
    """A config.json with only the shape keys reads as transformers' DeepseekV4Config() does: V4-Pro's
    attention pattern (two HCA layers, then HCA/CSA), three hash layers, plain RoPE."""
    cfg = from_hf_config(dict(model_type="deepseek_v4", vocab_size=64, hidden_size=32, num_hidden_layers=5,
                              num_attention_heads=8))
    assert cfg.v4_layer_types == ["heavily_compressed_attention"] * 3 + ["compressed_sparse_attention",
                                                                         "heavily_compressed_attention"]
    assert (cfg.num_hash_layers, cfg.head_dim, cfg.qk_rope_head_dim, cfg.compress_rate_hca) == (3, 512, 64, 128)
    assert cfg.rope_scaling is None and cfg.swiglu_limit == 10.0


@pytest.mark.parametrize("change, field", [
    (dict(n_shared_experts=2), "n_shared_experts"), (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(o_groups=3), "o_groups"), (dict(layer_types=["full_attention"] * 4), "layer_types"),
    (dict(num_hash_layers=5), "num_hash_layers"), (dict(qk_rope_head_dim=40), "qk_rope_head_dim"),
    (dict(swiglu_limit=None), "swiglu_limit"), (dict(index_topk=0), "index_topk"),
    (dict(first_k_dense_replace=1), "first_k_dense_replace"), (dict(scoring_func="relu"), "scoring_func"),
    (dict(hc_mult=0), "hc_mult"), (dict(compress_rate_csa=0), "compress_rate_csa")])
def test_v4_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        v4_tiny().replace(**change)


def test_config_json_errors_name_the_key():
    for key, value in (("compress_ratios", [0, 4]), ("mlp_layer_types", ["moe", "hash_moe", "moe", "moe"]),
                       ("compress_rates", {"full_attention": 4})):
        d = dict(to_hf_config(v4_tiny()), **{key: value})
        if key == "compress_ratios":
            d.pop("layer_types")
        with pytest.raises(ValueError, match=key):
            from_hf_config(d)


# --- the model -------------------------------------------------------------------------------------------

def _tiny(**kw):
    """v4-tiny, narrower: all three attention kinds, an 8-token window, HCA at 8, the indexer's top-4 below
    the entries of 60 tokens (16 indexer heads: no ties), a hash layer, constants made non-trivial."""
    cfg = v4_tiny().replace(vocab_size=97, sliding_window=8, compress_rate_hca=8, index_topk=4, index_n_heads=16,
                            initializer_range=0.1, **kw)
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if name in ("sinks", "position_bias", "base", "hc_base"):
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    return model


class _Cache:
    """The decode cache's per-layer state (accounting.v4_cache_shapes), filled with garbage: what a
    row held before must not matter."""

    def __init__(self, cfg, rows, max_len):
        g = torch.Generator().manual_seed(0)
        self.layers = [{k: torch.randn(rows, *s, generator=g) for k, s in v4_cache_shapes(cfg, i, max_len).items()}
                       for i in range(cfg.num_hidden_layers)]

    def state(self, i):
        return self.layers[i]


def test_streaming_forward_equals_the_full_forward():
    """Prefill in pieces of any size, then one token at a time: the same logits as one forward (every
    window, compression and indexer boundary crossed), and a left-padded row equals the row alone."""
    model = _tiny().eval()
    T = 60
    x = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
        for pieces in ([T], [5, 1, 1, 13, 7, 1, 1, 1, 30], [17, 3, 40]):
            cache, outs, p = _Cache(model.config, 1, 128), [], 0
            for n in pieces:
                outs.append(model(x[:, p:p + n], ctx=DecodeContext(cache=cache, positions=torch.arange(p, p + n)[None])))
                p += n
            assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-4, pieces
        cache = _Cache(model.config, 2, 128)
        ids = torch.stack([torch.cat([torch.zeros(20, dtype=torch.long), x[0, :40]]), x[0]])
        pos = torch.stack([(torch.arange(T) - 20).clamp(min=0), torch.arange(T)])
        valid = torch.stack([torch.arange(T) >= 20, torch.ones(T, dtype=torch.bool)])
        out = torch.cat([model(ids[:, a:b], ctx=DecodeContext(cache=cache, positions=pos[:, a:b], valid=valid[:, a:b]))
                         for a, b in ((0, 50), (50, 60))], 1)
    assert (out[0, 20:] - full[0, :40]).abs().max().item() < 1e-4
    assert (out[1] - full[0]).abs().max().item() < 1e-4


def test_training_reaches_every_trained_part_and_balances_the_scored_layers():
    """Backward reaches every parameter but the indexer's (its top-k has no gradient, as in V3.2); a
    few AdamW steps lower the loss; the bias update moves the scored layers' correction biases only
    (hash layers have none)."""
    model = _tiny().train()
    x = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(0))
    objective = Objective(model, balance_alpha=0.01)
    out = objective(x[:, :-1], x[:, 1:])
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".indexer." not in name), name
    assert out["expert_counts"].shape == (4, 8) and "balance_loss" in out
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = out["lm_loss"].item()
    for _ in range(8):
        opt.zero_grad()
        out = objective(x[:, :-1], x[:, 1:])
        out["loss"].backward()
        opt.step()
    assert out["lm_loss"].item() < first - 0.5
    moes = model.moe_layers()
    update_expert_bias(model, out["expert_counts"], gamma=0.1)
    assert moes[0].gate.e_score_correction_bias is None and moes[1].gate.e_score_correction_bias.abs().sum() > 0


def test_hash_layers_route_by_token_id():
    model = _tiny().eval()
    moe = model.moe_layers()[0]
    x = torch.randn(3, 128)
    ids = torch.tensor([5, 5, 9])
    weights, idx, _ = moe.route(x, ids)
    assert torch.equal(idx, moe.gate.tid2eid[ids]) and len(set(idx[2].tolist())) == 2
    assert torch.allclose(weights.sum(-1), torch.full((3,), 1.5))
    with pytest.raises(ValueError, match="token ids"):
        moe.route(x, None)


def test_published_sizes():
    """V4-Flash: "284B total, 13B activated"; V4-Pro: "1.6T total, 49B activated" (the main model)."""
    flash, pro = count_params(deepseek_v4_flash()), count_params(deepseek_v4_pro())
    assert 283e9 < flash.total < 285e9 and 13e9 < flash.activated < 14e9
    assert 1.55e12 < pro.total < 1.6e12 and 49e9 < pro.activated < 50e9
    assert not flash.mtp


# --- decoding ----------------------------------------------------------------------------------------------

def _greedy_alone(model, prompt, n):
    """Greedy tokens by full forwards of the growing sequence (no cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_engine_rows_join_leave_and_move_as_they_would_alone():
    """Continuous batching over the position-keyed cache: rows join while others decode (a long prompt
    moves the batch right), a row leaves (the last row's cache is copied into its place), the clock
    reaches the cache's end (the batch moves left): every row's tokens are those it decodes alone."""
    model = _tiny().eval()
    prompts = {"a": [3, 1, 4, 1, 5], "b": [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3], "c": list(range(10, 40))}
    want = {k: _greedy_alone(model, p, 16) for k, p in prompts.items()}
    engine, rows, got = Engine(model, rows=3, max_len=48), [], {}

    def join(name):
        logits, _ = engine.join([prompts[name]])
        rows.append(name)
        got[name] = [int(logits[0].argmax())]

    def step():
        logits = engine.step([got[name][-1] for name in rows])
        for name, row in zip(rows, logits):
            got[name].append(int(row.argmax()))

    join("a")
    for _ in range(4):
        step()
    join("b")
    join("c")  # 30 > the clock: the batch moves right
    for _ in range(11):
        step()
    engine.remove(rows.index("a"))  # "c", the last row, moves into row 0
    rows[0] = rows.pop()
    while len(got["c"]) < 16:
        step()
    assert engine.moves >= 2
    assert {k: v[:16] for k, v in got.items()} == want


def test_cache_allocates_the_bytes_per_token_it_reports():
    """KVCache.bytes_per_token (accounting.kv_cache_width) is what the V4 cache allocates, per position
    of its length: the window, the entries (1/m of the positions), the compressors' windows."""
    cfg = v4_tiny()
    for max_len in (64, 1000):
        cache = KVCache(cfg, batch_size=3, max_len=max_len, dtype=torch.bfloat16)
        allocated = sum(t.numel() * t.element_size() for bufs in cache.layers for t in bufs)
        per_token = KVCache.bytes_per_token(cfg, torch.bfloat16, context=max_len)
        assert math.isclose(allocated, per_token * 3 * max_len, rel_tol=1e-12)
    mla = KVCache.bytes_per_token(deepseek_v3_671b(), torch.bfloat16)  # (512 + 64) x 61 layers x 2 bytes
    assert KVCache.bytes_per_token(deepseek_v4_flash(), torch.bfloat16, context=2 ** 20) < mla / 8


def test_v4_tiny_trains_through_the_trainer(tmp_path):
    """``gasungbi train --model v4-tiny``: a few steps on a 2-core CPU lower the loss, validate, sample
    through the engine and save a checkpoint that loads back."""
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(3000)))
    prepare_corpus(str(src), tmp_path / "shards", vocab_size=400, val_fraction=0.1, progress=False)
    report = train(TrainConfig(data=str(tmp_path / "shards"), out_dir=str(tmp_path / "run"), model="v4-tiny",
                               batch_size=4, seq_len=64, max_steps=6, warmup_steps=2, eval_interval=3, eval_batches=2,
                               ckpt_interval=0, log_interval=1, progress=False, sample_tokens=4, device="cpu",
                               price_per_hour=1.0, lr=3e-3))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in rows if "lm_loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0 and report["val_bpb"] > 0
    model = load_model(report["checkpoint"])
    assert model.config.is_v4 and model.config.layer_types == v4_tiny().layer_types
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, model.config.vocab_size, (1, 40)))).all()
