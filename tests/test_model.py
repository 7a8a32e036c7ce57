"""The model itself: accounting, MLA's two computations, DeepSeekMoE routing, MTP, configs."""

import math

import pytest
import torch
import torch.nn.functional as F

from gasungbi.config import ModelConfig, from_hf_config, to_hf_config
from gasungbi.presets import PRESETS, get_preset
from gasungbi.infer.cache import KVCache
from gasungbi.infer.engine import CacheView, forward_step
from gasungbi.model.accounting import count_params, training_flops_per_token
from gasungbi.model.attention import DecodeContext
from gasungbi.model.moe import MoE, RoutingStats
from gasungbi.model.transformer import build_model
from gasungbi.train.objective import Objective


@pytest.mark.parametrize("name", list(PRESETS))
def test_accounting_matches_built_model(name):
    cfg = get_preset(name)
    model = build_model(cfg, device="meta")
    assert count_params(cfg).total_with_mtp == sum(p.numel() for p in model.parameters())


def test_deepseek_v3_671b_accounting():
    pc = count_params(get_preset("deepseek-v3-671b"))
    assert 665e9 < pc.total < 677e9  # "671B total"
    assert 36e9 < pc.activated < 38e9  # "37B activated" (36.7B + rounding of embedding/head)
    assert abs(pc.components["embedding"] - 0.9e9) < 0.05e9
    assert abs(pc.components["output_head"] - 0.9e9) < 0.05e9
    # the MTP module with its own copies of embedding and head: ~14B in the release
    mtp_release = pc.mtp_total + pc.components["embedding"] + pc.components["output_head"]
    assert 13e9 < mtp_release < 15e9


def test_v3_preset_is_transformers_deepseek_v3_config():
    """An independent source: transformers' DeepseekV3Config() defaults are DeepSeek-V3's architecture.
    Its context (4096, no YaRN) and init std are not the release's; ours follow the released
    config.json there (163,840 positions via YaRN factor 40 on 4,096, init std 0.006)."""
    transformers = pytest.importorskip("transformers")
    ours = to_hf_config(get_preset("deepseek-v3-671b"))
    ref = transformers.DeepseekV3Config().to_dict()
    release_only = {"architectures", "max_position_embeddings", "initializer_range", "rope_parameters"}
    shared = sorted(k for k in ours if k in ref and k not in release_only)
    assert len(shared) > 20
    assert {k: ours[k] for k in shared} == {k: ref[k] for k in shared}
    rope = ours["rope_parameters"]
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 40, 4096)
    assert ours["max_position_embeddings"] == 40 * 4096


def test_v2_presets_match_their_published_sizes():
    # DeepSeek-V2 (arXiv:2405.04434): 236B total / 21B activated; V2-Lite: 15.7B / 2.4B
    lite = count_params(get_preset("deepseek-v2-lite"))
    assert 15.5e9 < lite.total < 16e9
    v2 = count_params(get_preset("deepseek-v2-236b"))
    assert 235e9 < v2.total < 237e9 and 20e9 < v2.activated < 22.5e9


def test_small_presets_sizes():
    assert count_params(get_preset("debug")).total_with_mtp < 1e6
    assert 5e6 <= count_params(get_preset("cpu-tiny")).total_with_mtp <= 15e6
    assert 100e6 <= count_params(get_preset("small")).total_with_mtp <= 150e6


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trip(name):
    cfg = get_preset(name)
    assert from_hf_config(to_hf_config(cfg)) == cfg


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_experts_per_tok=9"):
        get_preset("debug").replace(num_experts_per_tok=9)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        ModelConfig(model_type="gpt2")
    with pytest.raises(KeyError, match="cpu-tiny"):
        get_preset("nope")


@pytest.fixture
def model():
    return build_model(get_preset("debug"), seed=0).eval()


def test_absorbed_equals_naive(model):
    x = torch.randint(0, 512, (2, 17))
    with torch.no_grad():
        assert (model(x) - model(x, ctx=DecodeContext(absorb=True))).abs().max().item() < 1e-5


def test_causal_attention_with_narrower_values_equals_sdpa():
    """MLA's training attention (values narrower than queries and keys, padded for the CPU's flash
    kernel) equals torch's own attention on the unpadded tensors, forward and backward."""
    from gasungbi.model.attention import causal_attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 37, 24, generator=g), torch.randn(2, 3, 37, 24, generator=g)
    v, dy = torch.randn(2, 3, 37, 16, generator=g), torch.randn(2, 3, 37, 16, generator=g)
    results = []
    def sdpa(q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    for attend in (causal_attention, sdpa):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, 0.3)
        results.append([out, *torch.autograd.grad(out, leaves, dy)])
    for a, b in zip(*results):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_latent_cache_decode_equals_full_forward(model):
    cfg = model.config
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        full = model(x)
        pad = torch.zeros(2, dtype=torch.long)
        for absorb in (False, True):
            cache = KVCache(cfg, batch_size=2, max_len=16)
            view = CacheView(cache, 0, 2, 16)
            steps = [forward_step(model, x[:, :7], view, torch.arange(7), pad, absorb)]
            for t in range(7, 12):
                steps.append(forward_step(model, x[:, t:t + 1], view, torch.arange(t, t + 1), pad, absorb))
            assert (model.lm_head(torch.cat(steps, dim=1)) - full).abs().max().item() < 1e-5
    latent, rope_key = cache.layers[0]
    assert latent.shape == (2, 16, cfg.kv_lora_rank)  # only the latent ...
    assert rope_key.shape == (2, 16, cfg.qk_rope_head_dim)  # ... and the shared rope key
    assert KVCache.bytes_per_token(cfg, torch.bfloat16) == (32 + 8) * 3 * 2


def test_input_validation(model):
    with pytest.raises(ValueError, match=r"shape \[batch, seq\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 5))


def _reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference of DeepSeekMoE, written independently of Experts.forward."""
    r = moe.gate
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        s = torch.sigmoid(r.weight @ x[t]) if r.scoring == "sigmoid" else torch.softmax(r.weight @ x[t], -1)
        choice = s + (r.e_score_correction_bias if r.e_score_correction_bias is not None else 0)
        if r.n_group > 1:
            g = choice.view(r.n_group, -1)
            gs = g.topk(2).values.sum(-1) if r.method == "noaux_tc" else g.amax(-1)
            allowed = torch.zeros(r.n_group, dtype=torch.bool)
            allowed[gs.topk(r.topk_group).indices] = True
            choice = choice.masked_fill(~allowed.repeat_interleave(g.shape[1]), -math.inf)
        idx = choice.topk(r.top_k).indices
        w = s[idx] / s[idx].sum() if r.norm_topk else s[idx]
        w = w * r.scaling
        for e, we in zip(idx.tolist(), w):
            ex = moe.experts
            h = torch.nn.functional.silu(ex.gate_proj[e] @ x[t]) * (ex.up_proj[e] @ x[t])
            out[t] += we * (ex.down_proj[e] @ h)
    return out + moe.shared_experts(x)


@pytest.mark.parametrize("variant", [dict(), dict(scoring_func="softmax", topk_method="group_limited_greedy",
                                                   norm_topk_prob=False, routed_scaling_factor=16.0)])
def test_grouped_experts_equal_token_loop(variant):
    cfg = get_preset("debug").replace(n_group=4, topk_group=2, **variant)
    moe = build_model(cfg, seed=1).model.layers[1].mlp
    with torch.no_grad():
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.copy_(torch.randn(8))
        x = torch.randn(1, 23, cfg.hidden_size)
        assert (moe(x)[0] - _reference_moe(moe, x[0])).abs().max().item() < 1e-5


def _experts_forward_and_grads(experts, x, idx, weights, dy, run):
    """run(x, idx, weights) (N, d) and the gradients of (dy . output) w.r.t. x, the routing weights
    and the three stacked expert weights."""
    leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
    params = [experts.gate_proj, experts.up_proj, experts.down_proj]
    y = run(leaves[0], idx, leaves[1])
    if not y.requires_grad:  # the loop's answer to no token at all: zeros, outside the graph
        return [y, *(torch.zeros_like(t) for t in leaves + params)]
    return [y, *torch.autograd.grad(y, leaves + params, dy, materialize_grads=True)]


@pytest.mark.parametrize("product", ["torch._grouped_mm", "loop"])
@pytest.mark.parametrize("n_tokens", [13, 0])
def test_grouped_experts_train_as_the_per_expert_loop(product, n_tokens, monkeypatch):
    """The routed experts' forward and every gradient (tokens, routing weights, stacked weights) equal
    the per-expert loop's in fp32, with experts that get no token (their weights' gradient is zero),
    on the grouped product and on its fallback loop, and with no token at all (MTP at T=1)."""
    from gasungbi.model import grouped_mm
    from gasungbi.model.moe import dispatch, expert_counts

    cfg = get_preset("debug")
    experts = build_model(cfg, seed=0).model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(0)
    E, K, d = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    idx = torch.rand(n_tokens, E - 3, generator=g).argsort(dim=1)[:, :K]  # K distinct experts, never the last 3
    x, weights, dy = (torch.randn(n_tokens, d, generator=g), torch.rand(n_tokens, K, generator=g),
                      torch.randn(n_tokens, d, generator=g))
    if product == "loop":
        monkeypatch.setattr(grouped_mm, "grouped_mm_usable", lambda *a: False)
    elif n_tokens:
        assert grouped_mm.grouped_mm_usable(x, experts.gate_proj)
    got = _experts_forward_and_grads(experts, x, idx, weights, dy, experts)
    want = _experts_forward_and_grads(experts, x, idx, weights, dy,
                                      lambda x, i, w: dispatch(experts.expert, x, i, w, expert_counts(i, E)))
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(grad[E - 3:].abs().max() == 0 for grad in got[3:])


def test_bias_changes_choice_not_weights():
    cfg = get_preset("debug")
    gate = build_model(cfg, seed=0).model.layers[1].mlp.gate
    x = torch.randn(64, cfg.hidden_size)
    with torch.no_grad():
        w0, i0, s0 = gate(x)
        gate.e_score_correction_bias[3] = 10.0  # expert 3 now always chosen
        w1, i1, s1 = gate(x)
    assert (i1 == 3).any(dim=1).all()
    chosen_scores = s1.gather(1, i1)
    assert torch.allclose(w1, chosen_scores / chosen_scores.sum(1, keepdim=True) * cfg.routed_scaling_factor)
    assert torch.equal(s0, s1)


def test_expert_with_no_tokens_is_fine():
    cfg = get_preset("debug")
    moe = build_model(cfg, seed=0).model.layers[1].mlp
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.tensor([9.0, 9.0, 0, 0, 0, 0, 0, 0]))
        stats = RoutingStats()
        y = moe(torch.randn(1, 5, cfg.hidden_size), stats=stats)
    assert torch.isfinite(y).all()
    assert stats.counts[1].tolist() == [5, 5, 0, 0, 0, 0, 0, 0]


def test_backward_reaches_every_part_and_balance_loss():
    cfg = get_preset("debug")
    model = build_model(cfg, seed=0).train()
    x = torch.randint(0, 512, (2, 16))
    stats = RoutingStats()
    h = model.hidden_states(x, stats=stats)
    mtp = [model.lm_head(hk) for hk in model.mtp_hidden(h, x, stats=stats)]
    loss = model.lm_head(h).logsumexp(-1).mean() + sum(l.logsumexp(-1).mean() for l in mtp)
    moe = model.moe_layers()
    assert len(stats.balance_losses) == len(moe)
    loss = loss + sum(stats.balance_losses)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert moe[0].gate.weight.grad.abs().sum() > 0
    # a perfectly balanced router gives a sequence balance loss of exactly 1 (sum_i f_i P_i, f_i = P_i N_r = 1)
    assert all(0 < b.item() for b in stats.balance_losses)


def test_inference_leaves_no_state_on_the_model(model):
    """An inference forward records nothing: no counters on the modules, every buffer unchanged."""
    assert all(not hasattr(m, "tokens_per_expert") and not hasattr(m, "balance_loss") for m in model.moe_layers())
    before = {k: v.clone() for k, v in model.state_dict().items()} | {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        first = model(x)
        cache = KVCache(model.config, batch_size=2, max_len=9)
        forward_step(model, x, CacheView(cache, 0, 2, 9), torch.arange(9), torch.tensor([0, 2]), True)
        model.mtp_hidden(model.hidden_states(x), x)
        assert torch.equal(model(x), first)
    after = model.state_dict() | dict(model.named_buffers())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]


def test_objective_reports_expert_counts_and_balance_loss():
    cfg = get_preset("debug")
    model = build_model(cfg, seed=0).train()
    B, T = 2, 16
    x = torch.randint(0, 512, (B, T))
    out = Objective(model, mtp_weight=0.3, balance_alpha=0.01)(x, x)
    moes = model.moe_layers()
    counts = out["expert_counts"]
    assert counts.shape == (len(moes), cfg.n_routed_experts) and not counts.requires_grad
    main = [i for i, m in enumerate(moes) if m.layer_idx < cfg.num_hidden_layers]
    assert main and all(counts[i].sum() == B * T * cfg.num_experts_per_tok for i in main)
    for i, m in enumerate(moes):  # MTP depth k sees T - k positions
        if m.layer_idx >= cfg.num_hidden_layers:
            k = m.layer_idx - cfg.num_hidden_layers + 1
            assert counts[i].sum() == B * (T - k) * cfg.num_experts_per_tok
    stats = RoutingStats()  # the same forward by hand: one balance loss per layer, the objective sums them
    model.mtp_hidden(model.hidden_states(x, stats=stats), x, stats=stats)
    assert len(stats.balance_losses) == len(moes)
    assert out["balance_loss"].item() == pytest.approx(torch.stack(stats.balance_losses).sum().item(), rel=1e-6)
    stats = RoutingStats()
    with torch.no_grad():
        model.hidden_states(x, stats=stats)
    assert not stats.balance_losses and len(stats.counts) == len(main)  # no grad: counts only
    with torch.no_grad():
        evaluated = Objective(model).eval()(x, x)["expert_counts"]  # eval: MTP does not run, counts zero
    assert torch.equal(evaluated[main], counts[main])
    assert all(evaluated[i].sum() == 0 for i in range(len(moes)) if i not in main)


def test_mtp_uses_the_next_tokens():
    model = build_model(get_preset("debug"), seed=0).eval()
    x = torch.randint(0, 512, (1, 10))
    y = x.clone()
    y[0, 6] = (x[0, 6] + 1) % 512
    with torch.no_grad():
        a = model.mtp_logits(model.hidden_states(x), x)[0]
        b = model.mtp_logits(model.hidden_states(y), y)[0]
    assert a.shape == (1, 9, 512)
    # row i of depth 1 sees tokens <= i+1: rows 0..4 unchanged, row 5 changed (it embeds token 6)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-6)
    assert not torch.allclose(a[0, 5], b[0, 5])


def test_training_flops_include_attention():
    cfg = get_preset("cpu-tiny")
    f1, f2 = training_flops_per_token(cfg, 128), training_flops_per_token(cfg, 256)
    assert f2 > f1 > 6 * (count_params(cfg).activated - count_params(cfg).components["embedding"])
