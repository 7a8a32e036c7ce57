"""Parity with transformers' DeepseekV3 / DeepseekV2 / DeepseekV32 / Llama / Qwen2 / Qwen3 on CPU in fp32.

transformers builds random tiny models, saves them; gasungbi loads them and must give the same
logits (max-abs 1e-4). Then gasungbi saves, transformers loads, same logits again.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gasungbi import load_model, save_model  # noqa: E402
from gasungbi.interop.hf import CheckpointError  # noqa: E402
from gasungbi.model.attention import DecodeContext  # noqa: E402
from conftest import v4_reference  # noqa: E402

TOL = 1e-4

BASE_DS = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=256,
               n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
               initializer_range=0.25)  # large weights: every layer moves the logits by O(1)

CASES = {
    "v3-qlora-groups": ("DeepseekV3", dict(BASE_DS, q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1,
                                           routed_scaling_factor=2.5)),
    "v3-no-qlora": ("DeepseekV3", dict(BASE_DS, q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0)),
    "v3-yarn": ("DeepseekV3", dict(BASE_DS, q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=2,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 64, "beta_fast": 32,
                                                    "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0})),
    "v3-no-interleave": ("DeepseekV3", dict(BASE_DS, q_lora_rank=24, n_group=2, topk_group=2, first_k_dense_replace=1,
                                            rope_interleave=False)),
    "v2-softmax-greedy": ("DeepseekV2", dict(BASE_DS, q_lora_rank=None, topk_method="greedy", n_shared_experts=2,
                                             first_k_dense_replace=1, routed_scaling_factor=1.0)),
    "v2-group-limited": ("DeepseekV2", dict(BASE_DS, q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                            topk_group=2, first_k_dense_replace=1, routed_scaling_factor=16.0,
                                            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                                             "original_max_position_embeddings": 128,
                                                             "mscale": 0.707, "mscale_all_dim": 0.707})),
    "llama-gqa": ("Llama", dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                initializer_range=0.25)),
    "llama-tied": ("Llama", dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                                 max_position_embeddings=256, initializer_range=0.25)),
    # DeepSeek Sparse Attention: each of 40 queries attends to its 8 best keys (16 indexer heads: no ties)
    "v32-indexer": ("DeepseekV32", dict(BASE_DS, q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=1,
                                        index_n_heads=16, index_head_dim=16, index_topk=8,
                                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                         "original_max_position_embeddings": 64, "beta_fast": 32,
                                                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # R1-Distill-Qwen's architecture: q/k/v biases; here also sliding-window layers (W=8 < 40 tokens), tied head
    "qwen2-sliding-tied": ("Qwen2", dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                         sliding_window=8, max_window_layers=1, tie_word_embeddings=True,
                                         max_position_embeddings=256, initializer_range=0.25)),
    # R1-0528-Qwen3-8B's architecture: per-head q/k norm; head_dim x heads != hidden; biases; YaRN
    "qwen3-qknorm-yarn": ("Qwen3", dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                                        max_position_embeddings=256, initializer_range=0.25,
                                        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                         "original_max_position_embeddings": 64})),
}


def _hf_model(family, kwargs):
    cfg = getattr(transformers, f"{family}Config")(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # make the bias matter for the choice
                buf.copy_(torch.randn_like(buf) * 0.3)
        for name, p in model.named_parameters():  # non-trivial norms and biases
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (2, 40), generator=g)


@pytest.mark.parametrize("case", list(CASES))
def test_load_transformers_checkpoint_and_round_trip(case, tokens, tmp_path):
    family, kwargs = CASES[case]
    hf = _hf_model(family, kwargs)
    hf.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        ref = hf(tokens).logits

    ours = load_model(tmp_path / "hf")
    with torch.no_grad():
        got = ours(tokens)
    assert got.shape == (2, 40, 97)
    assert (got - ref).abs().max().item() < TOL

    save_model(ours, tmp_path / "ours")
    back = getattr(transformers, f"{family}ForCausalLM").from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(tokens).logits
    assert (again - ref).abs().max().item() < TOL


def test_absorbed_mla_matches_transformers(tokens, tmp_path):
    family, kwargs = CASES["v3-qlora-groups"]
    hf = _hf_model(family, kwargs)
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = hf(tokens).logits
        got = load_model(tmp_path)(tokens, ctx=DecodeContext(absorb=True))
    assert (got - ref).abs().max().item() < TOL


def test_mtp_weights_round_trip_in_deepseek_layout(tmp_path):
    from gasungbi import build_model, get_preset
    model = build_model(get_preset("debug"), seed=0)
    save_model(model, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    L = model.config.num_hidden_layers
    for k in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
              "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.7.down_proj.weight"):
        assert f"model.layers.{L}.{k}" in keys
    loaded = load_model(tmp_path)
    x = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        h1, h2 = model.hidden_states(x), loaded.hidden_states(x)
        assert torch.equal(model(x), loaded(x))
        assert torch.equal(model.mtp_logits(h1, x)[0], loaded.mtp_logits(h2, x)[0])
    # transformers loads it unchanged (the MTP block is reported as unused, not an error)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() < TOL


def test_sharded_checkpoint(tmp_path):
    from gasungbi import build_model, get_preset
    model = build_model(get_preset("debug"), seed=0)
    save_model(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(x), model(x))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert (hf(x).logits - model(x)).abs().max().item() < TOL


def _saved(tmp_path):
    from gasungbi import build_model, get_preset
    save_model(build_model(get_preset("debug"), seed=0), tmp_path)
    return tmp_path


def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path / "model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    p = _saved(tmp_path)
    _rewrite(p, lambda sd: sd.pop("model.layers.0.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*model\.layers\.0\.self_attn\.kv_b_proj\.weight"):
        load_model(p)


def test_unexpected_and_misshapen_tensors_are_named(tmp_path):
    p = _saved(tmp_path)

    def edit(sd):
        sd["model.layers.0.self_attn.bogus.weight"] = torch.zeros(2)
        sd["model.norm.weight"] = torch.ones(3)
    _rewrite(p, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(p)
    assert "model.layers.0.self_attn.bogus.weight" in str(e.value)
    assert "model.norm.weight: checkpoint (3,) vs model (64,)" in str(e.value)


def test_unsupported_architecture_lists_supported(tmp_path):
    p = _saved(tmp_path)
    cfg = json.loads((p / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="DeepseekV3ForCausalLM.*DeepseekV2ForCausalLM.*LlamaForCausalLM"):
        load_model(p)


def test_pickle_checkpoint_is_refused(tmp_path):
    p = _saved(tmp_path)
    (p / "model.safetensors").unlink()
    (p / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(p)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_deepseek_v4_matches_transformers_in_every_layout(tokens, tmp_path):
    """transformers' save_pretrained (its mix of DeepSeek's and its own names), its in-memory names (fused
    experts) and our save (DeepSeek's release names, which transformers reloads): the same logits."""
    from safetensors.torch import save_file

    hf = v4_reference()
    with torch.no_grad():
        ref = hf(tokens, use_cache=False).logits
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    with torch.no_grad():
        assert (ours(tokens) - ref).abs().max().item() < TOL
    (tmp_path / "native").mkdir()
    (tmp_path / "native" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "native" / "model.safetensors"))
    with torch.no_grad():
        assert (load_model(tmp_path / "native")(tokens) - ref).abs().max().item() < TOL

    save_model(ours, tmp_path / "ours")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"embed.weight", "head.weight", "hc_head_fn", "layers.1.attn.indexer.compressor.ape",
            "layers.0.ffn.gate.tid2eid", "layers.2.ffn.gate.bias", "layers.3.ffn.experts.7.w3.weight"} <= keys
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(tokens, use_cache=False).logits - ref).abs().max().item() < TOL


def test_deepseek_v4_release_mtp_block_is_skipped(tmp_path):
    """DeepSeek's checkpoints hold an MTP block (``mtp.0.*``), which neither transformers nor gasungbi
    builds: it loads, and is gone."""
    from safetensors.torch import load_file, save_file

    hf = v4_reference()
    x = torch.randint(0, 97, (1, 12))
    save_model(load_model(_saved_v4(hf, tmp_path / "hf")), tmp_path / "ours")
    sd = load_file(str(tmp_path / "ours" / "model.safetensors"))
    sd.update({"mtp.0.e_proj.weight": torch.zeros(32, 32), "mtp.0.hc_head_fn": torch.zeros(4, 128),
               "mtp.0.ffn.experts.0.w1.weight": torch.zeros(16, 32)})
    save_file(sd, str(tmp_path / "ours" / "model.safetensors"))
    with torch.no_grad():
        assert (load_model(tmp_path / "ours")(x) - hf(x, use_cache=False).logits).abs().max().item() < TOL


def _saved_v4(hf, path):
    hf.save_pretrained(path)
    return path


def test_deepseek_v4_config_the_weights_do_not_hold_is_named(tmp_path):
    path = _saved_v4(v4_reference(), tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    for key, value, field in (("head_dim", 32, "head_dim"), ("n_routed_experts", 16, "n_routed_experts"),
                              ("num_hidden_layers", 5, "num_hidden_layers")):
        bad = dict(cfg, **{key: value})
        if key == "num_hidden_layers":
            bad.update(layer_types=cfg["layer_types"] + ["sliding_attention"], mlp_layer_types=cfg["mlp_layer_types"] + ["moe"])
        (path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=field):
            load_model(path)
