"""Attention: RoPE with YaRN, Multi-head Latent Attention (MLA) with DeepSeek-V3.2's sparse
attention, and GQA (the Llama baseline, Qwen2, Qwen3).

MLA (DeepSeek-V2 Sec. 2.1). Per token t, with hidden h_t:
    c_t^KV = RMSNorm(W^DKV h_t)              the latent, kv_lora_rank wide           (eq. 9)
    k_t^R  = RoPE(W^KR h_t)                  one rope key shared by all heads         (eq. 15)
    k_t,i^C, v_t,i = W^UK_i c_t^KV, W^UV_i c_t^KV                                      (eq. 10-11)
    q_t,i = [q_t,i^C ; RoPE(q_t,i^R)], from c_t^Q = W^DQ h_t when q_lora_rank is set  (eq. 12-14)
Two computations of the same function:
  * naive: decompress k^C and v for every cached token (training, prefill);
  * absorbed: fold W^UK into the query and W^UV into the output (Sec. 2.1.2, "absorb"), so that
    attention runs against the latent c^KV and k^R only: this is what an MLA KV cache stores.

DeepSeek Sparse Attention (V3.2 Sec. 2.1). A lightning indexer scores every cached key s for each
query t with a few small heads j, and the query attends to the ``index_topk`` best only:
    I_t,s = sum_j w_t,j^I ReLU(q_t,j^I . k_s^I)          (V3.2 eq. 1)
with q^I from the query latent c^Q, one key k^I per token (LayerNorm of W^K h) and weights w^I
from h. MLA is otherwise V3's; the indexer's keys are cached beside the latent.

Training calls ``attn(x, cos, sin)``. Inference passes the state of its forward as one
:class:`DecodeContext`: a cache, when given, is any object with ``update(layer_idx, latent,
rope_key, start_pos) -> (latent_all, rope_key_all)`` for MLA, or the same with ``(k, v)`` for GQA
(the decode engine's ``gasungbi.infer.engine.CacheView``: ``start_pos`` is then the tokens' slots
[T], and the keys returned are a fixed window that the mask limits). Batches of prompts of
different lengths are left-padded: the model gets per-row positions (cos/sin [B, T, d/2]) and a
[B, 1, T, S] mask, both computed by the caller (the engine's ``step_mask``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gasungbi.config import ModelConfig
from gasungbi.model.layers import RMSNorm


# ---------------------------------------------------------------------------------------------
# RoPE / YaRN
# ---------------------------------------------------------------------------------------------

def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (arXiv:2309.00071 eq. 22)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for ``dim`` rotary channels and the factor that multiplies cos/sin.

    Without scaling: theta^(-2i/dim). With YaRN (arXiv:2309.00071 Sec. 3.2, the "NTK-by-parts"
    ramp between interpolated and original frequencies as in DeepSeek's reference and
    transformers): channels rotating more than ``beta_fast`` times over the original context
    keep their frequency, those under ``beta_slow`` are divided by ``factor``, a linear ramp in
    between. The cos/sin factor is mscale/mscale_all_dim (1 for the published DeepSeek configs);
    the softmax temperature is applied by the attention module.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not scaling:
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep original frequency (extrapolate), 0: interpolate
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(head_dim: int, scaling: dict | None) -> float:
    """1/sqrt(d) times YaRN's mscale^2 (mscale_all_dim) as DeepSeek applies it to MLA."""
    scale = head_dim ** -0.5
    if scaling and scaling.get("mscale_all_dim"):
        m = _yarn_mscale(float(scaling["factor"]), scaling["mscale_all_dim"])
        scale *= m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape [T, dim/2] for positions [T] (or [B, T, dim/2] for [B, T])."""

    def __init__(self, dim: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # (T, dim/2) or (B, T, dim/2)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x [B, T, H, d] (or [B, T, d]) by position.

    ``interleave``: pairs (x0,x1),(x2,x3).. as DeepSeek's reference (complex multiplication);
    otherwise the two halves (x_i, x_{i+d/2}) as Llama. Dot products q.k are what matter, and both
    layouts give the same ones as transformers' for the matching config.
    """
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).type_as(x)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def causal_mask(t: int, s: int, start_pos: int, device: torch.device) -> torch.Tensor:
    """Boolean [t, s] mask: query i (absolute position start_pos+i) sees keys 0..start_pos+i."""
    q = torch.arange(t, device=device)[:, None] + start_pos
    return torch.arange(s, device=device)[None, :] <= q


def window_mask(mask: torch.Tensor | None, t: int, s: int, start_pos: int | torch.Tensor, window: int,
                device: torch.device) -> torch.Tensor:
    """``mask`` (default causal) limited to a sliding window: the query at slot q sees slot j only
    when q - window < j. Slots advance with positions within a row, so this is the window over
    positions. ``start_pos``: the first query's slot, or every query's slot [T] (the engine's step)."""
    q = torch.arange(t, device=device) + start_pos if isinstance(start_pos, int) else start_pos  # (T,)
    keys = torch.arange(s, device=device)[None, :]
    inside = keys > q[:, None] - window  # (T, S)
    return (keys <= q[:, None]) & inside if mask is None else mask & inside


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q, k (B, H, T, d_qk) and v (B, H, T, d_v) -> (B, H, T, d_v).

    MLA's values are narrower than its queries and keys (d_v = v_head_dim, d_qk = nope + rope).
    The CPU's flash kernel takes only d_v == d_qk; otherwise torch runs its math kernel, which
    materializes the [T, T] scores forward and backward. On the CPU, v is therefore zero-padded to
    d_qk and the padding's output columns (zero) are dropped: the same attention, in the flash
    kernel's order of additions."""
    pad = q.shape[-1] - v.shape[-1]
    if q.device.type != "cpu" or pad <= 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)), is_causal=True, scale=scale)[..., :-pad]


@dataclass(frozen=True)
class DecodeContext:
    """The inference state of one forward; training passes none (no cache, causal, naive MLA).

    ``cache``: the object the attention writes its keys into and reads all cached ones from
    (``update``, see the module docstring); ``start_pos``: the cache slot of the first token, or
    the slots of all T tokens as a tensor [T] (the decode engine's fixed-shape step);
    ``absorb``: the absorbed MLA computation (V2 Sec. 2.1.2) instead of the naive one; ``mask``:
    boolean [B, 1, T, S] (True = attend), default causal; ``positions``: [B, T] token positions
    (left-padded rows: slot - padding), default the slots; ``valid``: [B, T] which tokens are real
    (not left padding), default all (DeepSeek-V4 reads it: its compressors must skip the padding).
    """

    cache: Any = None
    start_pos: int | torch.Tensor = 0
    absorb: bool = False
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    valid: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# MLA
# ---------------------------------------------------------------------------------------------

class MLA(nn.Module):
    """Multi-head Latent Attention with HF parameter names (``q_a_proj``, ``kv_a_proj_with_mqa``...)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.interleave = cfg.rope_interleave
        qk_dim = self.nope_dim + self.rope_dim
        d, h = cfg.hidden_size, self.n_heads
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, h * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=cfg.attention_bias)
        self.scale = softmax_scale(qk_dim, cfg.rope_scaling)
        self.indexer = Indexer(cfg, layer_idx) if cfg.has_indexer else None
        if self.indexer is not None:  # as transformers' V3.2: these two norms' epsilon is fixed
            self.kv_a_layernorm.eps = self.q_a_layernorm.eps = 1e-6

    def _query(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q^C, RoPE(q^R)) per head, and the query latent c^Q (the indexer's input)."""
        B, T, _ = x.shape
        c_q = self.q_a_layernorm(self.q_a_proj(x)) if self.q_lora_rank else None
        q = self.q_b_proj(c_q) if self.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)  # (B, T, H, dn), (B, T, H, dr)
        return q_nope, apply_rope(q_pe, cos, sin, self.interleave), c_q

    def latent(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """What an MLA cache stores per token: c^KV (B, T, r) and the rotated k^R (B, T, dr)."""
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(kv), apply_rope(k_pe, cos, sin, self.interleave)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                ctx: DecodeContext | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d); ``ctx``: cache, start slot, mask and computation when decoding."""
        ctx = ctx if ctx is not None else DecodeContext()
        start_pos, mask = ctx.start_pos, ctx.mask
        B, T, _ = x.shape
        q_nope, q_pe, c_q = self._query(x, cos, sin)
        kv, k_pe = self.latent(x, cos, sin)
        if ctx.cache is not None:
            kv, k_pe = ctx.cache.update(self.layer_idx, kv, k_pe, start_pos)  # (B, S, r), (B, S, dr)
        S = kv.shape[1]
        if self.indexer is not None:  # the keys each query attends to: the indexer's top-k
            if mask is None:
                mask = causal_mask(T, S, start_pos, x.device)[None, None]
            mask = self.indexer(x, c_q, cos, sin, ctx, mask)
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # (H, dn, r), (H, dv, r)
        if ctx.absorb:
            out = self._absorbed(q_nope, q_pe, kv, k_pe, w_uk, w_uv, start_pos, mask)
        else:
            kv_full = self.kv_b_proj(kv).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
            k_nope, v = kv_full.split([self.nope_dim, self.v_dim], dim=-1)
            k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)), dim=-1)
            q = torch.cat((q_nope, q_pe), dim=-1)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T|S, d)
            if mask is not None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            elif T == S:  # training; a forward without a cache
                out = causal_attention(q, k, v, self.scale)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, start_pos, x.device),
                                                     scale=self.scale)
            out = out.transpose(1, 2)  # (B, T, H, dv)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim))

    def _absorbed(self, q_nope, q_pe, kv, k_pe, w_uk, w_uv, start_pos: int, mask) -> torch.Tensor:
        """Attention against the latent cache (V2 Sec. 2.1.2): q_nope (B, T, H, dn), q_pe (B, T, H, dr),
        kv (B, S, r), k_pe (B, S, dr) -> (B, T, H, dv).

        All heads share one key/value sequence (the latent), so the heads are folded into the rows
        of one batched matmul per term: scores = [q^C W^UK] c^KV^T + q^R k^R^T, out = (P c^KV) W^UV^T.
        """
        B, T, H, _ = q_nope.shape
        S = kv.shape[1]
        q_lat = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk)  # (H, B*T, r)
        q_lat = q_lat.transpose(0, 1).reshape(B, T * H, -1)  # rows (t, h)
        scores = torch.baddbmm(torch.bmm(q_pe.reshape(B, T * H, -1), k_pe.transpose(1, 2)),
                               q_lat, kv.transpose(1, 2), beta=self.scale, alpha=self.scale)  # (B, T*H, S)
        if mask is not None:  # (B, 1, T, S) -> rows (t, h)
            scores = scores.view(B, T, H, S).masked_fill(~mask.transpose(1, 2), float("-inf")).view(B, T * H, S)
        elif T > 1:
            scores = scores.view(B, T, H, S).masked_fill(~causal_mask(T, S, start_pos, kv.device)[:, None],
                                                         float("-inf")).view(B, T * H, S)
        probs = scores.float().softmax(dim=-1).type_as(kv)
        o_lat = torch.bmm(probs, kv).view(B * T, H, -1).transpose(0, 1)  # (H, B*T, r)
        return torch.bmm(o_lat, w_uv.transpose(1, 2)).transpose(0, 1).view(B, T, H, -1)


class Indexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer (V3.2 Sec. 2.1, eq. 1), with transformers' names (``wq_b``,
    ``wk``, ``k_norm``, ``weights_proj``): it narrows a query's attention to the ``index_topk``
    cached keys it scores highest. Its RoPE rotates the first ``qk_rope_head_dim`` channels of its
    queries and keys in halves (MLA's are interleaved).

    Deviations from DeepSeek's reference, as transformers: no Hadamard rotation and no FP8 of the
    indexer's queries and keys (an orthogonal transform and a precision choice). Ties at the
    k-th score are broken as ``torch.topk`` breaks them. The language-model loss does not reach the
    indexer (its top-k is not differentiable); V3.2 trains it toward the attention's distribution
    with a KL loss (Sec. 2.1.1), which is not implemented: its weights stay as loaded or initialized."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.topk = layer_idx, cfg.index_topk
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.requires_grad_(False)

    def _rope(self, t: torch.Tensor, cos, sin) -> torch.Tensor:
        r = self.rope_dim
        return torch.cat((apply_rope(t[..., :r], cos, sin, interleave=False), t[..., r:]), dim=-1)

    def keys(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        """k^I (B, T, d^I): what the cache keeps per token beside MLA's latent."""
        return self._rope(self.k_norm(self.wk(x)), cos, sin)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, c_q: torch.Tensor, cos, sin, ctx: DecodeContext,
                mask: torch.Tensor) -> torch.Tensor:
        """``mask`` (B|1, 1, T, S) narrowed to each query's top-k keys among those it may see."""
        B, T, _ = x.shape
        q = self._rope(self.wq_b(c_q).view(B, T, self.n_heads, self.head_dim), cos, sin)  # (B, T, H^I, d^I)
        k = self.keys(x, cos, sin)
        if ctx.cache is not None:
            k = ctx.cache.update_indexer(self.layer_idx, k, ctx.start_pos)  # (B, S, d^I)
        scores = torch.relu(torch.einsum("bthd,bsd->bths", q.float(), k.float()) * self.head_dim ** -0.5)
        w = self.weights_proj(x).float() * self.n_heads ** -0.5  # (B, T, H^I)
        index = torch.einsum("bth,bths->bts", w, scores)  # I_t,s (eq. 1)
        index = index.masked_fill(~mask[:, 0], float("-inf"))
        top = index.topk(min(self.topk, index.shape[-1]), dim=-1).indices  # (B, T, k)
        chosen = torch.zeros_like(index, dtype=torch.bool).scatter_(-1, top, True)
        return mask & chosen[:, None]


# ---------------------------------------------------------------------------------------------
# GQA (Llama baseline)
# ---------------------------------------------------------------------------------------------

class GQA(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023) with RoPE, as in Llama and Qwen; HF parameter
    names. Qwen2 adds biases to q/k/v and may slide a window over the keys in some layers
    (``cfg.window``: key j is visible to query t when t - W < j <= t); Qwen3 normalizes each head's
    query and key (RMSNorm over the head's width) before RoPE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.gqa_kv_heads, cfg.gqa_head_dim
        self.interleave = cfg.rope_interleave
        self.window = cfg.window(layer_idx)
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                ctx: DecodeContext | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d); ``ctx.absorb`` has no meaning here (the cache holds K and V)."""
        ctx = ctx if ctx is not None else DecodeContext()
        start_pos, mask = ctx.start_pos, ctx.mask
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3: per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin, self.interleave), apply_rope(k, cos, sin, self.interleave)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v, start_pos)  # (B, S, n_kv, hd)
        S = k.shape[1]
        rep = self.n_heads // self.n_kv
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.window is not None:
            mask = window_mask(mask, T, S, start_pos, self.window, x.device)
        elif mask is None and T != S:
            mask = causal_mask(T, S, start_pos, x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
