"""Validation loss and bits per byte on a token-shard split; perplexity on a token sequence.

Bits per byte (bpb) compares models with different tokenizers: total nats / ln 2 / UTF-8 bytes.
We evaluate the first ``max_batches`` windows of the split and convert with the split's measured
bytes per token from the manifest: bpb = mean nats per token / ln 2 / (bytes / tokens). This
assumes the evaluated windows have the split's average bytes per token; the bos/eos tokens
counted in ``tokens`` carry no bytes, which makes bpb very slightly pessimistic.

:func:`perplexity` is the minimal evaluator ``gasungbi quantize --eval-text`` uses to compare a
model with its quantized copy: exp(mean next-token NLL) over windows of a token sequence.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

from gasungbi.data.shards import iter_eval_batches, load_manifest
from gasungbi.model.transformer import Transformer


@torch.no_grad()
def evaluate_batches(objective, batches, amp=None, bytes_per_token: float | None = None,
                     all_reduce_sum: Callable[[torch.Tensor], object] | None = None) -> dict[str, float]:
    """Mean next-token loss (nats) over ``batches`` of (x, y), y = -100 where ignored, and bits
    per byte when ``bytes_per_token`` is known. ``objective(x, y)`` returns ``{"lm_loss"}``. Under
    torchrun each rank evaluates its share and the caller passes ``all_reduce_sum`` (an in-place sum
    over ranks) so that every rank gets the totals."""
    was_training = objective.training
    objective.eval()
    device = next(objective.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of nats, target tokens)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with amp or contextlib.nullcontext():
            loss = objective(x, y)["lm_loss"]
        n = (y != -100).sum().item()
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
    if all_reduce_sum is not None:
        all_reduce_sum(total)
    objective.train(was_training)
    nats = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
    out = {"loss": nats, "tokens": int(total[1].item())}
    if bytes_per_token:
        out["bpb"] = nats / math.log(2) / bytes_per_token
    return out


def evaluate(objective, data: str, split: str = "val", batch_size: int = 8, seq_len: int = 256,
             max_batches: int | None = 20, rank: int = 0, world_size: int = 1, amp=None,
             all_reduce_sum: Callable[[torch.Tensor], object] | None = None) -> dict[str, float]:
    """Validation loss and bits per byte on a token-shard split (the first ``max_batches`` windows)."""
    batches = iter_eval_batches(data, split, batch_size, seq_len, max_batches, rank=rank, world_size=world_size)
    return evaluate_batches(objective, batches, amp, load_manifest(data).splits[split].bytes_per_token,
                            all_reduce_sum)


@torch.inference_mode()
def perplexity(model: Transformer, tokens: torch.Tensor, seq_len: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len`` tokens of ``tokens`` [N]
    (a minimal evaluator for comparing a model with its quantized copy)."""
    device = model.model.embed_tokens.weight.device
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"need more than {seq_len} tokens, got {tokens.numel()}")
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1: n * seq_len + 1].view(n, seq_len)
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(x[i:i + batch_size].to(device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch_size].flatten().to(device),
                                 reduction="sum").item()
    return math.exp(total / (n * seq_len))
