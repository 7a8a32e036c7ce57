"""Self-speculative decoding with the model's own multi-token-prediction (MTP) module.

DeepSeek-V3 (Sec. 2.2 and 5.4.3) notes that its MTP module can serve as the draft model of
speculative decoding (Leviathan et al. 2023; Chen et al. 2023), with 85-90% of second tokens
accepted. One step here:

    pending token t_n (not yet fed); main cache holds slots < n; MTP proposed draft d for t_{n+1}
    1. main model on [t_n, d] at slots n, n+1        -> h_n, h_{n+1}, logits for t_{n+1}, t_{n+2}
    2. accept d if the main model agrees (greedy: same argmax; sampling: with probability
       min(1, p(d)/q(d)), else draw from max(p - q, 0) renormalized), then t_{n+2} is free
    3. MTP on [Emb(t_{i+1}) ; h_i] for the new positions i -> the next draft

So each main forward yields 2 tokens when the draft is accepted and 1 when not, and the output
distribution is the main model's: greedy output is identical to plain decoding. The MTP module
has its own cache layer (``num_hidden_layers``) in the :class:`~gasungbi.infer.engine.Engine`'s
cache; a rejected draft's main-cache slot is simply overwritten by the next step.

Deviations: one draft token per step, from the first MTP module (the released DeepSeek-V3 has
one); one prompt at a time (rows of a batch would accept different numbers of tokens).
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from gasungbi.infer.decode import GenerationStats, check_context, seen_mask
from gasungbi.infer.engine import Engine
from gasungbi.infer.sampling import GREEDY, SamplingParams, apply_repetition_penalty, draw, probabilities, sample


def check_speculative(model, batch_size: int) -> None:
    """Raise ``ValueError`` unless ``model`` can draft for itself at this batch size."""
    if not len(model.model.mtp):
        raise ValueError("speculative decoding drafts with the model's MTP module, and this model has none "
                         "(num_nextn_predict_layers=0)")
    if batch_size != 1:
        raise ValueError(f"speculative decoding runs one prompt at a time, got a batch of {batch_size}")


def mtp_draft_logits(engine: Engine, tokens: torch.Tensor, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Run the first MTP module on the tokens at slots start.. and return the logits of the last one.

    ``tokens`` [B, T] are t_{i+1} and ``hidden`` [B, T, d] the main model's final-normed h_i for
    the positions i at those slots; the result [B, V] predicts t_{i+2} for the last i.
    """
    model = engine.model
    normed = engine.mtp(model.model.mtp[0], model.model.embed_tokens(tokens), hidden, start)  # (B, T, d)
    return model.lm_head(normed[:, -1])


@torch.inference_mode()
def speculative_steps(model, prompt: list[int], max_new_tokens: int, sampling: SamplingParams = GREEDY,
                      stats: GenerationStats | None = None) -> Iterator[list[int]]:
    """Yield ``[token]`` for each new token of one prompt (as ``decode_steps`` does for a batch)."""
    check_speculative(model, 1)
    cfg = model.config
    stats = stats if stats is not None else GenerationStats()
    P = len(prompt)
    check_context(cfg, P, max_new_tokens)
    t0 = time.perf_counter()
    engine = Engine(model, 1, P + max_new_tokens)
    device = engine.device
    ids = torch.tensor([prompt], device=device)
    gen = sampling.generator(device)
    seen = seen_mask([prompt], cfg.vocab_size, device) if sampling.repetition_penalty != 1.0 else None

    def mark(tok: torch.Tensor) -> None:
        if seen is not None:
            seen[0, tok] = True

    stats.batch_size, stats.prompt_tokens = 1, P
    logits, h = engine.join([prompt], hidden=True)  # (1, V), (1, P, d)
    tok = sample(logits, sampling, gen, seen)  # (1,) t_P
    stats.prefill_s = time.perf_counter() - t0
    stats.new_tokens += 1
    t1 = time.perf_counter()
    try:
        yield tok.tolist()
        mark(tok)
        draft_logits = mtp_draft_logits(engine, torch.cat((ids[:, 1:], tok[:, None]), 1), h, 0)
        while True:
            q = probabilities(draft_logits, sampling, seen)  # (1, V) the draft's distribution
            d = q.argmax(-1) if sampling.greedy else draw(q, gen)  # (1,)
            n = engine.clock  # slot of the pending token
            h2 = engine.verify(torch.stack((tok, d), 1))  # (1, 2, d)
            logits = model.lm_head(h2)  # (1, 2, V)
            stats.forwards += 1
            stats.drafted += 1
            if sampling.greedy:
                target = logits[:, 0] if seen is None else apply_repetition_penalty(
                    logits[:, 0], seen, sampling.repetition_penalty)
                accepted = bool((target.argmax(-1) == d).item())
            else:
                p = probabilities(logits[:, 0], sampling, seen)
                ratio = (p[0, d] / q[0, d]).clamp(max=1.0)
                accepted = bool((torch.rand(1, generator=gen, device=device) < ratio).item())
            if accepted:
                stats.accepted += 1
                mark(d)
                bonus = sample(logits[:, 1], sampling, gen, seen)
                mark(bonus)
                stats.new_tokens += 1
                yield d.tolist()
                stats.new_tokens += 1
                yield bonus.tolist()
                draft_logits = mtp_draft_logits(engine, torch.stack((d, bonus), 1), h2, n)
                engine.advance(2)
                tok = bonus
            else:
                if sampling.greedy:
                    t = target.argmax(-1)
                else:
                    residual = (p - q).clamp(min=0)
                    t = draw(residual / residual.sum() if residual.sum() > 0 else p, gen)
                mark(t)
                stats.new_tokens += 1
                yield t.tolist()
                draft_logits = mtp_draft_logits(engine, t[:, None], h2[:, :1], n)
                engine.advance(1)
                tok = t
            if engine.clock + 2 > engine.max_len:  # the consumer stops at max_new_tokens before this
                return
    finally:
        stats.decode_s = time.perf_counter() - t1
