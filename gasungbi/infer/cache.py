"""Preallocated KV caches, written in place (as gpt-fast does) and read back as views.

For MLA the cache holds only what the absorbed attention needs per token and layer: the
compressed latent c^KV (kv_lora_rank) and the shared rotated key k^R (qk_rope_head_dim); for the
GQA baseline it holds K and V per KV head. MTP blocks get slots after the main layers.
"""

from __future__ import annotations

import torch

from gasungbi.config import ModelConfig


class KVCache:
    """Per-layer buffers of shape [batch, max_len, ...]; ``update`` writes positions
    ``start_pos .. start_pos+T-1`` and returns positions ``0 .. start_pos+T-1``."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds the model's context "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        self.cfg, self.max_len = cfg, max_len
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        if cfg.is_mla:
            shapes = [(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)]
        else:
            shapes = [(cfg.gqa_kv_heads, cfg.gqa_head_dim)] * 2
        self.a = [torch.zeros(batch_size, max_len, *shapes[0], device=device, dtype=dtype) for _ in range(n_layers)]
        self.b = [torch.zeros(batch_size, max_len, *shapes[1], device=device, dtype=dtype) for _ in range(n_layers)]

    def update(self, layer_idx: int, a: torch.Tensor, b: torch.Tensor, start_pos: int):
        end = start_pos + a.shape[1]
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache length {self.max_len}")
        self.a[layer_idx][:, start_pos:end] = a
        self.b[layer_idx][:, start_pos:end] = b
        return self.a[layer_idx][:, :end], self.b[layer_idx][:, :end]

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, include_mtp: bool = False) -> int:
        """Cache bytes per token: (kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes for MLA,
        2 x kv_heads x head_dim x layers x dtype bytes for GQA."""
        layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
        width = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) if cfg.is_mla else 2 * cfg.gqa_kv_heads * cfg.gqa_head_dim
        return width * layers * torch.finfo(dtype).bits // 8
