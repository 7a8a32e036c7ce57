"""DeepSeekMoE: shared experts plus fine-grained routed experts with a top-K router.

Routing (DeepSeek-V3 Sec. 2.1.2, eq. 12-16; DeepSeek-V2 Sec. 2.2):
    s_i,t = sigmoid(u_t . e_i) (V3)  or  softmax_i(u_t . e_i) (V2)  or  sqrt(softplus(u_t . e_i)) (V4)
    chosen = TopK(s_i,t + b_i)       b_i: per-expert correction bias, only in ``noaux_tc``;
                                     it changes which experts are chosen, never their weights
    g_i,t = s_i,t / sum_{j in chosen} s_j,t  (if norm_topk_prob)   x routed_scaling_factor
Group-limited routing first keeps the ``topk_group`` best of ``n_group`` expert groups (group score:
sum of the top-2 biased scores in V3, the max score in V2).

Auxiliary-loss-free balancing (V3 Sec. 2.1.2) is done by the trainer: after every step it nudges
b_i by gamma toward even load using the step's tokens per expert. The module keeps no record of
its own: a training forward passes a :class:`RoutingStats`, into which each MoE layer writes its
counts and, with grad in training mode, its sequence-wise balance loss (V3 eq. 17-20). Inference
passes none and nothing is recorded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gasungbi.config import ModelConfig
from gasungbi.model.grouped_mm import grouped_linear
from gasungbi.model.layers import MLP, swiglu


class RoutingStats:
    """What the MoE layers report during one training forward (the caller creates and reads it).

    ``counts``: MoE layer index -> (E,) tokens routed to each expert, summed over the layer's runs;
    ``balance_losses``: the sequence-wise balance loss of every training-mode run with grad.
    """

    def __init__(self):
        self.counts: dict[int, torch.Tensor] = {}
        self.balance_losses: list[torch.Tensor] = []

    def add_counts(self, layer_idx: int, counts: torch.Tensor) -> None:
        prev = self.counts.get(layer_idx)
        self.counts[layer_idx] = counts if prev is None else prev + counts


class Router(nn.Module):
    """Scores experts and picks K per token. ``weight`` is [E, d]; kept in fp32 like HF does."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring, self.method = cfg.scoring_func, cfg.topk_method
        self.norm_topk, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) -> (N, E) fp32: the affinities before the scoring function."""
        return F.linear(x.float(), self.weight.float())

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The affinities s_i,t (N, E) of the logits (N, E)."""
        if self.scoring == "sigmoid":
            return logits.sigmoid()
        if self.scoring == "sqrtsoftplus":
            return F.softplus(logits).sqrt()
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> weights (N, K), expert ids (N, K), scores (N, E) (all fp32)."""
        scores = self.scores(self.logits(x))
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1 and self.method != "greedy":
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.n_experts // self.n_group, dim=1),
                                        float("-inf"))
        idx = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(1, idx)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx, scores


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate/up (E, I, d), down (E, d, I); DeepSeek-V4 clamps the
    SwiGLU (``limit``, :func:`~gasungbi.model.layers.swiglu`).

    The token slots are sorted by expert once (:func:`by_expert`) and each projection is one grouped
    matrix product over the stacked weights (:func:`~gasungbi.model.grouped_mm.grouped_linear`):
    no loop over experts, and no host sync where the grouped product runs natively. An expert
    that gets no token is an empty group (its weights' gradient is zero). At inference, fewer
    (token, expert) slots than experts (decode steps) run only the chosen experts, one at a time
    (:func:`dispatch`): the grouped product would visit every expert's empty group.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, d))
        self.up_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        self.limit = cfg.swiglu_limit

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens x (n, d) -> (n, d)."""
        if self.limit is not None:
            return swiglu(x @ self.gate_proj[e].t(), x @ self.up_proj[e].t(), self.limit) @ self.down_proj[e].t()
        return (F.silu(x @ self.gate_proj[e].t()) * (x @ self.up_proj[e].t())) @ self.down_proj[e].t()

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, d), idx/weights (N, K), counts (E,) tokens per expert (computed when not given)."""
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():  # a compiled decode step
            return self.traced(x, idx, weights)
        E = self.gate_proj.shape[0]
        if idx.numel() < E and not torch.is_grad_enabled():  # a few tokens at inference: their experts only
            return dispatch(self.expert, x, idx, weights, expert_counts(idx, E, counts))
        offs = expert_counts(idx, E, counts).cumsum(0).to(torch.int32)  # (E,) group ends
        return by_expert(lambda xs: self.grouped(xs, offs), x, idx, weights)

    def grouped(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Every expert on its tokens: xs (M, d) token slots sorted by expert, expert e's ending at
        offs[e] -> (M, d)."""
        return grouped_swiglu(xs, self.gate_proj, self.up_proj, self.down_proj, offs, self.limit)

    def traced(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed experts with no data-dependent shapes and no host read, for a compiled
        inference step (:func:`dispatch` reads the expert ids on the host: a graph break at every
        MoE layer and, as guards on the values, a recompilation). With fewer (token, expert) pairs than
        experts, each pair's weights are gathered ([N, K, I, d]: for decode, about the bytes the
        experts themselves hold); otherwise every expert runs on every token, weighted by a dense
        [N, E] combine matrix (zero where not routed). Same sum as :meth:`forward`, in another
        order of additions. Meant for the GPU, where decode is bound by reading the weights; the
        dense form does E/K times the FLOPs, which a CPU pays (CPU decode in fp32 takes the native
        kernels instead, which run only the chosen experts)."""
        N, K = idx.shape
        E = self.gate_proj.shape[0]
        if N * K < E:
            xk = x[:, None, :, None]  # (N, 1, d, 1)
            h = swiglu(self.gate_proj[idx] @ xk, self.up_proj[idx] @ xk, self.limit)  # (N, K, I, 1)
            out = (self.down_proj[idx] @ h).squeeze(-1)  # (N, K, d)
            return (out * weights[..., None].to(out.dtype)).sum(1)
        combine = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter(1, idx, weights.to(x.dtype))
        h = swiglu(torch.einsum("nd,eid->nei", x, self.gate_proj), torch.einsum("nd,eid->nei", x, self.up_proj),
                   self.limit)
        return torch.einsum("nei,edi,ne->nd", h, self.down_proj, combine)


def expert_counts(idx: torch.Tensor, n_experts: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) tokens routed to each expert: ``counts`` when the caller has them already. (A scatter,
    not ``bincount``, whose output size depends on the ids: the shape stays static for a compiler.)"""
    if counts is not None:
        return counts
    flat = idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


def grouped_swiglu(xs: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                   offs: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """Stacked SwiGLU experts, gate/up (E, I, d) and down (E, d, I), each on its group of the rows
    xs (M, d) (expert e's rows end at offs[e]) -> (M, d): three grouped products."""
    gate, up = grouped_linear(xs, gate_proj, offs), grouped_linear(xs, up_proj, offs)  # (M, I)
    return grouped_linear(swiglu(gate, up, limit), down_proj, offs)


def by_expert(run, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sort the (token, expert) slots by expert, ``run`` them, and combine: x (N, d), idx/weights
    (N, K) -> (N, d'), row n = sum_k weights[n, k] run(x_n as a slot of expert idx[n, k]).

    ``run`` takes the slots' tokens (N*K, d), each expert's one contiguous slice in expert order,
    and returns their outputs (N*K, d') in the same order (a loop over experts, never over tokens).
    """
    k = idx.shape[1]
    order = idx.reshape(-1).argsort(stable=True)  # (N*K,) slots sorted by expert
    token = order // k
    ys = run(x.index_select(0, token))
    ys = ys * weights.reshape(-1).index_select(0, order)[:, None].to(ys.dtype)
    return ys.new_zeros(x.shape[0], ys.shape[1]).index_add_(0, token, ys)


def dispatch(expert, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """:func:`by_expert` for experts that exist one at a time (quantized, FP8): ``expert(e, tokens)``
    runs on each expert's slice, the slices read from ``counts`` (E,) on the host; an expert that
    gets no token is skipped. A single token without grad runs its K experts directly, in expert
    order. x (N, d), idx/weights (N, K) -> (N, d) in the experts' output dtype.
    """
    if x.shape[0] == 1 and not weights.requires_grad:  # batch-1 decode: K experts in expert order
        y = None
        for w, e in sorted(zip(weights[0].tolist(), idx[0].tolist()), key=lambda p: p[1]):
            out = expert(e, x) * w
            y = out if y is None else y + out
        return y
    if x.shape[0] == 0:
        return torch.zeros_like(x)

    def run(xs: torch.Tensor) -> torch.Tensor:
        return torch.cat([expert(e, part) for e, part in enumerate(xs.split(counts.tolist())) if part.shape[0]])

    return by_expert(run, x, idx, weights)


class MoE(nn.Module):
    """A DeepSeekMoE feed-forward: ``shared_experts(x) + sum_i g_i expert_i(x)`` (V3 eq. 12)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.swiglu_limit)
                               if cfg.n_shared_experts else None)

    def route(self, flat: torch.Tensor, input_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """weights (N, K), expert ids (N, K), scores (N, E) of tokens ``flat`` (N, d) (ids: hash routing)."""
        return self.gate(flat)

    def forward(self, x: torch.Tensor, *, stats: RoutingStats | None = None,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d); ``stats``, when given, receives this run's routing statistics;
        ``input_ids`` (B, T): the tokens, for layers that route by token id (DeepSeek-V4's hash layers)."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        weights, idx, scores = self.route(flat, input_ids)
        counts = expert_counts(idx, self.n_experts) if stats is not None else None  # (E,)
        y = self.experts(flat, idx, weights, counts).view(B, T, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if stats is not None:
            stats.add_counts(self.layer_idx, counts)
            if self.training and torch.is_grad_enabled():
                stats.balance_losses.append(self._sequence_balance_loss(scores.view(B, T, -1), idx.view(B, T, -1)))
        return y

    def _sequence_balance_loss(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sum_i f_i P_i averaged over sequences (V3 eq. 17-20; multiply by alpha outside).

        f_i = N_r / (K_r T) * #tokens of the sequence routed to i; P_i = mean_t of s_i,t normalized
        over all experts.
        """
        B, T, E = scores.shape
        hits = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, idx.reshape(B, -1), torch.ones(B, idx.shape[1] * idx.shape[2], device=scores.device))
        f = hits * E / (self.top_k * T)
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
        return (f * p).sum(dim=-1).mean()
