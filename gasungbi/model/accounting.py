"""Parameter and FLOP accounting computed from a :class:`ModelConfig` alone (no weights needed).

``tests/test_model.py`` checks these formulas against the parameters of built models, including the
671B preset on the meta device. The planner (``gasungbi.plan``) and the trainer's cost meter use
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gasungbi.config import ModelConfig


@dataclass
class ParamCount:
    """Parameters by component. ``activated`` counts what one token touches: routed experts x K/E."""

    components: dict[str, int] = field(default_factory=dict)
    mtp: dict[str, int] = field(default_factory=dict)
    routed_fraction: float = 1.0  # K_r / N_r

    @property
    def total(self) -> int:
        """Main model (without MTP), as DeepSeek reports "671B"."""
        return sum(self.components.values())

    @property
    def activated(self) -> int:
        c = self.components
        return self.total - c.get("routed_experts", 0) + round(c.get("routed_experts", 0) * self.routed_fraction)

    @property
    def mtp_total(self) -> int:
        return sum(self.mtp.values())

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp_total


def _attention_params(cfg: ModelConfig) -> int:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    bias = cfg.attention_bias
    if cfg.is_mla:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            q = d * cfg.q_lora_rank + (cfg.q_lora_rank if bias else 0) + cfg.q_lora_rank + cfg.q_lora_rank * h * qk
        else:
            q = d * h * qk
        kv_a = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) if bias else 0)
        kv = kv_a + cfg.kv_lora_rank + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        o = h * cfg.v_head_dim * d + (d if bias else 0)
        indexer = 0
        if cfg.has_indexer:  # wq_b, wk, k_norm (LayerNorm: weight and bias), weights_proj
            n, di = cfg.index_n_heads, cfg.index_head_dim
            indexer = n * di * cfg.q_lora_rank + di * d + 2 * di + n * d
        return q + kv + o + indexer
    hd, kvh = cfg.gqa_head_dim, cfg.gqa_kv_heads
    biases = ((h + 2 * kvh) * hd if cfg.qkv_bias else 0) + (d if cfg.o_bias else 0)
    return d * hd * (2 * h + 2 * kvh) + biases + (2 * hd if cfg.qk_norm else 0)


def _block_params(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
    d = cfg.hidden_size
    out = {"attention": _attention_params(cfg), "norms": 2 * d}
    if cfg.is_moe_layer(layer_idx):
        out["shared_experts"] = 3 * d * cfg.moe_intermediate_size * cfg.n_shared_experts
        out["routed_experts"] = 3 * d * cfg.moe_intermediate_size * cfg.n_routed_experts
        out["router"] = cfg.n_routed_experts * d
    else:
        out["dense_ffn"] = 3 * d * cfg.intermediate_size
    return out


def count_params(cfg: ModelConfig) -> ParamCount:
    """Learnable parameters by component (buffers such as the routing bias are not counted)."""
    d, V = cfg.hidden_size, cfg.vocab_size
    comps: dict[str, int] = {"embedding": V * d}
    for i in range(cfg.num_hidden_layers):
        for k, v in _block_params(cfg, i).items():
            comps[k] = comps.get(k, 0) + v
    comps["norms"] += d  # final norm
    comps["output_head"] = 0 if cfg.tie_word_embeddings else V * d
    mtp: dict[str, int] = {}
    for k in range(cfg.num_nextn_predict_layers):
        for name, v in _block_params(cfg, cfg.num_hidden_layers + k).items():
            mtp[name] = mtp.get(name, 0) + v
        mtp["eh_proj"] = mtp.get("eh_proj", 0) + 2 * d * d
        mtp["norms"] += 3 * d  # enorm, hnorm, shared_head.norm
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    return ParamCount(comps, mtp, frac)


def kv_cache_width(cfg: ModelConfig) -> int:
    """Elements a decode cache keeps per token and layer: MLA's latent and shared RoPE key
    (kv_lora_rank + qk_rope_head_dim), plus V3.2's indexer key (index_head_dim); GQA's K and V
    (2 x kv_heads x head_dim). The one formula behind the cache the engine allocates and the KV
    bytes ``params`` and ``plan`` print."""
    if cfg.is_mla:
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if cfg.has_indexer else 0)
    return 2 * cfg.gqa_kv_heads * cfg.gqa_head_dim


def kv_cache_bytes_per_token(cfg: ModelConfig, elem_bytes: int = 2, include_mtp: bool = False) -> int:
    """Decode-cache bytes per token (see :func:`kv_cache_width`); ``include_mtp``: the MTP blocks' too."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    return kv_cache_width(cfg) * layers * elem_bytes


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of the score and value matmuls per token at context ``seq_len``.

    PaLM's convention (Appendix B): the full T x T product (no causal halving), 2 FLOPs per MAC.
    """
    h = cfg.num_attention_heads
    if cfg.is_mla:
        per_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    else:
        per_head = 2 * cfg.gqa_head_dim
    return 2 * cfg.num_hidden_layers * h * per_head * seq_len


def training_flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = True) -> int:
    """6 x activated non-embedding parameters + 3 x attention forward FLOPs (fwd + 2x bwd).

    The embedding lookup is not a matmul, so its parameters are excluded; the output head is
    included. MTP modules add their own block, projection and a second pass through the head.
    """
    pc = count_params(cfg)
    n = pc.activated - pc.components["embedding"]
    flops = 6 * n + 3 * attention_flops_per_token(cfg, seq_len)
    if include_mtp and cfg.num_nextn_predict_layers:
        mtp_active = pc.mtp_total - pc.mtp.get("routed_experts", 0) * (1 - pc.routed_fraction)
        head = cfg.vocab_size * cfg.hidden_size
        one = attention_flops_per_token(cfg, seq_len) // cfg.num_hidden_layers
        flops += int(6 * mtp_active) + cfg.num_nextn_predict_layers * (6 * head + 3 * one)
    return int(flops)


def format_params(cfg: ModelConfig) -> str:
    """A readable table of the accounting."""
    pc = count_params(cfg)

    def fmt(n: float) -> str:
        for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(n) >= div:
                return f"{n / div:,.2f}{unit}"
        return str(int(n))

    lines = [f"{'component':<16}{'total':>12}{'activated':>12}"]
    for k, v in pc.components.items():
        act = v * pc.routed_fraction if k == "routed_experts" else v
        lines.append(f"{k:<16}{fmt(v):>12}{fmt(act):>12}")
    lines.append(f"{'main model':<16}{fmt(pc.total):>12}{fmt(pc.activated):>12}")
    if pc.mtp:
        mtp_act = pc.mtp_total - pc.mtp.get("routed_experts", 0) * (1 - pc.routed_fraction)
        lines.append(f"{'MTP modules':<16}{fmt(pc.mtp_total):>12}{fmt(mtp_act):>12}"
                     "   (+ the shared embedding and head)")
    return "\n".join(lines)
