"""Named model configurations: tiny ones for tests and CPUs, and the published DeepSeek releases.

Presets are plain functions returning a :class:`~gasungbi.config.ModelConfig`; :data:`PRESETS` maps
their names (``gasungbi params NAME``, ``gasungbi train --model NAME``, ``gasungbi plan --model NAME``).
Published values are copied from the released config.json files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gasungbi.config import ModelConfig, read_config


# ---------------------------------------------------------------------------------------------

def _yarn(factor: float, original: int, mscale: float, mscale_all_dim: float) -> dict[str, Any]:
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


def debug() -> ModelConfig:
    """Under 1M parameters, every feature on (q-LoRA, groups, a dense layer, MTP): for tests."""
    return ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=3, intermediate_size=128,
                       num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                       qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                       moe_intermediate_size=32, num_experts_per_tok=2, n_group=2, topk_group=1,
                       first_k_dense_replace=1, routed_scaling_factor=1.0,
                       num_nextn_predict_layers=1, max_position_embeddings=256)


def cpu_tiny() -> ModelConfig:
    """~10M total / ~4M activated: an MoE+MLA model that trains on a 2-core CPU in minutes."""
    return ModelConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, intermediate_size=768,
                       num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
                       moe_intermediate_size=128, num_experts_per_tok=2, n_group=1, topk_group=1,
                       first_k_dense_replace=1, routed_scaling_factor=1.0,
                       num_nextn_predict_layers=1, max_position_embeddings=1024)


def small() -> ModelConfig:
    """148M total (133M without MTP) / 56M activated: a single-GPU research size."""
    return ModelConfig(vocab_size=32768, hidden_size=512, num_hidden_layers=8, intermediate_size=1536,
                       num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
                       qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, n_shared_experts=1,
                       moe_intermediate_size=256, num_experts_per_tok=4, n_group=4, topk_group=2,
                       first_k_dense_replace=1, routed_scaling_factor=2.5,
                       num_nextn_predict_layers=1, max_position_embeddings=2048)


def deepseek_v3_671b() -> ModelConfig:
    """DeepSeek-V3 / R1 (deepseek-ai/DeepSeek-V3 config.json): 671B total, 37B activated."""
    return ModelConfig(vocab_size=129280, hidden_size=7168, num_hidden_layers=61, intermediate_size=18432,
                       num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
                       moe_intermediate_size=2048, num_experts_per_tok=8, n_group=8, topk_group=4,
                       first_k_dense_replace=3, scoring_func="sigmoid", topk_method="noaux_tc",
                       norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                       max_position_embeddings=163840, rope_theta=10000.0, initializer_range=0.006,
                       rope_scaling=_yarn(40, 4096, 1.0, 1.0), bos_token_id=0, eos_token_id=1)


def deepseek_v3_2() -> ModelConfig:
    """DeepSeek-V3.2 (deepseek-ai/DeepSeek-V3.2 config.json): V3's shape plus DeepSeek Sparse
    Attention's lightning indexer (64 heads of 128, each query attends to 2,048 keys)."""
    return deepseek_v3_671b().replace(model_type="deepseek_v32", index_n_heads=64, index_head_dim=128,
                                      index_topk=2048)


def v32_tiny() -> ModelConfig:
    """``cpu-tiny`` with V3.2's sparse attention (each query attends to its 64 best keys)."""
    return cpu_tiny().replace(model_type="deepseek_v32", index_n_heads=4, index_head_dim=32, index_topk=64)


def _v4(hidden: int, layers: int, heads: int, q_lora: int, o_groups: int, moe_inter: int, experts: int,
        scale: float, topk: int, types: list[str]) -> ModelConfig:
    """DeepSeek-V4's shared values (both releases' config.json): one 512-wide K=V head with 64 rotated
    channels, a 128-token window, CSA at m=4 and HCA at m'=128, 6 routed experts + 1 shared with a
    SwiGLU clamp of 10, 3 hash-routed layers, 4 hyper-connection streams, 1M positions (YaRN 16 on
    the compressed layers' RoPE)."""
    return ModelConfig(model_type="deepseek_v4", vocab_size=129280, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=1, head_dim=512, q_lora_rank=q_lora,
                       qk_rope_head_dim=64, o_groups=o_groups, o_lora_rank=1024, intermediate_size=moe_inter,
                       moe_intermediate_size=moe_inter, n_routed_experts=experts, n_shared_experts=1,
                       num_experts_per_tok=6, first_k_dense_replace=0, n_group=1, topk_group=1,
                       scoring_func="sqrtsoftplus", topk_method="noaux_tc", norm_topk_prob=True,
                       routed_scaling_factor=scale, swiglu_limit=10.0, sliding_window=128, layer_types=types,
                       compress_rate_csa=4, compress_rate_hca=128, compress_rope_theta=160000.0,
                       num_hash_layers=3, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, index_n_heads=64,
                       index_head_dim=128, index_topk=topk, max_position_embeddings=1048576, rope_theta=10000.0,
                       rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                     "beta_fast": 32, "beta_slow": 1},
                       rms_norm_eps=1e-6, num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1)


def _csa_hca(first: list[str], layers: int) -> list[str]:
    """``first``, then CSA at even and HCA at odd layer indices (compress_ratios 4, 128, 4, ...)."""
    return first + ["compressed_sparse_attention" if i % 2 == 0 else "heavily_compressed_attention"
                    for i in range(len(first), layers)]


def deepseek_v4_flash() -> ModelConfig:
    """DeepSeek-V4-Flash (deepseek-ai/DeepSeek-V4-Flash config.json): 284B total, 13B activated; layers 0-1
    sliding window only, then CSA / HCA alternating."""
    return _v4(4096, 43, 64, 1024, 8, 2048, 256, 1.5, 512, _csa_hca(["sliding_attention"] * 2, 43))


def deepseek_v4_pro() -> ModelConfig:
    """DeepSeek-V4-Pro (deepseek-ai/DeepSeek-V4-Pro config.json): 1.6T total, 49B activated; layers 0-1
    HCA, then CSA / HCA alternating."""
    return _v4(7168, 61, 128, 1536, 16, 3072, 384, 2.5, 1024, _csa_hca(["heavily_compressed_attention"] * 2, 61))


def v4_tiny() -> ModelConfig:
    """A DeepSeek-V4 with every feature on that trains on a 2-core CPU: a sliding-only layer, two CSA
    layers (m=4, indexer top-8) and an HCA layer (m'=16), a 32-token window, a hash-routed first layer,
    4 hyper-connection streams, YaRN on the compressed layers."""
    return ModelConfig(model_type="deepseek_v4", vocab_size=4096, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=64,
                       qk_rope_head_dim=16, o_groups=2, o_lora_rank=32, intermediate_size=64,
                       moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                       first_k_dense_replace=0, n_group=1, topk_group=1, scoring_func="sqrtsoftplus",
                       topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5, swiglu_limit=10.0,
                       sliding_window=32, layer_types=["sliding_attention", "compressed_sparse_attention",
                                                       "heavily_compressed_attention", "compressed_sparse_attention"],
                       compress_rate_csa=4, compress_rate_hca=16, compress_rope_theta=160000.0, num_hash_layers=1,
                       hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, index_n_heads=4, index_head_dim=32,
                       index_topk=8, max_position_embeddings=1024, rope_theta=10000.0,
                       rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 256,
                                     "beta_fast": 32, "beta_slow": 1},
                       num_nextn_predict_layers=0)


def deepseek_v2_236b() -> ModelConfig:
    """DeepSeek-V2 (deepseek-ai/DeepSeek-V2 config.json): 236B total, 21B activated."""
    return ModelConfig(model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, num_hidden_layers=60,
                       intermediate_size=12288, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                       qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
                       n_shared_experts=2, moe_intermediate_size=1536, num_experts_per_tok=6, n_group=8,
                       topk_group=3, first_k_dense_replace=1, scoring_func="softmax",
                       topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=16.0,
                       max_position_embeddings=163840, initializer_range=0.02,
                       rope_scaling=_yarn(40, 4096, 0.707, 0.707), bos_token_id=100000, eos_token_id=100001)


def deepseek_v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite config.json): 15.7B total, 2.4B activated."""
    return ModelConfig(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, num_hidden_layers=27,
                       intermediate_size=10944, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
                       qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                       n_shared_experts=2, moe_intermediate_size=1408, num_experts_per_tok=6, n_group=1,
                       topk_group=1, first_k_dense_replace=1, scoring_func="softmax", topk_method="greedy",
                       norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=163840,
                       initializer_range=0.02, rope_scaling=_yarn(40, 4096, 0.707, 0.707),
                       bos_token_id=100000, eos_token_id=100001)


def llama_like(cfg: ModelConfig, intermediate_size: int | None = None) -> ModelConfig:
    """The dense Llama baseline matching ``cfg``'s vocabulary, width, depth and heads.

    The FFN width defaults to one that gives the same *activated* FFN parameters per layer as
    ``cfg``'s MoE layers (shared + K_r routed experts), so the two train at similar FLOPs per token.
    """
    if intermediate_size is None:
        intermediate_size = cfg.intermediate_size
        if cfg.n_routed_experts:
            intermediate_size = (cfg.n_shared_experts + cfg.num_experts_per_tok) * cfg.moe_intermediate_size
    return ModelConfig(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       num_hidden_layers=cfg.num_hidden_layers, intermediate_size=intermediate_size,
                       num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_attention_heads,
                       head_dim=cfg.hidden_size // cfg.num_attention_heads, rope_interleave=False, rope_theta=cfg.rope_theta,
                       max_position_embeddings=cfg.max_position_embeddings, n_routed_experts=0,
                       num_nextn_predict_layers=0, initializer_range=cfg.initializer_range,
                       bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)


def _r1_distill_qwen(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, theta: float,
                     eps: float) -> ModelConfig:
    return ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=hidden // heads, rope_interleave=False, rope_theta=theta, rms_norm_eps=eps,
                       max_position_embeddings=131072, n_routed_experts=0, num_nextn_predict_layers=0,
                       bos_token_id=151643, eos_token_id=151643)


def r1_distill_qwen_1_5b() -> ModelConfig:
    """DeepSeek-R1-Distill-Qwen-1.5B (Qwen2.5-Math-1.5B distilled from R1): 1.78B parameters."""
    return _r1_distill_qwen(1536, 8960, 28, 12, 2, 151936, 10000.0, 1e-6)


def r1_distill_qwen_7b() -> ModelConfig:
    """DeepSeek-R1-Distill-Qwen-7B (Qwen2.5-Math-7B distilled from R1): 7.6B parameters."""
    return _r1_distill_qwen(3584, 18944, 28, 28, 4, 152064, 10000.0, 1e-6)


def r1_distill_qwen_14b() -> ModelConfig:
    """DeepSeek-R1-Distill-Qwen-14B (Qwen2.5-14B distilled from R1): 14.8B parameters."""
    return _r1_distill_qwen(5120, 13824, 48, 40, 8, 152064, 1000000.0, 1e-5)


def r1_distill_qwen_32b() -> ModelConfig:
    """DeepSeek-R1-Distill-Qwen-32B (Qwen2.5-32B distilled from R1): 32.8B parameters."""
    return _r1_distill_qwen(5120, 27648, 64, 40, 8, 152064, 1000000.0, 1e-5)


def r1_0528_qwen3_8b() -> ModelConfig:
    """DeepSeek-R1-0528-Qwen3-8B (Qwen3-8B-Base distilled from R1-0528): 8.2B parameters. Its YaRN's
    ``attn_factor`` is ignored, as transformers ignores it (cos/sin scaled by 0.1 ln 4 + 1)."""
    return ModelConfig(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rope_interleave=False, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
                       max_position_embeddings=131072, n_routed_experts=0, num_nextn_predict_layers=0,
                       bos_token_id=151643, eos_token_id=151645)


PRESETS = {
    "debug": debug,
    "cpu-tiny": cpu_tiny,
    "small": small,
    "deepseek-v3-671b": deepseek_v3_671b,
    "deepseek-v3.2": deepseek_v3_2,
    "v32-tiny": v32_tiny,
    "deepseek-v4-flash": deepseek_v4_flash,
    "deepseek-v4-pro": deepseek_v4_pro,
    "v4-tiny": v4_tiny,
    "deepseek-v2-236b": deepseek_v2_236b,
    "deepseek-v2-lite": deepseek_v2_lite,
    "llama-debug": lambda: llama_like(debug()),
    "llama-cpu-tiny": lambda: llama_like(cpu_tiny()),
    "llama-small": lambda: llama_like(small()),
    "r1-distill-qwen-1.5b": r1_distill_qwen_1_5b,
    "r1-distill-qwen-7b": r1_distill_qwen_7b,
    "r1-distill-qwen-14b": r1_distill_qwen_14b,
    "r1-distill-qwen-32b": r1_distill_qwen_32b,
    "r1-0528-qwen3-8b": r1_0528_qwen3_8b,
}


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name``; a ``KeyError`` listing the valid names otherwise."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def resolve_model_config(spec: str) -> ModelConfig:
    """A preset name or a Hugging Face checkpoint directory -> ModelConfig."""
    from gasungbi.errors import UserError

    if spec in PRESETS:
        return get_preset(spec)
    if Path(spec).exists():
        return read_config(spec)
    raise UserError(f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}) nor an existing directory")
