"""DeepSeek-V4's ``config.json`` to and from :class:`~gasungbi.config.ModelConfig`'s fields, in both of
its dialects (``gasungbi.config`` dispatches here; this module imports nothing of gasungbi).

DeepSeek's release (read by its ``inference/`` code and llama.cpp's converter): ``compress_ratios``, one
per layer and one per MTP block (0: sliding window only, 4: compressed sparse attention, another rate:
heavily compressed attention), ``num_hash_layers``, ``qk_rope_head_dim`` and a top-level ``rope_scaling``
(the YaRN of the compressed layers). transformers' ``DeepseekV4Config``: ``layer_types``,
``compress_rates`` {kind: m}, ``mlp_layer_types`` (``hash_moe`` / ``moe``), ``partial_rotary_factor`` and
``rope_parameters`` {"main": ..., "compress": ...}; it folds DeepSeek's keys in as :func:`from_hf` does,
and fills absent keys with V4-Flash-like defaults, which :func:`from_hf` applies too. :func:`to_hf`
writes transformers' keys.
"""

from __future__ import annotations

from typing import Any

FIELDS = ("head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
          "swiglu_limit", "sliding_window", "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
          "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok", "routed_scaling_factor", "scoring_func",
          "num_nextn_predict_layers")
"""ModelConfig fields that keep their name and meaning in V4's config.json."""
DEFAULTS = {"head_dim": 512, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "hc_mult": 4,
            "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "swiglu_limit": 10.0, "sliding_window": 128, "index_n_heads": 64,
            "index_head_dim": 128, "index_topk": 512, "n_routed_experts": 256, "n_shared_experts": 1,
            "moe_intermediate_size": 2048, "num_experts_per_tok": 6, "routed_scaling_factor": 1.5,
            "scoring_func": "sqrtsoftplus", "num_nextn_predict_layers": 1}
"""transformers' ``DeepseekV4Config`` defaults for keys a config.json leaves out."""
CSA, HCA, SLIDING = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
_NOT_YARN = ("type", "rope_type", "rope_theta", "partial_rotary_factor")


def to_hf(cfg) -> dict[str, Any]:
    """transformers' keys for a deepseek_v4 ``cfg`` (besides the fields every config.json has)."""
    prf = cfg.qk_rope_head_dim / cfg.head_dim
    main = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": prf}
    compress = {"rope_type": "default", "rope_theta": cfg.compress_rope_theta, "partial_rotary_factor": prf}
    if cfg.rope_scaling:  # YaRN on the compressed layers only, cos/sin unscaled (attention_factor 1)
        compress.update({k: v for k, v in cfg.rope_scaling.items() if k not in _NOT_YARN}, rope_type="yarn")
        compress.setdefault("attention_factor", 1.0)
    n_hash = cfg.num_hash_layers
    d = {k: getattr(cfg, k) for k in FIELDS}
    d.update(num_key_value_heads=1, partial_rotary_factor=prf, qk_rope_head_dim=cfg.qk_rope_head_dim,
             rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta,
             rope_parameters={"main": main, "compress": compress}, layer_types=cfg.v4_layer_types,
             compress_rates={CSA: cfg.compress_rate_csa, HCA: cfg.compress_rate_hca},
             mlp_layer_types=["hash_moe"] * n_hash + ["moe"] * (cfg.num_hidden_layers - n_hash),
             norm_topk_prob=True, topk_method="noaux_tc")
    return d


def _layer_types(d: dict[str, Any], n: int) -> tuple[list[str], dict[str, int]]:
    """Each layer's attention kind and the two compression rates: transformers' ``layer_types`` and
    ``compress_rates`` (then its ``compress_rate_csa``/``_hca``), else DeepSeek's ``compress_ratios``,
    else transformers' default (two HCA layers, then HCA and CSA alternating)."""
    rates = {CSA: 4, HCA: 128}
    ratios = d.get("compress_ratios")
    if d.get("layer_types") is None and ratios is not None:
        if not isinstance(ratios, list) or len(ratios) < n or not all(isinstance(r, int) and r >= 0 for r in ratios):
            raise ValueError(f"compress_ratios must list a rate >= 0 for each of the {n} layers, got {ratios!r}")
        heavy = {r for r in ratios[:n] if r not in (0, 4)}
        if len(heavy) > 1:
            raise ValueError(f"compress_ratios holds several heavy compression rates {sorted(heavy)}; one is supported")
        rates[HCA] = heavy.pop() if heavy else rates[HCA]
        types = [SLIDING if r == 0 else CSA if r == 4 else HCA for r in ratios[:n]]
    else:
        types = d.get("layer_types") or ([HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))])
    given = d.get("compress_rates")
    if given is not None:
        if not isinstance(given, dict) or not set(given) <= {CSA, HCA}:
            raise ValueError(f"compress_rates must map {CSA} and {HCA} to rates, got {given!r}")
        rates.update(given)
    for kind, key in ((CSA, "compress_rate_csa"), (HCA, "compress_rate_hca")):
        if d.get(key) is not None:
            rates[kind] = d[key]
    return (list(types[:n]) if isinstance(types, list) else types), rates


def _hash_layers(d: dict[str, Any], n: int) -> int:
    """How many leading layers route by token id: ``mlp_layer_types``' leading ``hash_moe`` entries (they
    must be leading), else ``num_hash_layers``, else transformers' default of 3."""
    kinds = d.get("mlp_layer_types")
    if kinds is None:
        return min(n, d["num_hash_layers"] if d.get("num_hash_layers") is not None else 3)
    if not isinstance(kinds, list) or not set(kinds) <= {"hash_moe", "moe"}:
        raise ValueError(f"mlp_layer_types must list hash_moe or moe per layer, got {kinds!r}")
    lead = next((i for i, k in enumerate(kinds) if k != "hash_moe"), len(kinds))
    if "hash_moe" in kinds[lead:]:
        raise ValueError(f"mlp_layer_types: hash-routed layers must come first, got {kinds!r}")
    return min(lead, n)


def _rope(d: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """rope_theta, compress_rope_theta, rope_scaling and qk_rope_head_dim from either dialect."""
    params = d.get("rope_parameters") or {}
    nested = isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict)
    main, compress = (params["main"], params["compress"]) if nested else ({}, params)
    if main.get("rope_type", main.get("type", "default")) != "default":
        raise ValueError(f"rope_parameters.main: unsupported RoPE {main!r}; DeepSeek-V4's sliding layers use plain RoPE")
    if not nested and d.get("rope_scaling"):  # DeepSeek's top-level YaRN (transformers folds it the same way)
        compress = {**d["rope_scaling"], **compress}
    kind = compress.get("rope_type", compress.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ValueError(f"unsupported RoPE scaling {kind!r}; supported: default, yarn")
    scaling = None
    if kind == "yarn":
        scaling = {"type": "yarn", **{k: v for k, v in compress.items() if k not in _NOT_YARN}}
        if scaling.get("attention_factor") == 1.0:  # what DeepSeek-V4 uses anyway
            scaling.pop("attention_factor")
    prf = d.get("partial_rotary_factor", main.get("partial_rotary_factor", compress.get("partial_rotary_factor")))
    if isinstance(prf, (int, float)) and not isinstance(prf, bool):
        rope_dim = int(head_dim * prf)
    else:
        rope_dim = d.get("qk_rope_head_dim", head_dim // 8 if isinstance(head_dim, int) else 64)
    theta = main.get("rope_theta", d.get("rope_theta", 10000.0))
    ctheta = compress.get("rope_theta") if nested else None
    ctheta = ctheta if ctheta is not None else d.get("compress_rope_theta", 160000.0)
    as_float = [float(t) if isinstance(t, int) and not isinstance(t, bool) else t for t in (theta, ctheta)]
    return {"rope_theta": as_float[0], "compress_rope_theta": as_float[1], "rope_scaling": scaling,
            "qk_rope_head_dim": rope_dim}


def from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments of a deepseek_v4 config.json's own keys (either dialect).
    ``norm_topk_prob`` is read as true, as transformers does: V4 always renormalizes the chosen weights."""
    kw = {k: d.get(k) if d.get(k) is not None else DEFAULTS[k] for k in FIELDS}
    n = d["num_hidden_layers"]
    types, rates = _layer_types(d, n)
    kw.update(_rope(d, kw["head_dim"]), layer_types=types, compress_rate_csa=rates[CSA],
              compress_rate_hca=rates[HCA], num_hash_layers=_hash_layers(d, n),
              num_key_value_heads=d.get("num_key_value_heads", 1), intermediate_size=kw["moe_intermediate_size"],
              norm_topk_prob=True, topk_method=d.get("topk_method") or "noaux_tc", n_group=1, topk_group=1,
              first_k_dense_replace=0, rope_interleave=True)
    return kw
