"""Token sampling: pure functions on logits [B, V].

The order is the one transformers' ``generate`` uses: repetition penalty, temperature, top-k,
top-p (nucleus, Holtzman et al. 2019), min-p (Nguyen et al. 2024), then a draw. Temperature 0 is
greedy decoding. Draws take an optional ``torch.Generator`` so that a seed reproduces a run, and
use the exponential-race trick (argmax of p / Exp(1), as gpt-fast does) instead of
``torch.multinomial``, so sampling needs no host synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. The defaults are greedy decoding."""

    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it before the filters."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p; 1 = off."""
    min_p: float = 0.0
    """Drop tokens whose probability is under min_p x that of the most likely token; 0 = off."""
    repetition_penalty: float = 1.0
    """CTRL's penalty (Keskar et al. 2019) on every token already in the prompt or the output:
    positive logits are divided by it, negative ones multiplied; 1 = off."""
    seed: int | None = None
    """Seed of the generator for the draws; None = torch's global generator."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator | None:
        """A generator seeded with ``seed`` on ``device`` (None without a seed)."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


GREEDY = SamplingParams()


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V], seen [B, V] bool (token already present) -> penalized logits."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p applied in that order; removed tokens get -inf.

    Each filter sees the distribution left by the previous ones, as in transformers; each keeps
    at least the most likely token.
    """
    logits = logits.float() / max(temperature, 1e-5)
    if top_k == 0 and top_p >= 1.0 and min_p == 0.0:
        return logits
    V = logits.shape[-1]
    values, order = logits.sort(dim=-1, descending=True)  # (B, V), most likely first
    if 0 < top_k < V:
        values[:, top_k:] = float("-inf")
    if top_p < 1.0:
        probs = values.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        values = values.masked_fill(before >= top_p, float("-inf"))
    if min_p > 0.0:
        probs = values.softmax(dim=-1)
        values = values.masked_fill(probs < min_p * probs[:, :1], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, values)


def probabilities(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution [B, V] the next token is drawn from (one-hot at the argmax when greedy)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return filter_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p).softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from probs [B, V] -> [B] (exponential race: argmax p_i / E_i, E_i ~ Exp(1))."""
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams = GREEDY, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """The next token [B] for logits [B, V]; ``seen`` [B, V] marks tokens for the repetition penalty."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p).softmax(dim=-1)
    return draw(probs, generator)
