"""Preallocated KV caches, written in place (as gpt-fast does) by the decode engine.

For MLA the cache holds only what the absorbed attention needs per token and layer: the
compressed latent c^KV (kv_lora_rank) and the shared rotated key k^R (qk_rope_head_dim); for the
GQA baseline it holds K and V per KV head. MTP blocks get slots after the main layers.

DeepSeek-V4's cache does not grow by one entry per token: per layer and row it keeps the sliding
window's K (= V), the compressed entries (one per m positions) and the compressors' incomplete
windows (:func:`gasungbi.model.accounting.v4_cache_shapes`). Its buffers are indexed by position,
not by cache slot (``by_position``): the engine's views take whole rows, and moving the rows' slots
leaves them as they are.
"""

from __future__ import annotations

import torch

from gasungbi.config import ModelConfig
from gasungbi.model.accounting import kv_cache_bytes_per_token, v4_cache_shapes


class KVCache:
    """Per-layer buffers of shape [batch, max_len, ...]: ``layers[i]`` is (latent c^KV, rope key k^R)
    for MLA, plus the indexer's keys k^I for DeepSeek-V3.2, or (K, V) for GQA (``names`` says which);
    DeepSeek-V4: layer i's buffers named ``names[i]``, [batch, ...] by position (``by_position``).
    The decode engine writes and reads them through :class:`~gasungbi.infer.engine.CacheView`."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds the model's context "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        self.cfg, self.max_len, self.by_position = cfg, max_len, cfg.is_v4
        if cfg.is_v4:  # per layer its own buffers, by name (the model reads them as ``CacheView.state``)
            shapes = [v4_cache_shapes(cfg, i, max_len) for i in range(cfg.num_hidden_layers)]
            self.names = [tuple(s) for s in shapes]
            self.layers = [tuple(torch.zeros(batch_size, *shape, device=device, dtype=dtype) for shape in s.values())
                           for s in shapes]
            return
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        if cfg.is_mla:
            self.names, shapes = ("latent", "rope_key"), [(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)]
            if cfg.has_indexer:
                self.names, shapes = self.names + ("index_key",), shapes + [(cfg.index_head_dim,)]
        else:
            self.names, shapes = ("key", "value"), [(cfg.gqa_kv_heads, cfg.gqa_head_dim)] * 2
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            tuple(torch.zeros(batch_size, max_len, *shape, device=device, dtype=dtype) for shape in shapes)
            for _ in range(n_layers)]

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, include_mtp: bool = False,
                        context: int | None = None) -> float:
        """Cache bytes per token (:func:`gasungbi.model.accounting.kv_cache_width`); DeepSeek-V4's are
        amortized over a cache of ``context`` positions (default: the model's context)."""
        return kv_cache_bytes_per_token(cfg, torch.finfo(dtype).bits // 8, include_mtp, context)
