"""Model architecture configuration, named presets, and the Hugging Face ``config.json`` mapping.

One dataclass, :class:`ModelConfig`, describes every model gasungbi builds: DeepSeek-V3 (MLA +
DeepSeekMoE with sigmoid routing and auxiliary-loss-free bias + MTP), DeepSeek-V2 (MLA + softmax
routing), DeepSeek-V3.2 (MLA + a lightning indexer), DeepSeek-V4 (compressed sparse attention,
hyper-connections, hash routing: its fields are one delimited block), and dense GQA transformers:
the Llama-style baseline, and Qwen2 / Qwen3, the architectures of DeepSeek's R1 distills. Fields are grouped as in the
DeepSeek reference ``ModelArgs`` and named as in the Hugging Face configs, so that
:func:`to_hf_config` / :func:`from_hf_config` are mostly a renaming.

Presets (named configurations, the published ones among them) are in :mod:`gasungbi.presets`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from gasungbi import config_v4

ARCHITECTURES = {
    # model_type -> Hugging Face architecture class name
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",  # V3 + DeepSeek Sparse Attention's lightning indexer
    "deepseek_v4": "DeepseekV4ForCausalLM",  # compressed sparse attention, hyper-connections, hash routing
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",  # the R1-Distill-Qwen releases
    "qwen3": "Qwen3ForCausalLM",  # DeepSeek-R1-0528-Qwen3-8B
}
GQA_TYPES = ("llama", "qwen2", "qwen3")
"""Dense GQA transformers: Llama, and Qwen2/Qwen3 (Llama plus Q/K/V biases, per-head Q/K RMSNorm)."""
V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
"""DeepSeek-V4's attention kinds: a sliding window alone, or beside compressed entries (CSA, HCA)."""


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer in the DeepSeek family (or the Llama baseline).

    Sizes follow the Hugging Face field names. Paper references: DeepSeek-V2 (arXiv:2405.04434)
    for MLA (Sec. 2.1) and DeepSeekMoE (Sec. 2.2); DeepSeek-V3 (arXiv:2412.19437) for sigmoid
    routing with auxiliary-loss-free balancing (Sec. 2.1.2) and multi-token prediction (Sec. 2.2).
    """

    # --- family -------------------------------------------------------------------------------
    model_type: str = "deepseek_v3"
    """``deepseek_v3``, ``deepseek_v2``, ``deepseek_v32``, ``deepseek_v4``, ``llama``, ``qwen2`` or ``qwen3``:
    selects attention (MLA, V4's or GQA), router and the small differences between the GQA families."""

    # --- trunk --------------------------------------------------------------------------------
    vocab_size: int = 512
    """Number of token ids (rows of the embedding and of the output head)."""
    hidden_size: int = 64
    """Width d of the residual stream."""
    num_hidden_layers: int = 2
    """Number of transformer blocks in the main model (MTP blocks are extra)."""
    intermediate_size: int = 128
    """Hidden width of the dense SwiGLU FFN (dense layers and the Llama baseline)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    max_position_embeddings: int = 1024
    """Longest context the model is meant for (with YaRN: the extended length)."""
    tie_word_embeddings: bool = False
    """Share the output head with the input embedding (off in DeepSeek, common in small Llamas)."""
    initializer_range: float = 0.02
    """Std of the normal init of every matrix. DeepSeek-V3 used 0.006 (V3 report, Sec. 4.2)."""
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None

    # --- attention: shared --------------------------------------------------------------------
    num_attention_heads: int = 4
    """Number of query heads n_h."""
    attention_bias: bool = False
    """Bias on the attention input/output projections (``q_a``, ``kv_a``, ``o``; Llama and Qwen3 q/k/v/o;
    Qwen2 always has q/k/v biases and no o bias, whatever this says)."""

    # --- attention: MLA (DeepSeek-V2 Sec. 2.1) ------------------------------------------------
    q_lora_rank: int | None = 32
    """Rank d_c' of the low-rank query compression; ``None`` = full-rank ``q_proj`` (V2-Lite)."""
    kv_lora_rank: int = 32
    """Rank d_c of the joint KV latent c^KV: the only per-token K/V state an MLA cache keeps."""
    qk_nope_head_dim: int = 16
    """Per-head query/key width d_h that carries no position (decompressed from the latent)."""
    qk_rope_head_dim: int = 16
    """Width d_h^R of the decoupled RoPE query per head and of the one RoPE key shared by all heads."""
    v_head_dim: int = 16
    """Per-head value width."""

    # --- attention: DeepSeek Sparse Attention (V3.2 Sec. 2.1) ----------------------------------
    index_n_heads: int = 0
    """The lightning indexer's query heads H^I (V3.2: 64); 0 for models without one."""
    index_head_dim: int = 0
    """The indexer's query/key width d^I (V3.2: 128)."""
    index_topk: int = 0
    """Keys each query attends to, chosen by the indexer (V3.2: 2048)."""

    # --- attention: GQA (Llama baseline) ------------------------------------------------------
    num_key_value_heads: int | None = None
    """Llama: number of K/V heads (GQA); ``None`` = MHA. Ignored by MLA."""
    head_dim: int | None = None
    """GQA and V4: per-head width (V4: of its one K=V head too); ``None`` = hidden_size // num_attention_heads
    (GQA only). Ignored by MLA."""
    sliding_window: int | None = None
    """Qwen2 and V4: the keys a sliding-window layer attends to (its own and the W-1 before it); ``None``: none."""
    layer_types: list | None = None
    """Per layer ``full_attention`` or ``sliding_attention`` (with ``sliding_window``); ``None``: all full.
    DeepSeek-V4: ``sliding_attention``, ``compressed_sparse_attention`` or ``heavily_compressed_attention``
    (``None``: all sliding)."""

    # --- RoPE / YaRN --------------------------------------------------------------------------
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_interleave: bool = True
    """Rotate interleaved pairs (x0,x1),(x2,x3).. as DeepSeek's reference; False = halves (Llama)."""
    rope_scaling: dict[str, Any] | None = None
    """``None`` or YaRN: ``{"type": "yarn", "factor", "original_max_position_embeddings",
    "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}`` (YaRN arXiv:2309.00071; the
    DeepSeek-V2 Sec. 4.1 / Appendix mscale convention)."""

    # --- MoE (DeepSeekMoE: DeepSeek-V2 Sec. 2.2, DeepSeek-V3 Sec. 2.1.2) -----------------------
    n_routed_experts: int = 8
    """Number of fine-grained routed experts N_r per MoE layer; 0 = every layer is dense."""
    n_shared_experts: int = 1
    """Number of always-on shared experts N_s (fused as one SwiGLU of width N_s x moe_intermediate)."""
    moe_intermediate_size: int = 32
    """Hidden width of each routed (and each shared) expert."""
    num_experts_per_tok: int = 2
    """Routed experts chosen per token K_r."""
    first_k_dense_replace: int = 1
    """The first k layers use the dense FFN instead of MoE."""
    scoring_func: str = "sigmoid"
    """Token-to-expert affinity: ``sigmoid`` (V3), ``softmax`` (V2) or ``sqrtsoftplus`` (V4: sqrt(softplus(u.e)))."""
    topk_method: str = "noaux_tc"
    """``noaux_tc`` (V3: choose by score + correction bias, group score = sum of top-2),
    ``group_limited_greedy`` (V2: group score = max) or ``greedy`` (no groups)."""
    n_group: int = 1
    """Expert groups for group-limited routing (V3: 8; nodes in DeepSeek's deployment)."""
    topk_group: int = 1
    """Groups a token may route to (V3: 4)."""
    norm_topk_prob: bool = True
    """Renormalize the chosen K_r gate weights to sum to 1 (V3: yes; V2: no)."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routed experts' weights (V3: 2.5; V2: 16)."""

    # --- MTP (DeepSeek-V3 Sec. 2.2) -----------------------------------------------------------
    num_nextn_predict_layers: int = 0
    """Depth D of multi-token prediction: sequential modules predicting tokens t+2..t+1+D. DeepSeek-V4's
    checkpoints hold one, which gasungbi (as transformers) does not build: the field is kept for config.json."""

    # --- DeepSeek-V4 (DeepSeek-V4 report Sec. 2) ----------------------------------------------
    # Beside these, V4 reads: head_dim (its single K=V head), qk_rope_head_dim (the rotated trailing
    # channels of each head), q_lora_rank, sliding_window (every layer), layer_types, index_* (the CSA
    # indexer), the MoE fields (no dense layers, no groups, one shared expert), rope_theta (the
    # sliding-only layers' RoPE) and rope_scaling (YaRN of the compressed layers' RoPE only).
    compress_rate_csa: int = 4
    """m: tokens per compressed entry of a compressed sparse attention layer (overlapping windows of 2m)."""
    compress_rate_hca: int = 128
    """m': tokens per compressed entry of a heavily compressed attention layer."""
    compress_rope_theta: float = 160000.0
    """RoPE base of the CSA/HCA layers, their compressors and the indexer."""
    o_groups: int = 2
    """g: head groups of the grouped output projection (each group projected to ``o_lora_rank``)."""
    o_lora_rank: int = 32
    """Per-group width of the grouped output projection."""
    hc_mult: int = 4
    """n_hc: residual streams of the manifold-constrained hyper-connections."""
    hc_sinkhorn_iters: int = 20
    """Sinkhorn-Knopp iterations projecting the stream-mixing matrix toward doubly stochastic."""
    hc_eps: float = 1e-6
    """Floor added in the hyper-connections' weights and Sinkhorn normalizations."""
    num_hash_layers: int = 0
    """The first MoE layers route each token by a fixed token-id -> experts table (``tid2eid``)."""
    swiglu_limit: float | None = None
    """SwiGLU clamp of the experts (routed and shared): gate <= limit, |up| <= limit; ``None``: none."""

    # --- derived --------------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.model_type in ("deepseek_v3", "deepseek_v2", "deepseek_v32")

    @property
    def has_indexer(self) -> bool:
        """DeepSeek-V3.2's sparse attention: a lightning indexer chooses each query's keys."""
        return self.model_type == "deepseek_v32"

    @property
    def is_v4(self) -> bool:
        """DeepSeek-V4: its own attention (K=V head, compressed entries), hyper-connections, hash routing."""
        return self.model_type == "deepseek_v4"

    @property
    def v4_layer_types(self) -> list[str]:
        """DeepSeek-V4's attention kind of every layer (``layer_types``, all sliding when unset)."""
        return list(self.layer_types or ["sliding_attention"] * self.num_hidden_layers)

    def compress_rate(self, layer_idx: int) -> int:
        """DeepSeek-V4: tokens per compressed entry of layer ``layer_idx``; 0 for a sliding-only layer."""
        kind = self.v4_layer_types[layer_idx]
        return {"compressed_sparse_attention": self.compress_rate_csa,
                "heavily_compressed_attention": self.compress_rate_hca}.get(kind, 0)

    @property
    def qkv_bias(self) -> bool:
        """Biases on a GQA layer's q/k/v projections (always in Qwen2)."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        """A bias on a GQA layer's output projection (never in Qwen2)."""
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """Qwen3's per-head RMSNorm of queries and keys before RoPE."""
        return self.model_type == "qwen3"

    def window(self, layer_idx: int) -> int | None:
        """The sliding window of block ``layer_idx``, or None where it attends to the whole context."""
        types = self.layer_types or []
        sliding = layer_idx < len(types) and types[layer_idx] == "sliding_attention"
        return self.sliding_window if sliding or self.is_v4 else None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def gqa_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` (MTP blocks continue the numbering) uses DeepSeekMoE."""
        return (self.is_mla or self.is_v4) and self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""

        def bad(msg: str) -> None:
            raise ValueError(f"invalid model config: {msg}")

        kinds = {"int": int, "float": (int, float), "bool": bool, "str": str, "None": type(None), "list": list}
        for f in dataclasses.fields(self):  # a config.json or --set value of the wrong type, named
            value = getattr(self, f.name)
            allowed = [kinds.get(t.strip(), dict) for t in f.type.split("|")]  # "dict[str, Any]" -> dict
            wrong_bool = isinstance(value, bool) and bool not in allowed  # isinstance(True, int) holds
            if wrong_bool or not any(isinstance(value, a) for a in allowed):
                bad(f"{f.name} must be {f.type.replace('dict[str, Any]', 'an object')}, got {value!r}")
        if self.model_type not in ARCHITECTURES:
            bad(f"model_type={self.model_type!r}; supported: {sorted(ARCHITECTURES)}")
        self._check_values(bad)
        if self.is_mla:
            if self.qk_rope_head_dim % 2:
                bad(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
            if self.has_indexer:
                for name in ("index_n_heads", "index_head_dim", "index_topk"):
                    if getattr(self, name) <= 0:
                        bad(f"{name} must be positive for deepseek_v32, got {getattr(self, name)}")
                if self.index_head_dim < self.qk_rope_head_dim:
                    bad(f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim={self.qk_rope_head_dim}")
                if not self.q_lora_rank:
                    bad("deepseek_v32 needs q_lora_rank (the indexer's queries come from the query latent)")
        elif self.is_v4:
            self._check_v4(bad)
        else:
            if self.hidden_size % self.num_attention_heads and self.head_dim is None:
                bad("hidden_size not divisible by num_attention_heads (set head_dim)")
            if self.num_attention_heads % self.gqa_kv_heads:
                bad(f"num_attention_heads={self.num_attention_heads} not divisible by num_key_value_heads={self.gqa_kv_heads}")
            if self.gqa_head_dim % 2:
                bad(f"head_dim must be even, got {self.gqa_head_dim}")
        if (self.is_mla or self.is_v4) and self.n_routed_experts:
            self._check_moe(bad)
        if self.layer_types is not None and not self.is_v4:
            if len(self.layer_types) != self.num_hidden_layers or \
                    not set(self.layer_types) <= {"full_attention", "sliding_attention"}:
                bad(f"layer_types must give full_attention or sliding_attention for each of the "
                    f"{self.num_hidden_layers} layers, got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) > 0:
                bad(f"sliding_window must be a positive number of tokens, got {self.sliding_window!r}")
        if self.rope_scaling is not None:
            self._check_rope_scaling(bad)

    def _check_moe(self, bad) -> None:
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            bad(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts={self.n_routed_experts}")
        scoring = ("sigmoid", "softmax", "sqrtsoftplus") if self.is_v4 else ("sigmoid", "softmax")
        if self.scoring_func not in scoring:
            bad(f"scoring_func={self.scoring_func!r}; supported: {', '.join(scoring)}")
        if self.topk_method not in ("noaux_tc", "group_limited_greedy", "greedy"):
            bad(f"topk_method={self.topk_method!r}; supported: noaux_tc, group_limited_greedy, greedy")
        if self.n_routed_experts % self.n_group:
            bad(f"n_routed_experts={self.n_routed_experts} not divisible by n_group={self.n_group}")
        if not 0 < self.topk_group <= self.n_group:
            bad(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_group * per_group < self.num_experts_per_tok:
            bad("topk_group x experts per group < num_experts_per_tok: not enough experts to choose from")

    def _check_v4(self, bad) -> None:
        """DeepSeek-V4's shapes and the parts of the MoE fields it fixes (as its reference and transformers)."""
        if self.head_dim is None or self.head_dim % 2:
            bad(f"head_dim must be an even number for deepseek_v4 (the K=V head's width), got {self.head_dim!r}")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            bad(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and <= head_dim={self.head_dim}")
        if self.num_key_value_heads not in (None, 1):
            bad(f"num_key_value_heads={self.num_key_value_heads}: deepseek_v4 has one K=V head")
        if not self.q_lora_rank:
            bad("deepseek_v4 needs q_lora_rank (its queries and the indexer's come from the query latent)")
        if self.attention_bias:
            bad("attention_bias must be false for deepseek_v4")
        if not (self.sliding_window or 0) > 0:
            bad(f"sliding_window must be a positive number of tokens for deepseek_v4, got {self.sliding_window!r}")
        if self.layer_types is not None and (len(self.layer_types) != self.num_hidden_layers
                                             or not set(self.layer_types) <= set(V4_LAYER_TYPES)):
            bad(f"layer_types must give one of {', '.join(V4_LAYER_TYPES)} for each of the "
                f"{self.num_hidden_layers} layers, got {self.layer_types!r}")
        for name in ("compress_rate_csa", "compress_rate_hca", "o_groups", "o_lora_rank", "hc_mult",
                     "hc_sinkhorn_iters", "n_routed_experts"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1 for deepseek_v4, got {getattr(self, name)}")
        if self.num_attention_heads % self.o_groups:
            bad(f"num_attention_heads={self.num_attention_heads} not divisible by o_groups={self.o_groups}")
        if "compressed_sparse_attention" in self.v4_layer_types:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                if getattr(self, name) <= 0:
                    bad(f"{name} must be positive for deepseek_v4's compressed sparse attention, got {getattr(self, name)}")
            if self.index_head_dim < self.qk_rope_head_dim:
                bad(f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim={self.qk_rope_head_dim}")
        fixed = {"n_shared_experts": 1, "first_k_dense_replace": 0, "norm_topk_prob": True, "n_group": 1,
                 "topk_group": 1, "topk_method": "noaux_tc", "tie_word_embeddings": False}
        for name, value in fixed.items():
            if getattr(self, name) != value:
                bad(f"{name}={getattr(self, name)!r}: deepseek_v4 has {name}={value!r}")
        if not 0 <= self.num_hash_layers <= self.num_hidden_layers:
            bad(f"num_hash_layers={self.num_hash_layers} must be in 0..num_hidden_layers={self.num_hidden_layers}")
        if self.swiglu_limit is None or not (math.isfinite(self.swiglu_limit) and self.swiglu_limit > 0):
            bad(f"swiglu_limit must be a positive number for deepseek_v4, got {self.swiglu_limit}")
        if int(self.head_dim * (self.qk_rope_head_dim / self.head_dim)) != self.qk_rope_head_dim:
            bad(f"qk_rope_head_dim={self.qk_rope_head_dim}: head_dim x {self.qk_rope_head_dim}/{self.head_dim} "
                "does not give it back (config.json stores the ratio)")
        for name in ("compress_rope_theta", "hc_eps"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (v == 0 and name == "compress_rope_theta"):
                bad(f"{name} must be a {'positive' if name == 'compress_rope_theta' else 'non-negative'} "
                    f"finite number, got {v}")

    POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size",
                "n_group", "topk_group", "q_lora_rank", "num_key_value_heads", "head_dim", "sliding_window")
    """Sizes that must be >= 1 (those that may be None are checked when set)."""
    NON_NEGATIVE = ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                    "first_k_dense_replace", "num_nextn_predict_layers", "index_n_heads", "index_head_dim",
                    "index_topk", "initializer_range")

    def _check_values(self, bad) -> None:
        """Signs, finite floats and token ids in the vocabulary: a config.json's 0 or NaN is refused
        here, naming the field, rather than met later as a division by zero or a silent wrong answer."""
        for name in self.POSITIVE:
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(f"{name} must be >= 1, got {v}")
        for name in self.NON_NEGATIVE:
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "initializer_range"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (v == 0 and name != "initializer_range"):
                bad(f"{name} must be a positive finite number, got {v}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                bad(f"{name}={v} is not a token id of the vocabulary (0..{self.vocab_size - 1})")

    def _check_rope_scaling(self, bad) -> None:
        s = self.rope_scaling
        kind = s.get("type", s.get("rope_type"))
        if kind != "yarn":
            bad(f"rope_scaling type {kind!r}; supported: yarn (or None)")
        for key in ("factor", "original_max_position_embeddings"):
            if key not in s:
                bad(f"rope_scaling needs {key!r}")
        for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                    "mscale_all_dim", "attention_factor"):
            v = s.get(key)
            if v is None and key not in ("factor", "original_max_position_embeddings"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(f"rope_scaling.{key} must be a positive number, got {v!r}")


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------

_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_MOE_FIELDS = ("n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok",
               "first_k_dense_replace", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
               "scoring_func", "topk_method")
_COMMON = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "rms_norm_eps",
           "max_position_embeddings", "tie_word_embeddings", "initializer_range", "bos_token_id",
           "eos_token_id", "pad_token_id", "num_attention_heads", "attention_bias")
_INDEX_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")
DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "auto")
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")  # the shape; no defaults


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict that transformers reads for ``cfg.model_type``."""
    d: dict[str, Any] = {"architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type}
    d.update({k: getattr(cfg, k) for k in _COMMON})
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta,
                **{k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")}}
    d["rope_parameters"] = rope
    if cfg.is_v4:
        d.pop("intermediate_size")  # transformers reads it as moe_intermediate_size
        d.update(config_v4.to_hf(cfg))
    elif cfg.is_mla:
        d.update({k: getattr(cfg, k) for k in _MLA_FIELDS + _MOE_FIELDS})
        d["num_key_value_heads"] = cfg.num_attention_heads
        if cfg.has_indexer:  # transformers' V3.2 always interleaves MLA's RoPE (no rope_interleave field)
            d.update({k: getattr(cfg, k) for k in _INDEX_FIELDS})
        else:
            d["rope_interleave"] = cfg.rope_interleave
        d["num_nextn_predict_layers"] = cfg.num_nextn_predict_layers
        if not cfg.n_routed_experts:  # a dense MLA model: every block (MTP included) dense
            d["first_k_dense_replace"] = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    else:
        d["num_key_value_heads"] = cfg.gqa_kv_heads
        d["head_dim"] = cfg.gqa_head_dim
        if cfg.model_type == "llama":
            d["mlp_bias"] = False
        else:  # qwen2 / qwen3
            layer_types = cfg.layer_types or ["full_attention"] * cfg.num_hidden_layers
            d.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                     layer_types=layer_types, max_window_layers=next(
                         (i for i, t in enumerate(layer_types) if t == "sliding_attention"), cfg.num_hidden_layers))
    d["hidden_act"] = "silu"
    return d


def _qwen_windows(d: dict[str, Any]) -> dict[str, Any]:
    """Qwen2/Qwen3's sliding windows as transformers reads them: ``layer_types`` when given, else
    the layers from ``max_window_layers`` on slide when ``use_sliding_window``; none without it."""
    if not d.get("use_sliding_window"):
        return {"sliding_window": None, "layer_types": None}
    n, first = d["num_hidden_layers"], d.get("max_window_layers", d["num_hidden_layers"])
    types = d.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return {"sliding_window": d.get("sliding_window"),
            "layer_types": list(types) if "sliding_attention" in types else None}


def from_hf_config(d: dict[str, Any]) -> ModelConfig:
    """Build a ``ModelConfig`` from a Hugging Face ``config.json`` dict.

    Raises ``ValueError`` naming the supported architectures for anything else, and for
    features gasungbi does not implement (non-SiLU activations, unknown RoPE scaling).
    """
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object of config fields, got {type(d).__name__} {str(d)[:40]}")
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        arch = d.get("architectures") or model_type
        raise ValueError(f"unsupported architecture {arch!r} (model_type={model_type!r}); "
                         f"supported: {', '.join(ARCHITECTURES.values())}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; only silu (SwiGLU) is implemented")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:  # a default here would only surface later as a shape mismatch with the weights
        raise ValueError(f"missing required field(s): {', '.join(missing)}")
    for k in ("rope_parameters", "rope_scaling"):
        if d.get(k) is not None and not isinstance(d[k], dict):
            raise ValueError(f"{k} must be an object (or null), got {d[k]!r}")
    for k in ("dtype", "torch_dtype"):  # the weights' dtype as transformers names it
        if d.get(k) is not None and d[k] not in DTYPES:
            raise ValueError(f"{k}={d[k]!r} is not a dtype gasungbi reads; one of {', '.join(DTYPES)}")
    kw: dict[str, Any] = {"model_type": model_type}
    for k in _COMMON:
        if k in d:
            kw[k] = d[k]
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]
    if model_type == "deepseek_v4":
        kw.update(config_v4.from_hf(d))
        return ModelConfig(**kw)
    rope = d.get("rope_parameters") or {}
    legacy = d.get("rope_scaling") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    kw["rope_theta"] = float(theta) if isinstance(theta, (int, float)) and not isinstance(theta, bool) else theta
    scaling = {**legacy, **{k: v for k, v in rope.items() if k != "rope_theta"}}
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if kind == "yarn":
        kw["rope_scaling"] = {"type": "yarn", **scaling}
    elif kind != "default":
        raise ValueError(f"unsupported RoPE scaling {kind!r}; supported: default, yarn")
    if model_type in GQA_TYPES:
        kw["num_key_value_heads"] = d.get("num_key_value_heads")
        kw["head_dim"] = d.get("head_dim")
        kw["rope_interleave"] = False
        kw["n_routed_experts"] = 0
        if model_type != "llama":
            kw.update(_qwen_windows(d))
        return ModelConfig(**kw)
    for k in _MLA_FIELDS + _MOE_FIELDS + (_INDEX_FIELDS if model_type == "deepseek_v32" else ()):
        if k in d:
            kw[k] = d[k]
    kw["rope_interleave"] = bool(d.get("rope_interleave", True)) if model_type != "deepseek_v32" else True
    kw["num_nextn_predict_layers"] = int(d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0)
    if model_type in ("deepseek_v3", "deepseek_v32"):
        # transformers' DeepseekV3 always routes with sigmoid + correction bias (noaux_tc).
        kw.setdefault("scoring_func", "sigmoid")
        kw.setdefault("topk_method", "noaux_tc")
    else:
        kw.setdefault("scoring_func", "softmax")
        kw.setdefault("topk_method", "greedy")
        kw.setdefault("norm_topk_prob", False)
    for k in ("n_group", "topk_group"):  # null in some releases' config.json: no groups
        kw[k] = 1 if kw.get(k) is None else kw[k]
    if kw["topk_method"] == "greedy":
        kw["n_group"] = kw["topk_group"] = 1
    return ModelConfig(**kw)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensors at fault."""


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    from gasungbi.errors import run_dir_hint

    if hint := run_dir_hint(path):  # a run directory's config.json holds the run's settings, not a model's
        raise CheckpointError(hint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json (is it a Hugging Face model directory?)")
    try:
        d = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    try:
        return from_hf_config(d)
    except (ValueError, TypeError, AttributeError) as e:  # a field of the wrong type met before validation
        raise CheckpointError(f"{cfg_file}: {e}") from None
