"""Automatic prefix caching: the cache contents of prompt blocks, kept for the next prompt that starts
the same way (vLLM's automatic prefix caching, Kwon et al. 2023, and its block hashing).

A prompt is cut into blocks of ``block_size`` tokens; block j's key is a hash of block j-1's key and
block j's token ids, so a key names the whole prefix up to the end of its block:

    tokens:  [ t0 .. t15 | t16 .. t31 | t32 .. t40 ]
    keys:      k0 = H(-, t0..t15)   k1 = H(k0, t16..t31)     (the partial block has no key)

The store maps keys to what the decode engine's cache holds for those positions (one tensor per
block, [block_size, width]: every layer's per-position buffers side by side, whatever the
architecture keeps: MLA's latent and rope key, DeepSeek-V3.2's indexer keys, or GQA's K and V). Rope
keys are rotated by position and a block's positions are fixed by its index, so a block fits any
prompt with the same prefix. The store is bounded in bytes and evicts the least recently used block.
Every lookup and insert refreshes a prefix's blocks from its last to its first, so a prefix's later
blocks are always older than its earlier ones and go first: what is evicted is a chain's tail,
never a head that would leave its descendants unreachable.

The engine (:meth:`gasungbi.infer.engine.Engine.join`) calls it twice: before a prefill it looks up
each prompt's longest cached prefix and copies it into the row, then prefills only the rest; after
the prefill it inserts the prompt's full blocks. DeepSeek-V4's cache is not kept per position (its
compressed entries and sliding window are state over the whole row) and does not use the store.

Deviation from vLLM: blocks are copies of the engine's slots (the engine's cache is a fixed slot
array, not a paged one), so a hit costs a copy of the prefix instead of a shared block table entry.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Callable, Sequence

import torch

BLOCK_SIZE = 16
"""Tokens per block (vLLM's default)."""


def block_keys(tokens: Sequence[int], block_size: int = BLOCK_SIZE) -> list[bytes]:
    """The chained keys of the full blocks of ``tokens`` (SHA-256 of the parent's key and the
    block's ids as int64: a key identifies the whole prefix, and a colliding prompt cannot be forged)."""
    keys, parent = [], b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        ids = array("q", tokens[start:start + block_size]).tobytes()
        parent = hashlib.sha256(parent + ids).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Blocks of cache contents by chained key, at most ``capacity_bytes`` in all, least recently used
    evicted first (see the module docstring)."""

    def __init__(self, capacity_bytes: int, block_size: int = BLOCK_SIZE):
        if capacity_bytes < 0 or block_size < 1:
            raise ValueError(f"prefix cache: capacity {capacity_bytes} B must be >= 0, block size {block_size} >= 1")
        self.capacity, self.block_size = capacity_bytes, block_size
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.evicted = 0  # blocks evicted so far

    def __len__(self) -> int:
        return len(self.blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self.blocks

    def match(self, keys: Sequence[bytes]) -> list[torch.Tensor]:
        """The blocks of the longest run ``keys[:n]`` held, first to last; they become the most recent."""
        found = []
        for k in keys:
            if k not in self.blocks:
                break
            found.append(self.blocks[k])
        self._refresh(keys[:len(found)])
        return found

    def insert(self, keys: Sequence[bytes], read: Callable[[int, int], torch.Tensor]) -> int:
        """Store the blocks of one prefix's ``keys`` not held yet; ``read(i, j)`` gives blocks i..j-1
        as one tensor [(j - i) * block_size, width] (read once, for those to store). Older blocks
        are evicted to make room, never this prefix's own: when only they are left, the rest of
        the prefix is not stored. Returns the number of blocks stored."""
        self._refresh(keys)  # this prefix's blocks held become the most recent: evicted last
        first = next((i for i, k in enumerate(keys) if k not in self.blocks), len(keys))
        if first == len(keys):
            return 0
        data = read(first, len(keys))
        mine, stored = set(keys), 0
        for i, k in enumerate(keys[first:]):
            if k in self.blocks:
                continue
            block = data[i * self.block_size:(i + 1) * self.block_size].clone()
            while self.bytes + block.nbytes > self.capacity and self.blocks and next(iter(self.blocks)) not in mine:
                self._evict()
            if self.bytes + block.nbytes > self.capacity:
                break
            self.blocks[k] = block
            self.bytes += block.nbytes
            stored += 1
        self._refresh(keys)
        return stored

    def _refresh(self, keys: Sequence[bytes]) -> None:
        """Make ``keys`` (one prefix's, in order) the most recent, the first one most of all."""
        for k in reversed(keys):
            if k in self.blocks:
                self.blocks.move_to_end(k)

    def _evict(self) -> None:
        _, b = self.blocks.popitem(last=False)
        self.bytes -= b.nbytes
        self.evicted += 1
