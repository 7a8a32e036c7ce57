"""Continuous batching: sequences join and leave a running decode batch between steps.

:class:`SlotBatch` keeps a preallocated cache of R rows x ``max_len`` slots and a shared slot
clock ``c``. The running batch is always the prefix of rows ``0 .. n-1``; every row holds its
sequence right-aligned so that its next token goes into slot ``c``:

    row 0:  . . [ prompt 0 ....... | generated ] <- c
    row 1:  . . . . . . [ prompt 1 | generated ] <- c
    new  :  . . . . . [ prompt 2 ] <- c          (prefilled into slots [c - L, c))

Row b's real tokens start at slot ``pad[b]``, exactly the left padding of a static batch
(:mod:`gasungbi.infer.generate`): the model gets per-row positions ``slot - pad[b]`` and a mask
hiding the slots before ``pad[b]``, so a sequence computes the same thing whatever its neighbours
and whenever it joined. One step is ONE forward of all running rows, one token each, at slot
``c``; then ``c`` advances.

* Joining (:meth:`SlotBatch.join`): new sequences are prefilled together (one forward, left-padded
  to the longest) into the free rows ``n ..``, ending at the clock, and take part in the next step.
* Leaving (:meth:`SlotBatch.remove`): the last running row's cache is copied into the freed row,
  so the batch stays a prefix and every step reads contiguous views (no gather).
* Moving: cached keys are rotated by *position*, not by slot, so all rows can be moved by the same
  number of slots (``pad`` moves with them) without changing what they compute. A prompt longer
  than the clock moves the batch right (the clock becomes the prompt's length); a clock that
  reaches ``max_len`` moves it left to the longest sequence held. As long as every sequence fits
  ``max_len`` on its own (prompt + max_new_tokens - 1 slots: the caller checks), there is always
  room after a move, so nothing is reserved ahead: any free row can take a newcomer at once.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gasungbi.infer.cache import KVCache
from gasungbi.infer.decode import left_pad, model_device_dtype
from gasungbi.model.attention import DecodeContext


class RowsView:
    """Cache rows ``lo .. hi-1`` as the cache object the model writes into (``update``)."""

    def __init__(self, cache: KVCache, lo: int, hi: int):
        self.cache, self.lo, self.hi = cache, lo, hi

    def update(self, layer_idx: int, a: torch.Tensor, b: torch.Tensor, start_pos: int):
        end = start_pos + a.shape[1]
        if end > self.cache.max_len:
            raise ValueError(f"slot {end} is past the cache length {self.cache.max_len}")
        A, B = self.cache.layers[layer_idx]
        A[self.lo:self.hi, start_pos:end] = a
        B[self.lo:self.hi, start_pos:end] = b
        return A[self.lo:self.hi, :end], B[self.lo:self.hi, :end]


class SlotBatch:
    """The running batch of continuous batching: R cache rows of ``max_len`` slots, a shared clock.

    The caller keeps its own list of sequences in row order and mirrors :meth:`join` (appends)
    and :meth:`remove` (the last row moves into the removed one).
    """

    def __init__(self, model, rows: int, max_len: int):
        cfg = model.config
        device, dtype = model_device_dtype(model)
        self.model, self.rows, self.max_len, self.device = model, rows, max_len, device
        self.cache = KVCache(cfg, rows, max_len, device=device, dtype=dtype)
        self.clock = 0
        self.pads: list[int] = []  # per running row: its first real slot
        self.moves = 0  # how many times the batch was moved (a copy of the cache window)

    @property
    def size(self) -> int:
        return len(self.pads)

    @property
    def tokens_held(self) -> int:
        """Slots holding real tokens, all rows together (for the KV-cache use figure)."""
        return sum(self.clock - p for p in self.pads)

    def fits(self, lengths: Sequence[int]) -> bool:
        """Whether prompts of ``lengths`` can join now: free rows, and each prompt shorter than
        ``max_len`` (its prompt + max_new_tokens - 1 must fit ``max_len`` too: the caller's check)."""
        return self.size + len(lengths) <= self.rows and max(lengths) < self.max_len

    def _move(self, new_clock: int) -> None:
        """Move every running row by ``new_clock - clock`` slots (positions are unchanged)."""
        shift = new_clock - self.clock
        if shift == 0 or not self.size:
            self.clock = new_clock
            return
        n, w = self.size, max(self.clock - p for p in self.pads)
        if w > new_clock or new_clock > self.max_len:
            raise ValueError(f"cannot move {w} slots to end at {new_clock} (max_len {self.max_len})")
        for buf in (t for pair in self.cache.layers for t in pair):
            buf[:n, new_clock - w:new_clock] = buf[:n, self.clock - w:self.clock].clone()
        self.pads = [p + shift for p in self.pads]
        self.clock = new_clock
        self.moves += 1

    @torch.inference_mode()
    def join(self, prompts: Sequence[Sequence[int]],
             all_logits: Sequence[bool] | None = None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Prefill ``prompts`` (one forward) into rows ``size ..`` and add them to the batch.

        Returns the logits of each prompt's last position [k, V] (the first new token comes from
        them) and, for the prompts flagged in ``all_logits``, the logits of every position
        [L, V] (prompt scoring).
        """
        lengths = [len(p) for p in prompts]
        if not self.fits(lengths):
            raise ValueError(f"{len(prompts)} prompts (longest {max(lengths)}) do not fit: {self.size} of "
                             f"{self.rows} rows in use, {self.max_len} slots per row")
        if not self.size:
            self.clock = max(lengths)
        elif max(lengths) > self.clock:
            self._move(max(lengths))
        c, k, P, lo = self.clock, len(prompts), max(lengths), self.size
        ids, _ = left_pad(prompts, 0, self.device)  # (k, P)
        pads = [c - L for L in lengths]
        pad = torch.tensor(pads, device=self.device)
        ctx = DecodeContext(RowsView(self.cache, lo, lo + k), c - P, pad)
        h = self.model.hidden_states(ids, ctx=ctx)  # (k, P, d)
        last = self.model.lm_head(h[:, -1])  # (k, V)
        full: list[torch.Tensor | None] = [None] * k
        for i, want in enumerate(all_logits or ()):
            if want:
                full[i] = self.model.lm_head(h[i, P - lengths[i]:])  # (L, V)
        self.pads += pads
        return last, full

    @torch.inference_mode()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token per running row at slot ``clock``; returns the next-token logits [n, V]."""
        n = self.size
        if len(tokens) != n:
            raise ValueError(f"{len(tokens)} tokens for {n} running rows")
        if self.clock == self.max_len:  # out of slots: move left, to the longest sequence held
            self._move(max(self.clock - p for p in self.pads))
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]  # (n, 1)
        pad = torch.tensor(self.pads, device=self.device)
        ctx = DecodeContext(RowsView(self.cache, 0, n), self.clock, pad, absorb=True)
        logits = self.model(ids, ctx=ctx)[:, -1]
        self.clock += 1
        return logits

    def remove(self, i: int) -> None:
        """Free row ``i``: the last running row moves into it (its cache is copied)."""
        last = self.size - 1
        if not 0 <= i <= last:
            raise IndexError(f"row {i} is not running (batch of {self.size})")
        if i != last:
            lo = self.pads[last]
            for buf in (t for pair in self.cache.layers for t in pair):
                buf[i, lo:self.clock] = buf[last, lo:self.clock]
            self.pads[i] = self.pads[last]
        self.pads.pop()
        if not self.pads:
            self.clock = 0


@torch.inference_mode()
def prompt_logits(model, prompt: Sequence[int]) -> torch.Tensor:
    """Logits [L, V] of every position of ``prompt`` (one forward, no cache): prompt scoring."""
    device, _ = model_device_dtype(model)
    return model(torch.tensor([list(prompt)], dtype=torch.long, device=device))[0]
