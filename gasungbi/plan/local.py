"""Our engine's decode ceilings on a machine whose memory bandwidth and matmul FLOP/s were measured
(``gasungbi plan here``, and the backtest's decode row of a ``gasungbi generate --report``)."""

from __future__ import annotations

from gasungbi.config import ModelConfig
from gasungbi.model.accounting import attention_flops_per_token, count_params
from gasungbi.plan.counts import kv_bytes_per_token, quant_bits


def local_decode(cfg: ModelConfig, bandwidth: float, flops: float, quant: str, context: int = 512) -> dict[str, float]:
    """Decode ceilings of our engine on a machine with ``bandwidth`` bytes/s and ``flops`` FLOP/s
    (measured): memory-bound (bytes read per token, KV in fp32) and compute-bound (2 x activated
    non-embedding parameters + attention forward per token); the prediction is the lower."""
    bits = quant_bits(quant)
    pc = count_params(cfg)
    emb = pc.components["embedding"]
    bytes_per_token = (pc.activated - emb) * bits / 8 + cfg.hidden_size * bits / 8 \
        + context * kv_bytes_per_token(cfg, elem_bytes=4)
    flops_per_token = 2 * (pc.activated - emb) + attention_flops_per_token(cfg, context)
    mem_tps, compute_tps = bandwidth / bytes_per_token, flops / flops_per_token
    return {"quant": quant, "bits_per_weight": bits, "bytes_per_token": bytes_per_token,
            "flops_per_token": flops_per_token, "memory_bound_tokens_per_s": mem_tps,
            "compute_bound_tokens_per_s": compute_tps, "predicted_tokens_per_s": min(mem_tps, compute_tps)}
