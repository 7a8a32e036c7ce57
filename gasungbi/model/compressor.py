"""DeepSeek-V4's compressed attention memory: the KV compressor of CSA and HCA layers and CSA's
lightning indexer (DeepSeek-V4 report Sec. 2.3), with transformers' parameter names.

Compression (CSA Sec. 2.3.1, HCA Sec. 2.3.2 eq. 20-23). Every m tokens of a layer's input h_t
become one entry c_w of width d_c:
    C_t = h_t W^KV,   Z_t = h_t W^Z + B_(t mod m)            (B: a learned bias per offset, ``position_bias``)
    HCA:  c_w = sum_{t in window w} softmax_t(Z_t) * C_t      (softmax over the m tokens, per channel)
    CSA:  C_t, Z_t are 2 d_c wide, [a | b]; entry w pools the m tokens of window w-1 through their
          ``a`` halves and those of window w through their ``b`` halves: 2m slots, stride m
    c_w <- RoPE(RMSNorm(c_w)) at position w m;   the query at position t sees entries w < (t+1) // m
Window w's entry exists once its last token, position (w+1) m - 1, has been seen.

Lightning indexer (Sec. 2.3.1 eq. 13-17; DeepSeek Sparse Attention over compressed entries). Its own
compressor (CSA-style, width d_I) gives a key per entry; queries come from the query latent c^Q:
    I_t,s = sum_h w_t,h ReLU(q_t,h . k_s) / sqrt(d_I),   w_t = h_t W^w / sqrt(n_I)
and query t attends to the ``index_topk`` visible entries of highest I_t,s.

Streaming. One forward sees T new tokens per row at known positions; with left padding the real ones
are a suffix of the row (``valid``). Without a cache the windows are those of the T tokens (training,
a full forward). With a decode cache each row keeps, indexed by position and not by cache slot: the
raw (C, Z) of its incomplete window (m rows, ``acc_*``), CSA's ``a`` half of its last complete window
(``overlap_*``), and the entries (``entries``: one row per window of the context, plus a spare row that
windows not yet complete are written to). Every shape depends only on (rows, T) and the context
length, so the engine's step compiles once per shape.

Deviations from DeepSeek's reference, as transformers: no Hadamard rotation and no FP4/FP8 simulation of
the indexer's queries and keys, nor FP8 of the cached KV. Ties at the k-th index score are broken as
``torch.topk`` breaks them. The indexer is trained by no loss here (its top-k is not differentiable;
the report trains it toward the attention's distribution), as for V3.2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gasungbi.config import ModelConfig
from gasungbi.model.attention import apply_rope
from gasungbi.model.layers import FP32RMSNorm


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """V4's RoPE: the trailing 2 x cos.shape[-1] channels of x [B, T, (H,) D] rotated in interleaved
    pairs (x0,x1),(x2,x3).. in place, in fp32; the leading channels untouched. The pairs stay where they
    are, which matters here: V is the rotated K, and the attention output is rotated back (``-sin``)."""
    r = 2 * cos.shape[-1]
    rot = apply_rope(x[..., -r:].float(), cos, sin, interleave=True).to(x.dtype)
    return torch.cat((x[..., :-r], rot), dim=-1)


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight: x / rms(x), the rms taken in fp32."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


@dataclass(frozen=True)
class Chunk:
    """Where one forward's T tokens of each row are: ``positions`` [n, T], the real tokens (``valid``
    [n, T]) a suffix of ``count`` [n] of them, the first at position ``start`` [n] (= ``last`` - count + 1)
    and index T - count."""

    positions: torch.Tensor
    valid: torch.Tensor
    count: torch.Tensor
    start: torch.Tensor
    last: torch.Tensor

    @staticmethod
    def of(positions: torch.Tensor, valid: torch.Tensor) -> "Chunk":
        count = valid.sum(1)
        last = positions[:, -1]
        return Chunk(positions, valid, count, last - count + 1, last)

    @property
    def first(self) -> torch.Tensor:
        """The index of each row's first real token [n]."""
        return self.positions.shape[1] - self.count


class Compressor(nn.Module):
    """One stream of compressed entries of width ``width`` every ``rate`` tokens (HCA: ``overlap`` off;
    CSA: on, with 2 x width wide projections). ``kv_proj``, ``gate_proj``, ``position_bias``, ``kv_norm``."""

    def __init__(self, cfg: ModelConfig, width: int, rate: int, overlap: bool):
        super().__init__()
        self.width, self.rate, self.overlap = width, rate, overlap
        c = 2 * width if overlap else width
        self.kv_proj = nn.Linear(cfg.hidden_size, c, bias=False)
        self.gate_proj = nn.Linear(cfg.hidden_size, c, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, c))
        self.kv_norm = FP32RMSNorm(width, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, chunk: Chunk, rope, state: dict | None,
                prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Entries [n, E, width] the queries of ``h`` [n, T, d] may read, and each one's window number
        [n or 1, E]: without ``state`` the windows the T tokens touch (an incomplete one is never
        visible), with it the state's entries after this forward's windows are written into them.
        ``rope(positions)`` gives the compressed layers' (cos, sin); ``prefix`` names the state's buffers."""
        m, n, T = self.rate, h.shape[0], h.shape[1]
        kv, gate = self.kv_proj(h), self.gate_proj(h)  # (n, T, c)
        s = chunk.start % m
        base = chunk.start - s  # the first window's first position
        J = (T + 2 * m - 2) // m * m  # positions base .. base + J - 1 cover s + T tokens
        j = torch.arange(J, device=h.device)
        src = torch.where(j < s[:, None], j, m + chunk.first[:, None] + j - s[:, None]).clamp(max=m + T - 1)
        real = j < (s + chunk.count)[:, None]  # (n, J)
        acc_kv = state[prefix + "acc_kv"] if state is not None else kv.new_zeros(n, m, kv.shape[-1])
        acc_gate = state[prefix + "acc_gate"] if state is not None else kv.new_zeros(n, m, kv.shape[-1])
        idx = src[..., None].expand(-1, -1, kv.shape[-1])
        X = torch.cat((acc_kv, kv), 1).gather(1, idx).masked_fill(~real[..., None], 0.0)  # (n, J, c)
        G = torch.cat((acc_gate, gate), 1).gather(1, idx)  # raw gates: the state keeps them unbiased
        Z = (G + self.position_bias.repeat(J // m, 1).to(G.dtype)).masked_fill(~real[..., None], torch.finfo(G.dtype).min)
        Xw, Zw = X.view(n, J // m, m, -1), Z.view(n, J // m, m, -1)  # (n, W, m, c): W windows
        slots_kv, slots_gate = Xw, Zw
        if self.overlap:
            prev_kv, prev_gate = self._previous_halves(Xw, Zw, base, state, prefix)
            slots_kv = torch.cat((prev_kv, Xw[..., self.width:]), dim=2)  # (n, W, 2m, width)
            slots_gate = torch.cat((prev_gate, Zw[..., self.width:]), dim=2)
        weights = slots_gate.softmax(dim=2, dtype=torch.float32).to(slots_kv.dtype)
        pooled = (slots_kv * weights).sum(dim=2)  # (n, W, width)
        window = base[:, None] // m + torch.arange(J // m, device=h.device)  # (n, W) window numbers
        cos, sin = rope(window * m)
        entries = rope_tail(self.kv_norm(pooled), cos, sin)
        if state is None:
            return entries, window
        self._write(entries, window, X, G, Zw if self.overlap else None, base, chunk, state, prefix)
        buf = state[prefix + "entries"]
        return buf, torch.arange(buf.shape[1], device=h.device)[None]

    def _previous_halves(self, Xw, Zw, base, state, prefix) -> tuple[torch.Tensor, torch.Tensor]:
        """CSA: the ``a`` halves of the window before each (the state's overlap for the first; none,
        with gates at -inf, before window 0)."""
        n, _, m, _ = Xw.shape
        c = self.width
        if state is not None:
            ov_kv, ov_gate = state[prefix + "overlap_kv"], state[prefix + "overlap_gate"]
        else:
            ov_kv, ov_gate = Xw.new_zeros(n, m, c), Zw.new_zeros(n, m, c)
        ov_gate = ov_gate.masked_fill((base == 0)[:, None, None], torch.finfo(Zw.dtype).min)
        prev_kv = torch.cat((ov_kv[:, None].to(Xw.dtype), Xw[:, :-1, :, :c]), dim=1)
        prev_gate = torch.cat((ov_gate[:, None].to(Zw.dtype), Zw[:, :-1, :, :c]), dim=1)
        return prev_kv, prev_gate

    def _write(self, entries, window, X, G, Zw, base, chunk: Chunk, state: dict, prefix: str) -> None:
        """The state after this forward: complete windows' entries (others go to the spare last row),
        the new incomplete window's raw C and Z, and (CSA) the ``a`` half of the last complete window."""
        m, n, J = self.rate, X.shape[0], X.shape[1]
        buf = state[prefix + "entries"]
        complete = (window + 1) * m - 1 <= chunk.last[:, None]  # (n, W)
        rows = torch.where(complete, window, buf.shape[1] - 1).clamp(max=buf.shape[1] - 1)
        buf.scatter_(1, rows[..., None].expand(-1, -1, buf.shape[-1]), entries.to(buf.dtype))
        open_at = (chunk.last + 1) // m * m - base  # the incomplete window's offset in X (n,)
        idx = (open_at[:, None] + torch.arange(m, device=X.device)).clamp(max=J - 1)[..., None].expand(-1, -1, X.shape[-1])
        state[prefix + "acc_kv"].copy_(X.gather(1, idx))
        state[prefix + "acc_gate"].copy_(G.gather(1, idx))
        if Zw is not None:
            done = open_at > 0  # a window completed in this forward: its ``a`` half is the next overlap
            k = (open_at // m - 1).clamp(min=0)[:, None, None, None].expand(-1, 1, m, self.width)
            Xw = X.view(n, J // m, m, -1)
            for name, src in (("overlap_kv", Xw), ("overlap_gate", Zw)):
                old = state[prefix + name]
                new = src[..., :self.width].gather(1, k)[:, 0].to(old.dtype)
                old.copy_(torch.where(done[:, None, None], new, old))


class IndexerScorer(nn.Module):
    """The indexer's per-head weights w_t = h_t W^w / sqrt(n_I) (``weights_proj``) and its score I_t,s."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.weights_proj = nn.Linear(cfg.hidden_size, cfg.index_n_heads, bias=False)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """q [n, T, n_I, d_I], keys [n, E, d_I], h [n, T, d] -> I [n, T, E] in fp32."""
        scores = torch.relu(torch.einsum("bthd,bed->bthe", q.float(), keys.float())) * self.head_dim ** -0.5
        w = self.weights_proj(h).float() * self.n_heads ** -0.5  # (n, T, n_I)
        return torch.einsum("bth,bthe->bte", w, scores)


class Indexer(Compressor):
    """CSA's lightning indexer: a compressor of keys (width ``index_head_dim``, the layer's rate, CSA's
    overlap) plus its query projection from the query latent (``q_b_proj``) and ``scorer``."""

    def __init__(self, cfg: ModelConfig, rate: int):
        super().__init__(cfg, cfg.index_head_dim, rate, overlap=True)
        self.n_heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.scorer = IndexerScorer(cfg)
        self.requires_grad_(False)

    @torch.no_grad()
    def select(self, h: torch.Tensor, c_q: torch.Tensor, chunk: Chunk, rope, state: dict | None,
               cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each query of ``h`` [n, T, d] (query latent ``c_q`` [n, T, r], RoPE ``cos``/``sin`` at its
        position): the ``index_topk`` visible entries of highest score, as indices [n, T, k] into the
        compressor's entries, and whether each is visible [n, T, k] (fewer may be)."""
        n, T, _ = h.shape
        keys, window = self(h, chunk, rope, state, prefix="index_")  # (n, E, d_I), (n|1, E)
        q = rope_tail(self.q_b_proj(c_q).view(n, T, self.n_heads, -1), cos, sin)
        visible = window[:, None, :] < ((chunk.positions + 1) // self.rate)[..., None]  # (n, T, E)
        index = self.scorer(q, keys, h).masked_fill(~visible, float("-inf"))
        top = index.topk(min(self.topk, index.shape[-1]), dim=-1).indices  # (n, T, k)
        return top, visible.gather(-1, top)
