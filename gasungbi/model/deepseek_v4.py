"""DeepSeek-V4: compressed attention with a sliding window, manifold-constrained hyper-connections and
hash-routed MoE (DeepSeek-V4 report; the Flash and Pro releases), with transformers' parameter names.

Attention (Sec. 2.3). One K=V head of width d_h per token, no latent:
    c^Q = RMSNorm(W^DQ h),   q_i = RoPE(q_i / rms(q_i)),  q_i = (W^UQ c^Q)_i      (q_b normed without weight)
    k = v = RoPE(RMSNorm(W^KV h))                            (RoPE on the trailing d_R channels only)
Each query attends to the keys of its own and the W-1 previous positions (the sliding window) and, in
CSA / HCA layers, to compressed entries (:mod:`gasungbi.model.compressor`): HCA to every visible one,
CSA to the ``index_topk`` its lightning indexer picks. A learned logit per head (the attention sink)
joins each softmax and takes probability that no value returns:
    p = softmax([q.k_s / sqrt(d_h)]_s ++ [sink_i]),   o_i = sum_s p_s v_s
Since V is the rotated K, o_i is rotated back (RoPE at the query's position with -sin). Grouped output
projection (Sec. 2.3.1): the H heads form g groups, each projected to ``o_lora_rank`` (W^Oa, block
diagonal), then all to d (W^Ob). Sliding-only layers rotate with base ``rope_theta``; CSA/HCA layers,
their compressors and indexer with ``compress_rope_theta`` and YaRN (``rope_scaling``; cos/sin unscaled,
softmax scale plain 1/sqrt(d_h)).

Hyper-connections (Sec. 2.2, mHC). The residual is N = ``hc_mult`` streams X [B, T, N, d] (the embedding
copied N times). Around each sublayer F, from the RMS-normed flattened streams:
    pre = sigmoid(a_pre W_pre x + b_pre) + eps,  post = 2 sigmoid(a_post W_post x + b_post),
    comb = Sinkhorn(softmax_rows(a_comb W_comb x + b_comb) + eps)         (near doubly stochastic)
    X <- post (x) F(sum_n pre_n X_n) + comb^T X
and before the final norm a head collapses the streams with its own ``pre``.

MoE (Sec. 2.1). Every layer is MoE: affinities sqrt(softplus(u . e_i)); the first ``num_hash_layers``
choose experts by a fixed token id -> experts table (``tid2eid``), the others by top-K of affinity +
correction bias; weights always renormalized, x ``routed_scaling_factor``; routed and shared experts
clamp their SwiGLU (``swiglu_limit``).

Deviations: MTP (one block in the releases) is not built, as in transformers (its weights are skipped
on load). Router logits are fp32 and the attention softmax fp32 (transformers: the model dtype), and a
bf16 model keeps its norms, sinks, position biases and hyper-connection weights in bf16 (transformers
keeps them fp32); in fp32 the two compute the same. The decode cache is the engine's
(:class:`~gasungbi.infer.cache.KVCache`), keyed by position: a row's windows start at its own position 0
whatever its left padding (transformers pools padding into its windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gasungbi.config import ModelConfig
from gasungbi.model.attention import DecodeContext, RotaryEmbedding, rope_frequencies
from gasungbi.model.compressor import Chunk, Compressor, Indexer, rope_tail, unit_rms
from gasungbi.model.layers import FP32RMSNorm, RMSNorm
from gasungbi.model.moe import Experts, MoE, Router, RoutingStats


@dataclass(frozen=True)
class Rope:
    """One forward's RoPE: (cos, sin) [n, T, d_R/2] at the tokens' positions with the main and the
    compressed layers' bases, and the latter's function of any positions (for the compressed entries)."""

    main: tuple[torch.Tensor, torch.Tensor]
    compress: tuple[torch.Tensor, torch.Tensor]
    at: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    """V4's attention of one layer (sliding window, + HCA or CSA entries): ``q_a_proj``, ``q_a_norm``,
    ``q_b_proj``, ``kv_proj``, ``kv_norm``, ``o_a_proj``, ``o_b_proj``, ``sinks``, ``compressor``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.rate = layer_idx, cfg.compress_rate(layer_idx)
        self.n_heads, self.head_dim, self.window, self.groups = (cfg.num_attention_heads, cfg.head_dim,
                                                                 cfg.sliding_window, cfg.o_groups)
        self.eps, self.scale = cfg.rms_norm_eps, cfg.head_dim ** -0.5
        d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
        self.q_a_norm = FP32RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * hd, bias=False)
        self.kv_proj = nn.Linear(d, hd, bias=False)
        self.kv_norm = FP32RMSNorm(hd, cfg.rms_norm_eps)
        self.o_a_proj = nn.Linear(h * hd // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)  # g blocks
        self.o_b_proj = nn.Linear(cfg.o_groups * cfg.o_lora_rank, d, bias=False)
        self.sinks = nn.Parameter(torch.zeros(h))
        self.compressor = None
        if self.rate:
            csa = cfg.v4_layer_types[layer_idx] == "compressed_sparse_attention"
            self.compressor = Compressor(cfg, hd, self.rate, overlap=csa)
            if csa:
                self.compressor.indexer = Indexer(cfg, self.rate)

    def forward(self, h: torch.Tensor, rope: Rope, chunk: Chunk, state: dict | None) -> torch.Tensor:
        """h [n, T, d] -> [n, T, d]; ``state``: this layer's decode cache (updated in place), or None."""
        n, T, _ = h.shape
        cos, sin = rope.compress if self.rate else rope.main
        c_q = self.q_a_norm(self.q_a_proj(h))  # (n, T, r_q)
        q = rope_tail(unit_rms(self.q_b_proj(c_q).view(n, T, self.n_heads, self.head_dim), self.eps), cos, sin)
        kv = rope_tail(self.kv_norm(self.kv_proj(h)), cos, sin)  # (n, T, hd): K = V
        keys, visible = self._window(kv, chunk, state)  # (n, S, hd), (n, T, S)
        scores = torch.einsum("bthd,bsd->bhts", q, keys) * self.scale
        parts, values = [scores.masked_fill(~visible[:, None], float("-inf"))], [keys]
        if self.compressor is not None:
            part, value = self._compressed(h, q, c_q, rope, chunk, state, cos, sin)
            parts.append(part)
            values.append(value)
        sink = self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(n, -1, T, 1)
        probs = torch.cat(parts + [sink], dim=-1).float().softmax(dim=-1).to(q.dtype)  # (n, H, T, S + E + 1)
        S = keys.shape[1]
        out = torch.einsum("bhts,bsd->bthd", probs[..., :S], keys)
        if self.compressor is not None:
            p_c = probs[..., S:-1]
            out = out + (torch.einsum("bhtk,btkd->bthd", p_c, values[1]) if values[1].dim() == 4
                         else torch.einsum("bhte,bed->bthd", p_c, values[1]))
        if state is not None:
            self._write_window(kv, chunk, state["window"])
        out = rope_tail(out, cos, -sin)  # (n, T, H, hd): V's rotation undone at the query's position
        grouped = out.reshape(n, T, self.groups, -1)  # group g: heads g H/g .. (g+1) H/g - 1
        w = self.o_a_proj.weight.view(self.groups, -1, grouped.shape[-1])  # (g, r_o, H hd / g)
        return self.o_b_proj(torch.einsum("btgi,gri->btgr", grouped, w).flatten(2))

    def _window(self, kv: torch.Tensor, chunk: Chunk, state: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The sliding window's keys [n, S, hd] (the state's W before these T, then these) and which each
        query sees [n, T, S]: position j from query t when t - W < j <= t."""
        pos, real = chunk.positions, chunk.valid
        if state is not None:
            ring = state["window"]  # (n, W, hd): position p at row p mod W
            r = torch.arange(ring.shape[1], device=kv.device)
            before = chunk.start[:, None] - 1
            held = before - (before - r) % ring.shape[1]  # (n, W) the position each row holds
            kv, pos, real = torch.cat((ring.to(kv.dtype), kv), 1), torch.cat((held, pos), 1), torch.cat((held >= 0, real), 1)
        t = chunk.positions[:, :, None]
        return kv, real[:, None, :] & (pos[:, None, :] <= t) & (pos[:, None, :] > t - self.window)

    def _write_window(self, kv: torch.Tensor, chunk: Chunk, ring: torch.Tensor) -> None:
        """Keep the last W positions of each row: row r gets the latest position p = r mod W of these T."""
        W, T = ring.shape[1], kv.shape[1]
        r = torch.arange(W, device=kv.device)
        latest = chunk.last[:, None] - (chunk.last[:, None] - r) % W  # (n, W)
        idx = (chunk.first[:, None] + latest - chunk.start[:, None]).clamp(0, T - 1)
        new = kv.gather(1, idx[..., None].expand(-1, -1, kv.shape[-1])).to(ring.dtype)
        ring.copy_(torch.where((latest >= chunk.start[:, None])[..., None], new, ring))

    def _compressed(self, h, q, c_q, rope: Rope, chunk: Chunk, state, cos, sin):
        """Scores [n, H, T, E'] of the compressed entries a query may read (masked -inf where not) and
        their values: all visible ones (HCA: [n, E, hd]) or the indexer's top-k (CSA: [n, T, k, hd])."""
        entries, window = self.compressor(h, chunk, rope.at, state)  # (n, E, hd), (n|1, E)
        indexer = getattr(self.compressor, "indexer", None)
        if indexer is None:
            visible = window[:, None, :] < ((chunk.positions + 1) // self.rate)[..., None]  # (n, T, E)
            scores = torch.einsum("bthd,bed->bhte", q, entries) * self.scale
            return scores.masked_fill(~visible[:, None], float("-inf")), entries
        top, chosen = indexer.select(h, c_q, chunk, rope.at, state, cos, sin)  # (n, T, k)
        n, T, k = top.shape
        picked = entries.gather(1, top.reshape(n, T * k, 1).expand(-1, -1, entries.shape[-1])).view(n, T, k, -1)
        scores = torch.einsum("bthd,btkd->bhtk", q, picked) * self.scale
        return scores.masked_fill(~chosen[:, None], float("-inf")), picked


class HyperConnection(nn.Module):
    """The mHC weights around one sublayer (``fn`` [(2+N)N, N d], ``base`` [(2+N)N], ``scale`` [3]):
    returns post [B, T, N], comb [B, T, N, N] and the collapsed input sum_n pre_n X_n [B, T, d]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        N = cfg.hc_mult
        self.n, self.iters, self.eps, self.norm_eps = N, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + N) * N, N * cfg.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + N) * N))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N = self.n
        mix = F.linear(unit_rms(X.flatten(2).float(), self.norm_eps), self.fn.float())  # (B, T, (2+N)N)
        pre_w, post_w, comb_w = mix.split([N, N, N * N], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([N, N, N * N])
        a = self.scale.float()
        pre = torch.sigmoid(pre_w * a[0] + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * a[1] + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (N, N)) * a[2] + comb_b.view(N, N), dim=-1) + self.eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)  # Sinkhorn-Knopp: columns, then
        for _ in range(self.iters - 1):  # rows and columns in turn
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        return post, comb, (pre[..., None] * X).sum(dim=2).to(X.dtype)


def expand(X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The streams after a sublayer: stream k = post_k out + sum_j comb[j, k] X_j (comb transposed)."""
    dtype = X.dtype
    return post.to(dtype)[..., None] * out[:, :, None, :] + comb.to(dtype).transpose(-1, -2) @ X


class HyperHead(nn.Module):
    """The final collapse of the N streams before the output norm (``hc_fn``, ``hc_base``, ``hc_scale``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(cfg.hc_mult, cfg.hc_mult * cfg.hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(cfg.hc_mult))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        mix = F.linear(unit_rms(X.flatten(2).float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mix * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre[..., None] * X).sum(dim=2).to(X.dtype)


class HashRouter(Router):
    """Routing by token id (Sec. 2.1): experts ``tid2eid[token]`` [V, K] (a fixed table, a buffer),
    weighted by their affinities, renormalized; no correction bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        del self._buffers["e_score_correction_bias"]
        self.e_score_correction_bias = None
        self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if input_ids is None:
            raise ValueError("a hash-routed MoE layer (DeepSeek-V4) needs the token ids")
        scores = self.scores(self.logits(x))
        idx = self.tid2eid[input_ids.reshape(-1)]  # (N, K)
        weights = scores.gather(1, idx)
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling, idx, scores


class MoELayer(MoE):
    """V4's MoE: :class:`MoE` (SwiGLU clamp from the config) with a :class:`HashRouter` in hash layers."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        if layer_idx < cfg.num_hash_layers:
            self.gate = HashRouter(cfg)

    def route(self, flat: torch.Tensor, input_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        return self.gate(flat, input_ids) if isinstance(self.gate, HashRouter) else self.gate(flat)


class Block(nn.Module):
    """One V4 layer: attention and MoE, each inside its hyper-connection (``attn_hc``, ``ffn_hc``)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MoELayer(cfg, layer_idx)
        self.input_layernorm = FP32RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = FP32RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)

    def forward(self, X: torch.Tensor, input_ids: torch.Tensor, rope: Rope, chunk: Chunk, state: dict | None,
                stats: RoutingStats | None = None) -> torch.Tensor:
        """Streams X [B, T, N, d] -> [B, T, N, d]."""
        post, comb, x = self.attn_hc(X)
        X = expand(X, post, comb, self.self_attn(self.input_layernorm(x), rope, chunk, state))
        post, comb, x = self.ffn_hc(X)
        return expand(X, post, comb, self.mlp(self.post_attention_layernorm(x), stats=stats, input_ids=input_ids))


class Backbone(nn.Module):
    """Embedding, layers, the streams' head and final norm (HF: ``model.*``); ``mtp`` is empty."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg)
        self.norm = FP32RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mtp = nn.ModuleList()
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, None)
        self.compress_rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.compress_rope_theta, compress_scaling(cfg))


def compress_scaling(cfg: ModelConfig) -> dict | None:
    """The compressed layers' YaRN, cos/sin unscaled unless config.json says otherwise."""
    return {"attention_factor": 1.0, **cfg.rope_scaling} if cfg.rope_scaling else None


class DeepseekV4(nn.Module):
    """A DeepSeek-V4 causal LM with the interface of :class:`~gasungbi.model.transformer.Transformer`:
    ``model(input_ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: ModelConfig, init: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if init and not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for matrices, embedding, experts and hyper-connection projections;
        ones for norms and hyper-connection scales; zeros for sinks, position biases, hyper-connection
        biases and the correction bias (as transformers); a random table of distinct experts per token
        for the hash layers (transformers: zeros, the checkpoint's table replaces it)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=generator)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, Router):
                m.weight.normal_(0.0, std, generator=generator)
                if m.e_score_correction_bias is not None:
                    m.e_score_correction_bias.zero_()
                if isinstance(m, HashRouter):
                    V, E = m.tid2eid.shape[0], m.n_experts
                    table = torch.rand(V, E, generator=generator, device=m.tid2eid.device).argsort(dim=-1)
                    m.tid2eid.copy_(table[:, : m.top_k])
            elif isinstance(m, Experts):
                for p in (m.gate_proj, m.up_proj, m.down_proj):
                    p.normal_(0.0, std, generator=generator)
            elif isinstance(m, (HyperConnection, HyperHead)):
                fn, base, scale = (m.fn, m.base, m.scale) if isinstance(m, HyperConnection) else (m.hc_fn, m.hc_base, m.hc_scale)
                fn.normal_(0.0, std, generator=generator)
                base.zero_()
                scale.fill_(1.0)
            elif isinstance(m, Compressor):
                m.position_bias.zero_()
            elif isinstance(m, Attention):
                m.sinks.zero_()

    def hidden_states(self, input_ids: torch.Tensor, *, ctx: DecodeContext | None = None,
                      stats: RoutingStats | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, d]. ``ctx``: with the decode engine, its cache view (each
        layer's ``state``), the tokens' ``positions`` [B, T] and which are real (``valid``); without, the
        tokens are positions 0.. (or ``ctx.start_pos``..) with no cache. ``stats``: routing statistics."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor of shape [batch, seq], "
                             f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        ctx = ctx if ctx is not None else DecodeContext()
        positions = ctx.positions
        if positions is None:
            start = ctx.start_pos if isinstance(ctx.start_pos, int) else 0
            positions = torch.arange(start, start + T, device=input_ids.device)
        positions = positions.expand(B, T)
        valid = ctx.valid if ctx.valid is not None else torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        chunk = Chunk.of(positions, valid)
        rotary = self.model.compress_rotary
        rope = Rope(self.model.rotary(positions), rotary(positions), rotary)
        x = self.model.embed_tokens(input_ids)
        X = x[:, :, None, :].expand(-1, -1, self.config.hc_mult, -1).contiguous()  # (B, T, N, d)
        for i, layer in enumerate(self.model.layers):
            state = ctx.cache.state(i) if ctx.cache is not None else None
            X = layer(X, input_ids, rope, chunk, state, stats)
        return self.model.norm(self.model.hc_head(X))

    def forward(self, input_ids: torch.Tensor, *, ctx: DecodeContext | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, ctx=ctx))

    def moe_layers(self) -> list[MoE]:
        """The MoE layers in layer order (every layer's)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def reset_buffers(self) -> None:
        """Recompute the rotary frequencies on the weights' device (after meta construction)."""
        device, cfg = self.lm_head.weight.device, self.config
        self.model.rotary.inv_freq = rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, None)[0].to(device)
        self.model.compress_rotary.inv_freq = rope_frequencies(cfg.qk_rope_head_dim, cfg.compress_rope_theta,
                                                               compress_scaling(cfg))[0].to(device)
