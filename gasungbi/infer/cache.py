"""Preallocated KV caches, written in place (as gpt-fast does) by the decode engine.

For MLA the cache holds only what the absorbed attention needs per token and layer: the
compressed latent c^KV (kv_lora_rank) and the shared rotated key k^R (qk_rope_head_dim); for the
GQA baseline it holds K and V per KV head. MTP blocks get slots after the main layers.
"""

from __future__ import annotations

import torch

from gasungbi.config import ModelConfig
from gasungbi.model.accounting import kv_cache_bytes_per_token


class KVCache:
    """Per-layer buffers of shape [batch, max_len, ...]: ``layers[i]`` is (latent c^KV, rope key k^R)
    for MLA, plus the indexer's keys k^I for DeepSeek-V3.2, or (K, V) for GQA (``names`` says which).
    The decode engine writes and reads them through :class:`~gasungbi.infer.engine.CacheView`."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds the model's context "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        self.cfg, self.max_len = cfg, max_len
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
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, include_mtp: bool = False) -> int:
        """Cache bytes per token (:func:`gasungbi.model.accounting.kv_cache_width`)."""
        return kv_cache_bytes_per_token(cfg, torch.finfo(dtype).bits // 8, include_mtp)
