"""What a model weighs: parameters, weight bytes per format, KV cache bytes and FLOPs per token.

All parameter and FLOP counts come from :mod:`gasungbi.model.accounting`; this module turns them
into bytes, and knows models given by their counts alone (:class:`CountModel`). Conventions:

* **Bits per weight** (``QUANT_BITS``): every parameter of the served model (main model, no MTP
  modules) is stored at the format's average bits per weight, norms and router included (they are
  under 0.1% of a large model). ``int8`` = 8 bits with per-channel scales (their bytes are
  negligible); ``q8_0`` = llama.cpp Q8_0, blocks of 32 int8 + one fp16 scale = 8.5 bpw;
  ``int4`` = 4-bit groups of 32 with one fp16 scale = 4 + 16/32 = 4.5 bpw (as llama.cpp Q4_0 and
  the group-wise int4 of GPTQ/AWQ with group 32); ``q4_k_m`` = llama.cpp's Q4_K_M mix (Q4_K at
  4.5 bpw, some tensors at Q6_K's 6.56) averaging about 4.85 bpw: 671B parameters at 4.85 bpw are
  407 GB, close to the published DeepSeek-R1 Q4_K_M files.
* **KV cache**: bf16 (2 bytes) per element unless stated. MLA stores (kv_lora_rank +
  qk_rope_head_dim) x layers per token (what ``gasungbi.infer.cache.KVCache`` allocates). The "MHA
  equivalent" of an MLA model caches full per-head keys (qk_nope + qk_rope = qk_head_dim wide) and
  values (v_head_dim wide): heads x (qk_head_dim + v_head_dim) x layers. (DeepSeek-V2 Table 1 uses
  2 x heads x d_h x layers with d_h = 128, i.e. without the RoPE part of the key.)
* **Training FLOPs per token**: ``training_flops_per_token`` (6 x activated non-embedding
  parameters + 3 x attention forward, PaLM Appendix B, full T x T, MTP included when present).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gasungbi.config import ModelConfig
from gasungbi.model.accounting import count_params, kv_cache_bytes_per_token, training_flops_per_token

QUANT_BITS: dict[str, float] = {
    "fp32": 32.0,   # our CPU engine's default
    "bf16": 16.0,
    "fp8": 8.0,     # DeepSeek's e4m3 with 128x128 block scales: +0.002 bpw, ignored
    "int8": 8.0,    # per-channel scales, ignored
    "q8_0": 8.5,    # llama.cpp Q8_0: 32 x int8 + fp16 scale
    "int4": 4.5,    # groups of 32 x int4 + fp16 scale
    "q4_k_m": 4.85, # llama.cpp Q4_K_M mix (Q4_K 4.5 bpw + some Q6_K 6.56 bpw)
}


def quant_bits(quant: str) -> float:
    """Bits per weight of ``quant``; ``ValueError`` listing the known formats otherwise."""
    try:
        return QUANT_BITS[quant.lower()]
    except KeyError:
        raise ValueError(f"unknown quantization {quant!r}; known: {', '.join(QUANT_BITS)}") from None


def parse_tokens(text: str) -> float:
    """``"14.8T"``, ``"500B"``, ``"2M"``, ``"10k"``, ``"1e9"`` or ``"1000"`` -> a token count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)(e[+-]?\d+)?\s*([kmgbt]?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot parse token count {text!r}; write a number with an optional "
                         "K/M/B/T suffix, e.g. 14.8T, 500B, 2M")
    value = float(m.group(1) + (m.group(2) or "")) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9,
                                                        "t": 1e12}[m.group(3)]
    if value <= 0:
        raise ValueError(f"token count must be positive, got {text!r}")
    return value


@dataclass
class CountModel:
    """A model known by its counts alone (``--params N --active N``, or a published run whose
    architecture has no config here).

    ``params`` are all stored weights; ``active`` the parameters one token's matmuls use (training
    FLOPs are 6 x active; the embedding's share is not subtracted unless the counts already leave it
    out). Attention FLOPs are counted only when ``layers`` and ``attention_width`` (heads x head
    width) are given, over ``attention_context`` tokens (the mean attended span: a sliding window's
    size; ``None`` = the sequence length): 3 x 2 x layers x 2 x width x context per token (PaLM
    Appendix B, the same convention as ``attention_flops_per_token``). The KV cache is
    ``kv_bytes_per_token`` (0 = not counted).
    """

    params: float
    active: float
    layers: int = 0
    attention_width: int = 0
    attention_context: int | None = None
    kv_bytes_per_token: int = 0

    def __post_init__(self) -> None:
        if not (self.params > 0 and 0 < self.active <= self.params):
            raise ValueError(f"need params > 0 and 0 < active <= params, got params={self.params:g}, "
                             f"active={self.active:g}")

    def attention_flops(self, context: int) -> float:
        """Forward attention FLOPs per token at ``context`` (capped by ``attention_context``)."""
        span = context if self.attention_context is None else min(context, self.attention_context)
        return 4 * self.layers * self.attention_width * span


Model = ModelConfig | CountModel


def flops_per_token(model: Model, seq_len: int) -> float:
    """Training FLOPs per token: ``training_flops_per_token`` for an architecture, else 6 x active
    + 3 x attention forward (see :class:`CountModel`)."""
    if isinstance(model, CountModel):
        return 6 * model.active + 3 * model.attention_flops(seq_len)
    return training_flops_per_token(model, seq_len)


def kv_bytes_per_token(cfg: ModelConfig, elem_bytes: int = 2, context: int | None = None) -> float:
    """KV cache bytes per token of the main model, as the decode engine allocates it: MLA caches the
    latent and the shared RoPE key (and V3.2 its indexer key), GQA caches K and V; DeepSeek-V4 its
    window and compressed entries, amortized over ``context`` positions (default the model's)
    (:func:`gasungbi.model.accounting.kv_cache_width`)."""
    return kv_cache_bytes_per_token(cfg, elem_bytes, context=context)


def mha_kv_bytes_per_token(cfg: ModelConfig, elem_bytes: int = 2) -> int:
    """KV bytes per token of a plain multi-head attention model of the same shape (see the module docstring)."""
    if cfg.is_mla:
        width = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        width = 2 * cfg.num_attention_heads * cfg.gqa_head_dim
    return width * cfg.num_hidden_layers * elem_bytes


def model_accounting(cfg: ModelConfig, seq_len: int = 4096) -> dict[str, Any]:
    """Parameters per component (total and activated), weight bytes per format, KV bytes per
    token (this model vs the MHA equivalent) and training FLOPs per token."""
    pc = count_params(cfg)
    comps = {k: {"total": v, "activated": round(v * pc.routed_fraction) if k == "routed_experts" else v}
             for k, v in pc.components.items()}
    return {
        "components": comps,
        "total": pc.total,
        "activated": pc.activated,
        "mtp_total": pc.mtp_total,
        "weight_bytes": {q: {"total": pc.total * b / 8, "activated": pc.activated * b / 8}
                         for q, b in QUANT_BITS.items()},
        "bits_per_weight": dict(QUANT_BITS),
        "kv_bytes_per_token_bf16": {"this_model": kv_bytes_per_token(cfg), "mha_equivalent": mha_kv_bytes_per_token(cfg)},
        "training_flops_per_token": training_flops_per_token(cfg, seq_len),
        "seq_len": seq_len,
    }


def is_moe(model: Model) -> bool:
    """A mixture-of-experts model: routed experts, or, known by its counts alone, fewer activated
    parameters than stored ones."""
    if isinstance(model, CountModel):
        return model.active < model.params
    return model.n_routed_experts > 0
