"""The scheduler: one model, one background thread, continuous batching.

Request handlers (asyncio) turn each choice of a request into a :class:`Sequence` and
:meth:`Scheduler.submit` them to a bounded FIFO queue (full: :class:`QueueFull`, answered 429).
The scheduler thread loops:

  1. admit: take waiting sequences, oldest first, while there are free rows in the running batch
     (:class:`~gasungbi.infer.engine.Engine`) and prefill budget left; prefill them together
     (one forward) and sample their first token;
  2. step: ONE batched forward of every running sequence, one token each;
  3. retire: sequences that finished (stop token, stop string, max_tokens) or whose client went
     away (:meth:`Scheduler.cancel`) leave the batch and free their cache row at once.

Tokens go back to the handlers through thread-safe ``emit`` callbacks (in the app: into the
request's asyncio queue, one ``loop.call_soon_threadsafe`` wake-up per batch of events). torch
releases the GIL in its kernels, so the event loop keeps serving HTTP while the model runs.

Each sequence samples with its own ``torch.Generator`` from its own row of logits, so a seeded
request gives the same tokens whatever else is in the batch; stops and incremental detokenization
are :mod:`gasungbi.infer.generate`'s (``RowState``), as in ``gasungbi generate``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

import torch

from gasungbi.infer.engine import Engine, model_device_dtype, prompt_logits
from gasungbi.infer.decode import seen_mask
from gasungbi.infer.generate import RowState
from gasungbi.infer.sampling import SamplingParams, sample
from gasungbi.serve.metrics import Metrics

log = logging.getLogger("gasungbi.serve")


class QueueFull(Exception):
    """The waiting queue cannot take these sequences now."""


@dataclass
class PromptLogprobs:
    """Log-probabilities of a prompt's tokens under the model (the first token has none)."""

    token_logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class Event:
    """What a sequence reports to its handler: a token and the text it makes final, the end
    (``finish_reason``), the prompt's log-probabilities (echo), or an error."""

    index: int
    text: str = ""
    token: int | None = None
    finish_reason: str | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One choice of one request: a prompt, how to sample it, when to stop, where events go.

    ``max_new=0`` scores the prompt only (echo with logprobs). ``logprobs``: None, or how many
    top alternatives to report per token.
    """

    index: int
    prompt: list[int]
    max_new: int
    sampling: SamplingParams
    emit: Callable[[Event], None]
    tokenizer: object = None
    stop_tokens: Seq[int] = ()
    stop_strings: Seq[str] = ()
    logprobs: int | None = None
    echo: bool = False
    constraint: object = None  # a gasungbi.infer.grammar.Constraint the reply must follow
    arrival: float = field(default_factory=time.monotonic)
    # state, written by the scheduler thread
    cancelled: bool = False
    finish_reason: str | None = None
    produced: int = 0
    last: int = 0
    cached: int = 0  # prompt tokens whose cache came from the prefix cache (not prefilled)

    def __post_init__(self) -> None:
        self.row = RowState(self.index, list(self.prompt), max(self.max_new, 1), set(self.stop_tokens),
                        self.stop_strings, self.tokenizer)
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor | None = None

    def _setup(self, device: torch.device, vocab_size: int) -> None:
        seed = self.sampling.seed if self.sampling.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        if self.sampling.repetition_penalty != 1.0:
            self.seen = seen_mask([self.prompt], vocab_size, device)

    def _send(self, event: Event) -> None:
        try:
            self.emit(event)
        except Exception:  # the handler's loop is gone: nobody listens any more
            self.cancelled = True


def _logprobs_of(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[list[float], list[list]]:
    """log-softmax of logits [T, V] at targets [T], and the top ``k`` (id, logprob) of each row."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
    if k <= 0:
        return chosen, [[] for _ in chosen]
    vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]


class Scheduler:
    """Continuous batching of one model (see the module docstring).

    ``max_batch``: cache rows (sequences decoded together); ``max_len``: slots per row;
    ``max_queue``: sequences allowed to wait; ``max_prefill_tokens``: prompt tokens prefilled
    between two decode steps (at least one prompt always is); ``prefix_cache_bytes``: the bound of
    the engine's prefix cache (0: off).
    """

    def __init__(self, model, max_batch: int = 16, max_len: int | None = None, max_queue: int = 64,
                 max_prefill_tokens: int = 4096, metrics: Metrics | None = None, compile: bool = False,
                 prefix_cache_bytes: int = 0):
        self.model = model
        self.device, _ = model_device_dtype(model)
        self.max_len = min(max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.batch = Engine(model, max_batch, self.max_len, compile=compile, prefix_cache_bytes=prefix_cache_bytes)
        self.max_queue, self.max_prefill_tokens = max_queue, max_prefill_tokens
        self.metrics = metrics or Metrics()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="gasungbi-scheduler", daemon=True)

    # --- the handlers' side ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def warmup(self) -> None:
        """A throwaway prefill and step (before :meth:`start`), so that the first request is not the slow one."""
        with torch.inference_mode():
            self.batch.join([[0, 0]])
            self.batch.step([0])
            self.batch.remove(0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def submit(self, seqs: Seq[Sequence]) -> None:
        """Queue ``seqs`` (all or none); :class:`QueueFull` when the queue has no room for them."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences waiting (limit {self.max_queue})")
            self.waiting.extend(seqs)
            self._cond.notify()

    def cancel(self, seqs: Seq[Sequence]) -> None:
        """Drop ``seqs`` (their client went away): from the queue now, from the batch at the next step."""
        with self._cond:
            for s in seqs:
                if s.finish_reason is None and not s.cancelled:
                    s.cancelled = True
                    if s in self.waiting:
                        self.waiting.remove(s)
                        self.metrics.cancel()
            self._cond.notify()

    def gauges(self) -> dict[str, tuple[str, float]]:
        b = self.batch
        return {
            "gasungbi_queue_depth": ("Sequences waiting to join the batch.", len(self.waiting)),
            "gasungbi_running_sequences": ("Sequences in the running decode batch.", len(self.running)),
            "gasungbi_kv_cache_usage_ratio": ("Cache slots holding tokens / all slots (rows x max_len).",
                                              b.tokens_held / (b.rows * b.max_len)),
            "gasungbi_kv_cache_rows_used": ("Cache rows in use.", b.size),
            "gasungbi_kv_cache_rows": ("Cache rows (the largest decode batch).", b.rows),
            "gasungbi_prefix_cache_bytes": ("Bytes of prompt blocks kept by the prefix cache.",
                                            b.prefix.bytes if b.prefix else 0),
        }

    # --- the scheduler thread ----------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self.waiting and not self.running:
                        self._cond.wait()
                    if self._closed:
                        return
                    admitted, scored = self._take()
                try:
                    for s in scored:
                        self._score(s)
                    if admitted:
                        self._prefill(admitted)
                    self._retire()
                    if self.running:
                        self._step()
                        self._retire()
                except Exception as e:  # a bug or out of memory: fail these sequences, keep serving
                    log.exception("scheduler step failed")
                    for s in self.running + [s for s in admitted if s not in self.running]:
                        s.finish_reason = "error"
                        s._send(Event(s.index, error=f"{type(e).__name__}: {e}"))
                    self.running.clear()
                    while self.batch.size:
                        self.batch.remove(self.batch.size - 1)

    def _take(self) -> tuple[list[Sequence], list[Sequence]]:
        """Pop the waiting sequences that start now (oldest first): to prefill, and to score."""
        admitted: list[Sequence] = []
        scored: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting:
            s = self.waiting[0]
            if s.cancelled:
                self.waiting.popleft()
                continue
            if (admitted or scored) and len(s.prompt) > budget:
                break
            if s.max_new > 0:
                if not self.batch.fits([len(c.prompt) for c in admitted + [s]]):
                    if len(s.prompt) >= self.max_len:  # never fits (the handler checks this first)
                        self.waiting.popleft()
                        s.finish_reason = "error"
                        s._send(Event(s.index, error=f"a prompt of {len(s.prompt)} tokens does not fit "
                                                     f"{self.max_len} cache slots"))
                        continue
                    break  # no free row now
                admitted.append(s)
            else:
                scored.append(s)
            self.waiting.popleft()
            budget -= len(s.prompt)
        return admitted, scored

    def _score(self, s: Sequence) -> None:
        logits = prompt_logits(self.model, s.prompt)
        s.finish_reason = "length"
        s._send(Event(s.index, prompt_logprobs=self._prompt_logprobs(s, logits), finish_reason="length"))

    def _prompt_logprobs(self, s: Sequence, logits: torch.Tensor) -> PromptLogprobs:
        targets = torch.tensor(s.prompt[1:], dtype=torch.long, device=logits.device)
        chosen, top = _logprobs_of(logits[:-1], targets, s.logprobs or 0)
        return PromptLogprobs([None] + chosen, [None] + top)

    def _prefill(self, seqs: list[Sequence]) -> None:
        V = self.model.config.vocab_size
        ok = []
        for s in seqs:  # a sequence that cannot start fails alone
            try:
                s._setup(self.device, V)
                ok.append(s)
            except Exception as e:
                s.finish_reason = "error"
                s._send(Event(s.index, error=f"{type(e).__name__}: {e}"))
        if not ok:
            return
        seqs = ok
        last, full = self.batch.join([s.prompt for s in seqs], [s.echo and s.logprobs is not None for s in seqs])
        self.running.extend(seqs)
        for s, n in zip(seqs, self.batch.cached):
            s.cached = n
        self.metrics.add_prompt_tokens(sum(len(s.prompt) for s in seqs), sum(self.batch.cached))
        for s, f in zip(seqs, full):
            if f is not None:
                s._send(Event(s.index, prompt_logprobs=self._prompt_logprobs(s, f)))
        self._deliver(seqs, last)

    def _step(self) -> None:
        logits = self.batch.step([s.last for s in self.running])
        self.metrics.step(len(self.running))
        self._deliver(self.running, logits)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row, each row with its own sampling parameters and generator; a row with a
        grammar samples among the tokens it allows (only those rows pay for the mask)."""
        constrained = [i for i, s in enumerate(seqs) if s.constraint is not None]
        if constrained:
            logits = logits.clone()
            for i in constrained:
                logits[i].masked_fill_(~seqs[i].constraint.mask(logits.device), float("-inf"))
        tokens = self._draw(logits, seqs)
        for i in constrained:
            seqs[i].constraint.accept(tokens[i])
        return tokens

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        plain = [s.sampling.greedy and s.seen is None for s in seqs]
        if all(plain):
            return logits.argmax(dim=-1).tolist()
        out = logits.argmax(dim=-1)
        for i, s in enumerate(seqs):
            if not plain[i]:
                out[i] = sample(logits[i:i + 1], s.sampling, s.generator, s.seen)[0]
        tokens = out.tolist()
        for s, t in zip(seqs, tokens):
            if s.seen is not None:
                s.seen[0, t] = True
        return tokens

    def _deliver(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = self._sample(logits, seqs)
        now, delivered = time.monotonic(), 0
        for i, (s, tok) in enumerate(zip(seqs, tokens)):
            if s.cancelled or s.finish_reason is not None:
                continue
            delivered += 1
            if s.produced == 0:
                self.metrics.ttft(now - s.arrival)
            s.produced += 1
            s.last = tok
            delta = s.row.push(tok)
            ev = Event(s.index, delta.text, tok, delta.finish_reason)
            if s.logprobs is not None:
                (ev.logprob,), (ev.top,) = _logprobs_of(logits[i:i + 1], torch.tensor([tok], device=logits.device),
                                                        s.logprobs)
            if delta.finish_reason is not None:
                s.finish_reason = delta.finish_reason
            s._send(ev)
        self.metrics.add_tokens(delivered)

    def _retire(self) -> None:
        done = [i for i, s in enumerate(self.running) if s.finish_reason is not None or s.cancelled]
        for i in reversed(done):
            s = self.running[i]
            if s.finish_reason is None:
                self.metrics.cancel()
            self.batch.remove(i)
            self.running[i] = self.running[-1]
            self.running.pop()
