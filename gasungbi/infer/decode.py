"""A static batch on the decode engine: prefill the prompts, then one token per step.

One :class:`~gasungbi.infer.engine.Engine` with a row per prompt: one prefill forward (naive MLA:
decompressing K/V once is cheaper for many tokens), then one single-token step per token with the
absorbed MLA, which reads only the cached latent and rope key. Only the logits of the last
position go through the output head. Speculative decoding (:mod:`gasungbi.infer.speculative`)
shares the helpers here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from gasungbi.infer.engine import Engine, compiled_step
from gasungbi.infer.sampling import GREEDY, SamplingParams, sample


class ContextLengthError(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context."""


@dataclass
class GenerationStats:
    """Timings and counts of one run. ``drafted``/``accepted`` are for speculative decoding."""

    batch_size: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    """Tokens computed, all rows together (rows that finished early count until the batch ends)."""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    """The decode phase after the first token (from the prefill), steps that compiled left out."""
    compile_s: float = 0.0
    """With ``compile``: the decode steps that compiled a new shape (the window grows in powers of
    two), which ``decode_s`` leaves out."""
    compile_steps: int = 0
    forwards: int = 0
    """Decode-phase forwards of the main model."""
    drafted: int = 0
    accepted: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode phase, all rows together (the first token comes from
        the prefill and is not counted, nor are the tokens of steps that compiled)."""
        n = self.new_tokens - self.batch_size * (1 + self.compile_steps)
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def check_context(cfg, prompt_len: int, max_new_tokens: int) -> None:
    """Raise :class:`ContextLengthError` unless ``prompt_len + max_new_tokens`` fits the context."""
    limit = cfg.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = {prompt_len + max_new_tokens} "
            f"tokens exceeds the model's context of {limit} tokens (max_position_embeddings); "
            f"shorten the prompt or ask for at most {max(limit - prompt_len, 0)} new tokens")


def seen_mask(prompts: Sequence[Sequence[int]], vocab_size: int, device) -> torch.Tensor:
    """[B, V] bool: which tokens each prompt holds (for the repetition penalty)."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        seen[b, torch.as_tensor(list(p), dtype=torch.long, device=device)] = True
    return seen


@torch.inference_mode()
def decode_steps(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams = GREEDY,
                 stats: GenerationStats | None = None, compile: bool = False) -> Iterator[list[int]]:
    """Yield the next token of every row, step by step (``max_new_tokens`` steps at most).

    The consumer stops early by closing the iterator. One host synchronization per step (the
    tokens are needed on the host for stops and streaming); sampling itself has none.
    """
    cfg = model.config
    stats = stats if stats is not None else GenerationStats()
    B, P = len(prompts), max(len(p) for p in prompts)
    check_context(cfg, P, max_new_tokens)
    t0 = time.perf_counter()
    engine = Engine(model, B, P + max_new_tokens, compile=compile)
    gen = sampling.generator(engine.device)
    seen = seen_mask(prompts, cfg.vocab_size, engine.device) if sampling.repetition_penalty != 1.0 else None
    stats.batch_size, stats.prompt_tokens = B, sum(len(p) for p in prompts)

    logits, _ = engine.join(prompts)
    nxt = sample(logits, sampling, gen, seen)  # (B,)
    tokens = nxt.tolist()
    stats.prefill_s = time.perf_counter() - t0
    stats.new_tokens += B
    step = compiled_step(model) if compile else None
    compiles, compile_s = (step.compiles, step.compile_s) if step else (0, 0.0)
    t1 = time.perf_counter()
    try:
        yield tokens
        for _ in range(1, max_new_tokens):
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            nxt = sample(engine.step(nxt), sampling, gen, seen)
            tokens = nxt.tolist()
            stats.forwards += 1
            stats.new_tokens += B
            yield tokens
    finally:
        if step:
            stats.compile_steps, stats.compile_s = step.compiles - compiles, step.compile_s - compile_s
        stats.decode_s = time.perf_counter() - t1 - stats.compile_s
