"""Parameter and FLOP accounting computed from a :class:`ModelConfig` alone (no weights needed).

``tests/test_model.py`` checks these formulas against the parameters of built models, including the
671B preset on the meta device. The planner (``gasungbi.plan``) and the trainer's cost meter use
them.
"""

from __future__ import annotations

import math
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


def _v4_attention_params(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
    """DeepSeek-V4: q (low rank, normed), the K=V projection, the grouped output projection, the sinks;
    the compressor (2 x wider for CSA) with its position bias and norm, and CSA's indexer."""
    d, h, hd, rq = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    attn = d * rq + rq + rq * h * hd + d * hd + hd + h * hd * cfg.o_lora_rank + cfg.o_groups * cfg.o_lora_rank * d + h
    out = {"attention": attn}
    m = cfg.compress_rate(layer_idx)
    if m:
        k = 2 if cfg.v4_layer_types[layer_idx] == "compressed_sparse_attention" else 1
        out["compressors"] = 2 * d * k * hd + m * k * hd + hd
        if k == 2:
            n, di = cfg.index_n_heads, cfg.index_head_dim
            out["indexer"] = 2 * d * 2 * di + m * 2 * di + di + rq * n * di + d * n
    return out


def _block_params(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
    d = cfg.hidden_size
    if cfg.is_v4:
        N = cfg.hc_mult
        out = {**_v4_attention_params(cfg, layer_idx), "norms": 2 * d,
               "hyper_connections": 2 * ((2 + N) * N * N * d + (2 + N) * N + 3)}
    else:
        out = {"attention": _attention_params(cfg), "norms": 2 * d}
    if cfg.is_moe_layer(layer_idx):
        out["shared_experts"] = 3 * d * cfg.moe_intermediate_size * cfg.n_shared_experts
        out["routed_experts"] = 3 * d * cfg.moe_intermediate_size * cfg.n_routed_experts
        out["router"] = cfg.n_routed_experts * d
    else:
        out["dense_ffn"] = 3 * d * cfg.intermediate_size
    return out


def count_params(cfg: ModelConfig) -> ParamCount:
    """Learnable parameters by component (buffers such as the routing bias and V4's hash tables are not
    counted). DeepSeek-V4's MTP block is not counted: gasungbi builds none, as transformers."""
    d, V = cfg.hidden_size, cfg.vocab_size
    comps: dict[str, int] = {"embedding": V * d}
    for i in range(cfg.num_hidden_layers):
        for k, v in _block_params(cfg, i).items():
            comps[k] = comps.get(k, 0) + v
    comps["norms"] += d  # final norm
    if cfg.is_v4:  # the streams' head
        comps["hyper_connections"] += cfg.hc_mult * cfg.hc_mult * d + cfg.hc_mult + 1
    comps["output_head"] = 0 if cfg.tie_word_embeddings else V * d
    mtp: dict[str, int] = {}
    for k in range(0 if cfg.is_v4 else cfg.num_nextn_predict_layers):  # V4's MTP block is not built
        for name, v in _block_params(cfg, cfg.num_hidden_layers + k).items():
            mtp[name] = mtp.get(name, 0) + v
        mtp["eh_proj"] = mtp.get("eh_proj", 0) + 2 * d * d
        mtp["norms"] += 3 * d  # enorm, hnorm, shared_head.norm
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    return ParamCount(comps, mtp, frac)


def v4_cache_shapes(cfg: ModelConfig, layer_idx: int, max_len: int) -> dict[str, tuple[int, ...]]:
    """DeepSeek-V4: what a decode cache of ``max_len`` positions keeps per row for layer ``layer_idx``
    (name -> shape; :mod:`gasungbi.model.compressor` reads them): the sliding window's K (= V); for CSA
    and HCA layers one entry per window of m positions plus a spare row, the incomplete window's raw
    projections and gates (2 x wider for CSA), CSA's overlap half, and the indexer's own entries,
    window and overlap at its width."""
    hd, m = cfg.head_dim, cfg.compress_rate(layer_idx)
    shapes = {"window": (cfg.sliding_window, hd)}
    if m:
        entries = max_len // m + 1
        k = 2 if cfg.v4_layer_types[layer_idx] == "compressed_sparse_attention" else 1
        shapes.update(entries=(entries, hd), acc_kv=(m, k * hd), acc_gate=(m, k * hd))
        if k == 2:
            di = cfg.index_head_dim
            shapes.update(overlap_kv=(m, hd), overlap_gate=(m, hd), index_entries=(entries, di),
                          index_acc_kv=(m, 2 * di), index_acc_gate=(m, 2 * di), index_overlap_kv=(m, di),
                          index_overlap_gate=(m, di))
    return shapes


def kv_cache_width(cfg: ModelConfig, context: int | None = None) -> float:
    """Elements a decode cache keeps per token and layer: MLA's latent and shared RoPE key
    (kv_lora_rank + qk_rope_head_dim), plus V3.2's indexer key (index_head_dim); GQA's K and V
    (2 x kv_heads x head_dim); DeepSeek-V4's, which do not grow with each token, amortized over a
    cache of ``context`` positions (default the model's context; :func:`v4_cache_shapes`, averaged over
    the layers: the window's W x head_dim per row, about head_dim / m per token for the entries). The
    one formula behind the cache the engine allocates and the KV bytes ``params`` and ``plan`` print."""
    if cfg.is_v4:
        context = context or cfg.max_position_embeddings
        total = sum(math.prod(shape) for i in range(cfg.num_hidden_layers)
                    for shape in v4_cache_shapes(cfg, i, context).values())
        return total / (context * cfg.num_hidden_layers)
    if cfg.is_mla:
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if cfg.has_indexer else 0)
    return 2 * cfg.gqa_kv_heads * cfg.gqa_head_dim


def kv_cache_bytes_per_token(cfg: ModelConfig, elem_bytes: int = 2, include_mtp: bool = False,
                             context: int | None = None) -> float:
    """Decode-cache bytes per token (see :func:`kv_cache_width`; ``context``: DeepSeek-V4's amortization);
    ``include_mtp``: the MTP blocks' too (V4 builds none)."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp and not cfg.is_v4 else 0)
    return kv_cache_width(cfg, context) * layers * elem_bytes


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of the score and value matmuls per token at context ``seq_len``.

    PaLM's convention (Appendix B): the full T x T product (no causal halving), 2 FLOPs per MAC.
    """
    h = cfg.num_attention_heads
    if cfg.is_v4:  # keys per query: the window, and the visible (HCA) or chosen (CSA) entries; the indexer
        total = 0
        for i in range(cfg.num_hidden_layers):
            m = cfg.compress_rate(i)
            keys = min(cfg.sliding_window, seq_len) + (seq_len // m if m else 0)
            if cfg.v4_layer_types[i] == "compressed_sparse_attention":
                keys = min(cfg.sliding_window, seq_len) + min(cfg.index_topk, seq_len // m)
                total += cfg.index_n_heads * cfg.index_head_dim * (seq_len // m)
            total += h * 2 * cfg.head_dim * keys
        return 2 * total
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
