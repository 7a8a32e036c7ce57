"""The pretraining objective as a module, so DDP and FSDP2 wrap one ``forward``.

loss = L_main + lambda x mean_k L_MTP^k + alpha x sum_layers L_bal

* L_main: next-token cross-entropy.
* L_MTP^k (DeepSeek-V3 Sec. 2.2, eq. 24-25): cross-entropy of depth k's prediction of token
  t+k+1; the paper's L_MTP = lambda/D sum_k L^k is exactly the mean over depths times lambda.
* L_bal: the complementary sequence-wise balance loss (V3 eq. 17-20), with a tiny alpha in V3.
  The main balancing mechanism, the auxiliary-loss-free bias update, is applied by the trainer
  after each optimizer step (:func:`update_expert_bias`) to the ``expert_counts`` that
  ``forward`` returns, summed over the step's micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gasungbi.model.moe import RoutingStats
from gasungbi.model.transformer import Transformer


class Objective(nn.Module):
    """Wraps a :class:`Transformer`; ``forward(x, y)`` returns a dict of scalar losses, plus
    ``expert_counts`` [n_moe_layers, E] (tokens per expert, layers as ``moe_layers()``) for MoE models."""

    def __init__(self, model: Transformer, mtp_weight: float = 0.3, balance_alpha: float = 0.0):
        super().__init__()
        self.model = model
        self.mtp_weight, self.balance_alpha = mtp_weight, balance_alpha

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        stats = RoutingStats()
        h = m.hidden_states(x, stats=stats)  # (B, T, d)
        logits = m.lm_head(h)  # (B, T, V)
        main = _cross_entropy(logits, y)
        out = {"loss": main, "lm_loss": main.detach()}
        if m.model.mtp and self.training and self.mtp_weight > 0:
            losses = []
            for k, hk in enumerate(m.mtp_hidden(h, x, stats=stats), start=1):
                lk = m.lm_head(hk)  # (B, T-k, V) predicts y[:, k:]
                losses.append(_cross_entropy(lk, y[:, k:]))
            mtp = torch.stack(losses).mean()
            out["loss"] = out["loss"] + self.mtp_weight * mtp
            out["mtp_loss"] = mtp.detach()
        if self.balance_alpha > 0 and stats.balance_losses:
            b = torch.stack(stats.balance_losses).sum()
            out["loss"] = out["loss"] + self.balance_alpha * b
            out["balance_loss"] = b.detach()
        moes = m.moe_layers()
        if moes:  # a layer that did not run (MTP outside training) counts no tokens
            none = torch.zeros(moes[0].n_experts, dtype=torch.long, device=x.device)
            out["expert_counts"] = torch.stack([stats.counts.get(moe.layer_idx, none) for moe in moes])  # (n_moe, E)
        return out


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets that are not -100 (0 when there are none, not NaN)."""
    total = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    return total / (y != -100).sum().clamp(min=1)


@torch.no_grad()
def update_expert_bias(model: Transformer, counts: torch.Tensor, gamma: float, all_reduce=None) -> dict[str, float]:
    """Auxiliary-loss-free balancing (V3 Sec. 2.1.2): b_i -= gamma if expert i is overloaded,
    += gamma if underloaded, judged on this step's token counts.

    ``counts`` [n_moe_layers, E]: tokens per expert of each layer of ``model.moe_layers()``, the
    ``expert_counts`` of :class:`Objective` summed over the step's micro-batches. ``all_reduce`` (a
    function summing a tensor across processes in place) makes every rank see the global load so
    biases stay identical. Returns the load statistics that the trainer logs: ``max_violation`` =
    (max load - mean load) / mean load (V3's MaxVio, Wang et al. 2024), and ``load``, the tokens
    per expert of each MoE layer.
    """
    counts = counts.to(torch.float32, copy=True)  # the all-reduce must not change the caller's tensor
    if all_reduce is not None:
        all_reduce(counts)
    stats: dict = {"load": counts.long().tolist()}
    violations = []
    for moe, c in zip(model.moe_layers(), counts, strict=True):
        mean = c.mean()
        if mean > 0:
            violations.append(((c.max() - mean) / mean).item())
        bias = moe.gate.e_score_correction_bias
        if bias is not None and gamma > 0 and mean > 0:
            bias += gamma * torch.sign(mean - c)
    if violations:
        stats["max_violation"] = max(violations)
        stats["mean_violation"] = sum(violations) / len(violations)
    return stats

