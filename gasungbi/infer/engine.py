"""The decode engine: one slot cache, one step function, for every caller that decodes.

generate/chat (:mod:`gasungbi.infer.decode`), the server's continuous batching
(:mod:`gasungbi.serve.scheduler`), speculative decoding (:mod:`gasungbi.infer.speculative`), GRPO
rollouts, evaluation and the trainer's samples all run an :class:`Engine`.

The cache (gpt-fast's design) is preallocated, R rows x ``max_len`` slots, written in place; where
a token goes and what it sees are tensors, not Python shapes: :func:`forward_step` takes the slots
of its T tokens [T] and each row's first real slot ``pad`` [n], builds the positions
(``slot - pad``) and the mask from them, writes the new latents with ``index_copy_`` and attends
over a fixed window of slots. Its shapes depend only on (rows, T, window), so torch.compile (and
CUDA graphs) take it once per shape: the window grows in powers of two.

Rows share a slot clock ``c`` (the layout of continuous batching); every row holds its sequence
right-aligned so that its next token goes into slot ``c``:

    row 0:  . . [ prompt 0 ....... | generated ] <- c
    row 1:  . . . . . . [ prompt 1 | generated ] <- c
    new  :  . . . . . [ prompt 2 ] <- c          (prefilled into slots [c - L, c))

Row b's real tokens start at slot ``pad[b]``, exactly the left padding of a static batch: a row
computes the same thing whatever its neighbours and whenever it joined. A step is ONE forward of
all running rows at slot ``c``; then ``c`` advances.

* Joining (:meth:`Engine.join`): new sequences are prefilled together (one forward, left-padded to
  the longest, the naive MLA) into the free rows ``n ..``, ending at the clock. With a prefix cache
  (:mod:`gasungbi.infer.prefix_cache`), a prompt's cached blocks are first copied into its row's
  slots and the forward feeds only what follows them; its full blocks are stored after.
* Leaving (:meth:`Engine.remove`): the last running row's cache is copied into the freed row, so
  the batch stays a prefix and every step reads contiguous views.
* Moving: cached keys are rotated by *position*, not by slot, so all rows can be moved by the same
  number of slots (``pad`` moves with them) without changing what they compute. A prompt longer
  than the clock moves the batch right; a clock that reaches ``max_len`` moves it left to the
  longest sequence held. As long as every sequence fits ``max_len`` on its own (prompt +
  max_new_tokens - 1 slots: the caller checks), there is always room after a move.

On CPU the engine routes the small products of a step to native kernels
(:mod:`gasungbi.infer.native`), and ``compile=True`` compiles the step (inductor).
"""

from __future__ import annotations

import time
import types
import warnings
import weakref
from typing import Callable, Sequence

import torch

from gasungbi.infer import direct_step, native
from gasungbi.infer.cache import KVCache
from gasungbi.infer.prefix_cache import PrefixCache, block_keys
from gasungbi.model.attention import DecodeContext

MIN_WINDOW = 64
"""The smallest attention window (slots); windows double from here up to the cache length."""


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Where the token ids go and the activations' dtype: those of the input embedding."""
    w = model.model.embed_tokens.weight
    return w.device, w.dtype


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    """Prompts -> ids [B, P] right-aligned (left-padded with ``pad_id``)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    return ids.to(device)


class CacheView:
    """Cache rows ``lo .. hi-1``, slots ``0 .. window-1``: what one forward writes into and reads.
    ``update`` writes the new tokens' (latent, rope key) or (K, V) at ``slots`` [T] and returns the
    whole window (``update_indexer`` DeepSeek-V3.2's indexer keys); the mask hides what a query must
    not see. A cache kept by position (DeepSeek-V4) is viewed whole rows, without a slot window
    (``window`` 0); its model reads each layer's buffers by name (``state``)."""

    def __init__(self, cache: KVCache, lo: int, hi: int, window: int):
        self.by_position = cache.by_position
        if self.by_position:
            self.layers = [tuple(t[lo:hi] for t in bufs) for bufs in cache.layers]
            self.names, self.window = cache.names, 0
            self.shape_key = tuple(t.shape[1] for bufs in self.layers for t in bufs)  # what max_len changes
            return
        self.layers = [tuple(t[lo:hi, :window] for t in bufs) for bufs in cache.layers]
        self.window, self.shape_key = window, ()

    def state(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """DeepSeek-V4: layer ``layer_idx``'s buffers by name, rows lo..hi-1."""
        return dict(zip(self.names[layer_idx], self.layers[layer_idx]))

    def update(self, layer_idx: int, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor):
        A, B = self.layers[layer_idx][:2]
        A.index_copy_(1, slots, a)
        B.index_copy_(1, slots, b)
        return A, B

    def update_indexer(self, layer_idx: int, keys: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3.2: the lightning indexer's keys, kept beside the latent (a third buffer)."""
        K = self.layers[layer_idx][2]
        K.index_copy_(1, slots, keys)
        return K


def step_mask(slots: torch.Tensor, pad: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [n, T] and mask [n, 1, T, window] for tokens at ``slots`` [T] of rows whose real
    tokens start at ``pad`` [n]: a query sees the keys from its row's first real slot up to its own
    slot, and always its own slot (so padding queries stay finite; they are never read)."""
    key = torch.arange(window, device=slots.device)
    q = slots[None, :, None]  # (1, T, 1)
    mask = ((key <= q) & (key >= pad[:, None, None])) | (key == q)  # (n, T, window)
    return (slots[None, :] - pad[:, None]).clamp(min=0), mask[:, None]


def forward_step(model, ids: torch.Tensor, view: CacheView, slots: torch.Tensor, pad: torch.Tensor,
                 absorb: bool) -> torch.Tensor:
    """Final-normed hidden states [n, T, d] of tokens ``ids`` [n, T] at cache ``slots`` [T] (the
    step function: fixed shapes for a given (n, T, window); ``absorb`` for decoding, V2 Sec. 2.1.2)."""
    positions, mask = step_mask(slots, pad, view.window)
    valid = slots[None, :] >= pad[:, None] if view.by_position else None  # (n, T): not left padding
    ctx = DecodeContext(view, slots, absorb=absorb, mask=mask, positions=positions, valid=valid)
    return model.hidden_states(ids, ctx=ctx)


def decode_logits(model, ids, view, slots, pad) -> torch.Tensor:
    """Next-token logits [n, V] of one decode step (one token per row): what gets compiled."""
    return model.lm_head(forward_step(model, ids, view, slots, pad, True)[:, -1])


class CompiledStep:
    """:func:`decode_logits` compiled for one model, once per shape, shared by all the engines of
    that model.

    Each shape compiles through the ordinary ``torch.compile`` (dynamo's capture, then inductor,
    whose caches make a shape seen in an earlier process cheap). Calls of a compiled shape skip
    dynamo's guards: on CPU the shape's bytecode is called directly, with no cache lookup either
    (:mod:`gasungbi.infer.direct_step`, which checks that the torch internals this needs still
    work); elsewhere, or where they do not, the compiled function is called under
    ``torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)``. Both are keyed by
    :func:`direct_step.key <gasungbi.infer.direct_step.key>`: the shapes, the cache's strides (an
    engine of another ``max_len`` changes them), dtype and device, and the global state the guards
    would check (grad and inference mode, threads, autocast, default dtype). Parameters are read
    from the model at each call (in-place updates and reassigned tensors are seen); a parameter
    replaced by one of another shape or layout, or swapped modules, need a new model object.

    Deviation from torch's own ``aot_compile`` (the same direct call): its cache key holds a fresh
    id per compile, so every shape would recompile from scratch instead of coming from inductor's
    cache. A step that is not one graph (a graph break) warns and is compiled in pieces, called
    with its guards (skipping them would recompile the pieces after the break). CUDA steps replay
    CUDA graphs (inductor's ``triton.cudagraphs``, what ``mode="reduce-overhead"`` sets)."""

    MAX_SHAPES = 8
    """Keys compiled at most; steps of further keys run eagerly."""

    def __init__(self, device: torch.device, backend: str = "inductor"):
        """``backend``: torch.compile's (tests trace with ``"eager"``: dynamo without inductor)."""
        self.internals = direct_step.usable()
        self.direct, self.pieces, self.backend = self.internals and device.type == "cpu", False, backend
        self.device_type = device.type
        # a copy of the code object: its dynamo cache entries are this model's alone
        self.raw = types.FunctionType(decode_logits.__code__.replace(), decode_logits.__globals__, "decode_logits")
        self.fn = self._compile(fullgraph=device.type != "cuda")
        self.shapes: dict[tuple, Callable | None] = {}  # key -> the direct step, or None: self.fn
        self.compiles, self.compile_s = 0, 0.0  # steps that compiled a shape, and their seconds

    def _compile(self, fullgraph: bool) -> Callable:
        if self.backend != "inductor":
            return torch.compile(self.raw, dynamic=False, fullgraph=fullgraph, backend=self.backend)
        if self.internals:
            options = direct_step.inductor_options(self.device_type)
            return torch.compile(self.raw, dynamic=False, fullgraph=fullgraph, options=options)
        mode = "reduce-overhead" if self.device_type == "cuda" else None
        return torch.compile(self.raw, dynamic=False, fullgraph=fullgraph, mode=mode)

    def __call__(self, model, ids, view, slots, pad):
        key = direct_step.key(ids, view.layers[0][0]) + view.shape_key
        if key in self.shapes:
            if (step := self.shapes[key]) is not None:
                return step(model, ids, view, slots, pad)
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.fn(model, ids, view, slots, pad)
        if len(self.shapes) >= self.MAX_SHAPES:
            return decode_logits(model, ids, view, slots, pad)
        t0 = time.perf_counter()
        before = direct_step.cache_entries(self.raw.__code__) if self.direct else None
        try:
            out = self.fn(model, ids, view, slots, pad)
        except direct_step.graph_break() as e:  # which fullgraph refuses
            if self.pieces:
                raise
            warnings.warn(f"decode step: not one graph ({str(e).strip().splitlines()[0]}); compiled in "
                          "pieces, called with guards", stacklevel=3)
            self.direct, self.pieces = False, True
            self.fn = self._compile(fullgraph=False)
            out = self.fn(model, ids, view, slots, pad)
        # in pieces the guards stay on: skipping them recompiles the pieces after the break
        self.shapes[key] = self.fn if self.pieces else self._direct(before) if self.direct else None
        self.compiles, self.compile_s = self.compiles + 1, self.compile_s + time.perf_counter() - t0
        return out

    def _direct(self, before: dict) -> Callable | None:
        """The shape just compiled, as a plain function of its bytecode (no lookup, no guards);
        None where it did not add exactly one cache entry (the step then goes through ``self.fn``)."""
        new = [code for i, code in direct_step.cache_entries(self.raw.__code__).items() if i not in before]
        return direct_step.entry_function(new[0], self.raw.__globals__, "decode_step") if len(new) == 1 else None


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_step(model) -> CompiledStep:
    """The model's compiled step (made at first use)."""
    if model not in _COMPILED:
        _COMPILED[model] = CompiledStep(model_device_dtype(model)[0])
    return _COMPILED[model]


class Engine:
    """R cache rows of ``max_len`` slots, a shared clock, and the step function.

    The caller keeps its own list of sequences in row order and mirrors :meth:`join` (appends)
    and :meth:`remove` (the last row moves into the removed one). ``prefix_cache_bytes`` > 0 keeps
    the prompts' blocks for later prompts that start the same way (:mod:`gasungbi.infer.prefix_cache`;
    not for a cache kept by position, DeepSeek-V4's: ``prefix`` is then None).
    """

    def __init__(self, model, rows: int, max_len: int, *, compile: bool = False, prefix_cache_bytes: int = 0):
        cfg = model.config
        device, dtype = model_device_dtype(model)
        if device.type == "cpu":
            native.accelerate(model)
        self.model, self.rows, self.max_len, self.device = model, rows, max_len, device
        self.cache = KVCache(cfg, rows, max_len, device=device, dtype=dtype)
        self.clock = 0
        self.pads: list[int] = []  # per running row: its first real slot
        self.moves = 0  # how many times the batch was moved (a copy of the cache window)
        self._views: dict[tuple[int, int, int], CacheView] = {}
        self._decode = compiled_step(model) if compile else decode_logits
        use_prefix = prefix_cache_bytes > 0 and not self.cache.by_position
        self.prefix = PrefixCache(prefix_cache_bytes) if use_prefix else None
        self.cached: list[int] = []  # per prompt of the latest join: its first tokens not prefilled (prefix cache)

    @property
    def size(self) -> int:
        return len(self.pads)

    @property
    def tokens_held(self) -> int:
        """Slots holding real tokens, all rows together (for the KV-cache use figure)."""
        return sum(self.clock - p for p in self.pads)

    def window(self, end: int) -> int:
        """The attention window for slots up to ``end``: a power of two >= MIN_WINDOW, or max_len."""
        w = MIN_WINDOW
        while w < end:
            w *= 2
        return min(w, self.max_len)

    def view(self, lo: int, hi: int, end: int) -> CacheView:
        """Rows lo..hi-1 and the window for slots up to ``end`` (views kept per shape: a step makes none)."""
        if end > self.max_len:
            raise ValueError(f"slot {end} is past the cache length {self.max_len}")
        key = (lo, hi, self.window(end))
        if key not in self._views:
            self._views[key] = CacheView(self.cache, *key)
        return self._views[key]

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
        for buf in (t for pair in self.cache.layers for t in pair if not self.cache.by_position):
            buf[:n, new_clock - w:new_clock] = buf[:n, self.clock - w:self.clock].clone()
        self.pads = [p + shift for p in self.pads]
        self.clock = new_clock
        self.moves += 1

    def _slots(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.device)

    def _pad(self, lo: int, hi: int) -> torch.Tensor:
        return torch.tensor(self.pads[lo:hi], device=self.device)

    @torch.inference_mode()
    def join(self, prompts: Sequence[Sequence[int]], all_logits: Sequence[bool] | None = None,
             hidden: bool = False) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Prefill ``prompts`` (one forward) into rows ``size ..`` and add them to the batch.

        Returns the logits of each prompt's last position [k, V] (the first new token comes from
        them) and, for the prompts flagged in ``all_logits``, the logits of every position [L, V]
        (prompt scoring); with ``hidden``, the hidden states [k, P, d] instead of that list
        (speculative decoding drafts from them).

        With a prefix cache, each prompt's longest cached prefix is copied into its row first and
        the forward covers the longest uncached rest of the batch, P tokens (a row whose rest is
        shorter recomputes some of its cached tokens: ``cached`` counts those it did not); the
        prompts' full blocks are stored after it. Prompts flagged in ``all_logits`` and ``hidden``
        joins prefill everything (they need every position's output).
        """
        lengths = [len(p) for p in prompts]
        if not self.fits(lengths):
            raise ValueError(f"{len(prompts)} prompts (longest {max(lengths)}) do not fit: {self.size} of "
                             f"{self.rows} rows in use, {self.max_len} slots per row")
        if not self.size:
            self.clock = max(lengths)
        elif max(lengths) > self.clock:
            self._move(max(lengths))
        c, k, lo = self.clock, len(prompts), self.size
        self.pads += [c - L for L in lengths]
        whole = [hidden or bool(all_logits and all_logits[i]) for i in range(k)]
        hits, keys = self._lookup(prompts, whole)  # each prompt's cached prefix [h, width]
        P = max(L - len(h) for L, h in zip(lengths, hits))  # the tokens this forward feeds, per row
        self.cached = [max(L - P, 0) for L in lengths]
        for i, hit in enumerate(hits):
            self._write(lo + i, self.pads[lo + i], hit[:self.cached[i]])
        ids = left_pad([p[max(len(p) - P, 0):] for p in prompts], 0, self.device)  # (k, P): each row's last P
        h = forward_step(self.model, ids, self.view(lo, lo + k, c), self._slots(c - P, P), self._pad(lo, lo + k),
                         absorb=False)  # (k, P, d)
        for i, row_keys in enumerate(keys):
            self._store(row_keys, lo + i)
        last = self.model.lm_head(h[:, -1])  # (k, V)
        if hidden:
            return last, h
        full: list[torch.Tensor | None] = [None] * k
        for i, want in enumerate(all_logits or ()):
            if want:
                full[i] = self.model.lm_head(h[i, P - lengths[i]:])  # (L, V)
        return last, full

    # --- the prefix cache ----------------------------------------------------------------------

    def _buffers(self) -> list[torch.Tensor]:
        """The per-position buffers a prefill writes: every main layer's (MTP layers are not prefilled)."""
        return [t for bufs in self.cache.layers[:self.model.config.num_hidden_layers] for t in bufs]

    def _lookup(self, prompts, whole: list[bool]) -> tuple[list[torch.Tensor], list[list[bytes]]]:
        """Per prompt: its cached prefix [h, width] (h <= L - 1: one token is left to prefill, for
        the logits; h = 0 where ``whole``), and its full blocks' keys (to store after the prefill)."""
        empty = torch.empty(0, device=self.device)
        if self.prefix is None:
            return [empty] * len(prompts), [[] for _ in prompts]
        keys = [block_keys(p, self.prefix.block_size) for p in prompts]
        hits = []
        for p, row_keys, w in zip(prompts, keys, whole):
            blocks = [] if w else self.prefix.match(row_keys)
            hits.append(torch.cat(blocks)[:len(p) - 1] if blocks else empty)
        return hits, keys

    def _write(self, row: int, start: int, data: torch.Tensor) -> None:
        """Copy ``data`` [n, width] (each buffer's channels side by side) into slots start.. of ``row``."""
        col, n = 0, data.shape[0]
        for buf in self._buffers() if n else ():
            w = buf[0, 0].numel()
            buf[row, start:start + n] = data[:, col:col + w].reshape(n, *buf.shape[2:])
            col += w

    def _read(self, row: int, start: int, end: int) -> torch.Tensor:
        """Slots start..end-1 of ``row``, every buffer's channels side by side: [end - start, width]."""
        return torch.cat([buf[row, start:end].reshape(end - start, -1) for buf in self._buffers()], dim=1)

    def _store(self, keys: list[bytes], row: int) -> None:
        """Keep the full blocks of the prompt just prefilled into ``row`` (those not held yet)."""
        if self.prefix is None or not keys:
            return
        B, pad = self.prefix.block_size, self.pads[row]
        self.prefix.insert(keys, lambda i, j: self._read(row, pad + i * B, pad + j * B))

    def _room(self, t: int) -> None:
        if self.clock + t > self.max_len:  # out of slots: move left, to the longest sequence held
            self._move(max(self.clock - p for p in self.pads))

    @torch.inference_mode()
    def step(self, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Feed one token per running row at slot ``clock``; returns the next-token logits [n, V]."""
        n = self.size
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1, 1)  # (n, 1)
        if ids.shape[0] != n:
            raise ValueError(f"{ids.shape[0]} tokens for {n} running rows")
        self._room(1)
        logits = self._decode(self.model, ids, self.view(0, n, self.clock + 1), self._slots(self.clock, 1),
                              self._pad(0, n))
        self.clock += 1
        return logits

    @torch.inference_mode()
    def verify(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed T tokens per running row at slots ``clock ..``; returns their hidden states
        [n, T, d] and does NOT advance the clock: the caller calls :meth:`advance` with the
        number it keeps (speculative decoding; slots beyond the clock are overwritten later)."""
        n, T = ids.shape
        self._room(T)
        return forward_step(self.model, ids, self.view(0, n, self.clock + T), self._slots(self.clock, T),
                            self._pad(0, n), absorb=True)

    def advance(self, t: int) -> None:
        self.clock += t

    @torch.inference_mode()
    def mtp(self, module, emb: torch.Tensor, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Run MTP ``module`` (its own cache layer) on Emb(t_{i+1}) and h_i [n, T, d] for the
        tokens at slots ``start ..``; returns its final-normed hidden states [n, T, d]."""
        n, T = emb.shape[:2]
        slots = self._slots(start, T)
        view = self.view(0, n, start + T)
        positions, mask = step_mask(slots, self._pad(0, n), view.window)
        cos, sin = self.model.model.rotary(positions)
        ctx = DecodeContext(view, slots, absorb=T == 1, mask=mask, positions=positions)
        return module(emb, hidden, cos, sin, ctx=ctx)[1]

    def remove(self, i: int) -> None:
        """Free row ``i``: the last running row moves into it (its cache is copied)."""
        last = self.size - 1
        if not 0 <= i <= last:
            raise IndexError(f"row {i} is not running (batch of {self.size})")
        if i != last:
            lo = self.pads[last]
            for buf in (t for pair in self.cache.layers for t in pair):
                if self.cache.by_position:  # the whole row
                    buf[i] = buf[last]
                else:
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
