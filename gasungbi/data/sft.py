"""Chat SFT data: conversations in the OpenAI messages format, packed into fixed-length rows
with the loss only on assistant tokens.

Input: JSONL, one ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`` per
line; assistant turns may carry OpenAI's ``tool_calls`` and ``{"role": "tool"}`` turns the results
(the template writes both; the calls are trained as assistant tokens). Each conversation is rendered with the chat template (``gasungbi.data.conventions``) and
labelled: targets are the assistant contents and their closing ``<|end|>``; everything else
(bos, role markers, system and user turns) gets the ignore index -100.

Packing: conversations (each starting with ``<|bos|>``) are concatenated in a seeded order into
rows of ``seq_len + 1`` tokens; a conversation that does not fit the rest of a row starts a new
row; the tail of a row is ``<|pad|>`` with ignored labels; a conversation longer than a row is
truncated (and counted). Deviation from per-document attention masking: packed conversations
attend to the earlier ones in their row, as in nanochat and most packed SFT.

The split is by a hash of the conversation (``val_fraction``, at least one conversation each
when there are two or more), so it never depends on order. Rows are held in memory: SFT sets are
small next to pretraining corpora.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gasungbi.data.conventions import END, ROLES
from gasungbi.data.conventions import Conventions
from gasungbi.data.tokenizer import BOS_ID, PAD_ID

IGNORE = -100


class SFTDataError(ValueError):
    """Bad SFT input; the message names the file and line."""


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The ``messages`` lists of a JSONL file, validated (roles, string contents, an assistant turn)."""
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"SFT data {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SFTDataError(f"SFT data {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    convs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SFTDataError(f"{path}:{n}: not JSON ({e.msg})") from None
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise SFTDataError(f"{path}:{n}: expected {{\"messages\": [...]}} with at least one message")
        for m in msgs:
            calls = isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list)
            if not isinstance(m, dict) or m.get("role") not in (*ROLES, "tool") or not (
                    isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
                raise SFTDataError(f"{path}:{n}: each message needs a role in {sorted((*ROLES, 'tool'))} and a string "
                                   f"content (or an assistant's tool_calls), got {str(m)[:80]}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise SFTDataError(f"{path}:{n}: no assistant message to learn from")
        convs.append(msgs)
    if not convs:
        raise SFTDataError(f"{path} holds no conversations")
    return convs


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, train_mask): the chat-template tokens and which of them are assistant targets.

    ``tokenizer``: a tokenizer (gasungbi's template), or a checkpoint's
    :class:`~gasungbi.data.conventions.Conventions`, whose own template is used when it has one."""
    tool_turns = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if tool_turns and not isinstance(tokenizer, Conventions):
        tokenizer = Conventions(tokenizer)
    if isinstance(tokenizer, Conventions):
        if not tokenizer.native or tool_turns:  # tool turns: labelled through the template's renders
            try:
                return tokenizer.chat_ids_and_mask(messages)
            except ValueError as e:
                raise SFTDataError(str(e)) from None
        tokenizer = tokenizer.tokenizer
    ids, mask = [BOS_ID], [False]
    for m in messages:
        marker = tokenizer.encode(ROLES[m["role"]]).ids
        body = tokenizer.encode(m["content"] + END).ids
        ids += marker + body
        mask += [False] * len(marker) + [m["role"] == "assistant"] * len(body)
    return ids, mask


def _is_val(messages: list[dict], val_fraction: float) -> bool:
    h = hashlib.blake2b(json.dumps(messages, sort_keys=True).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


@dataclass
class PackedRows:
    inputs: np.ndarray  # (N, seq_len + 1) token ids
    labels: np.ndarray  # (N, seq_len + 1) ids or IGNORE
    conversations: int
    truncated: int


def pack(tokenizer, convs: list[list[dict]], seq_len: int, seed: int) -> PackedRows:
    order = np.random.default_rng(seed).permutation(len(convs))
    width = seq_len + 1
    rows_i, rows_l, cur_i, cur_l, truncated = [], [], [], [], 0

    def flush():
        if cur_i:
            pad = width - len(cur_i)
            rows_i.append(cur_i + [PAD_ID] * pad)
            rows_l.append(cur_l + [IGNORE] * pad)

    for j in order:
        ids, mask = tokenize_conversation(tokenizer, convs[j])
        labels = [t if keep else IGNORE for t, keep in zip(ids, mask)]
        if len(ids) > width:
            ids, labels, truncated = ids[:width], labels[:width], truncated + 1
        if len(cur_i) + len(ids) > width:
            flush()
            cur_i, cur_l = [], []
        cur_i += ids
        cur_l += labels
    flush()
    return PackedRows(np.array(rows_i, dtype=np.int64), np.array(rows_l, dtype=np.int64), len(convs), truncated)


class SFTLoader:
    """Batches of packed rows: ``next_batch() -> (x, y)`` with y = -100 where not trained.

    Same contract as ``TokenLoader``: deterministic for a seed, epoch-wise permutations, rank r
    takes its slice of each global batch, ``state_dict``/``load_state_dict`` resume exactly.
    """

    def __init__(self, path: str | Path, tokenizer, split: str, batch_size: int, seq_len: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, val_fraction: float = 0.05,
                 conversations: list[list[dict]] | None = None):
        """``conversations``: the file's already-read contents, so train and val loaders read it once."""
        convs = conversations if conversations is not None else read_conversations(path)
        val = [c for c in convs if _is_val(c, val_fraction)]
        train = [c for c in convs if not _is_val(c, val_fraction)]
        if len(convs) >= 2 and not val:
            val, train = train[:1], train[1:]
        chosen = val if split == "val" else train
        if not chosen:
            raise SFTDataError(f"{path}: no conversations in the {split} split ({len(convs)} in all)")
        self.rows = pack(tokenizer, chosen, seq_len, seed)
        if self.rows.truncated:
            warnings.warn(f"{path}: {self.rows.truncated} of {len(chosen)} {split} conversations are longer than "
                          f"{seq_len + 1} tokens and were cut (their ends are not trained); raise --seq-len",
                          stacklevel=2)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.num_windows = len(self.rows.inputs)
        self.position = 0
        self._perms: dict[int, np.ndarray] = {}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.batch_size
        pos = self.position + self.rank * B + np.arange(B)
        idx = np.array([self._permutation(int(p // self.num_windows))[p % self.num_windows] for p in pos])
        self.position += B * self.world_size
        x = torch.from_numpy(self.rows.inputs[idx, :-1].copy())
        y = torch.from_numpy(self.rows.labels[idx, 1:].copy())
        return x, y

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perms[epoch]

    def eval_batches(self, max_batches: int | None = None):
        """Rows in order, ``batch_size`` at a time (validation); global batch k goes to rank
        k % world_size. As for token shards (:func:`gasungbi.data.shards.iter_eval_batches`), the count
        rounds up to a multiple of world_size, batches past the end wrapping to the start, so that every
        rank runs as many forwards (DDP and FSDP forwards are collective)."""
        total = -(-self.num_windows // self.batch_size)
        n = total if max_batches is None else min(total, max_batches)
        for k in range(self.rank, -(-n // self.world_size) * self.world_size, self.world_size):
            sl = slice((k % total) * self.batch_size, (k % total + 1) * self.batch_size)
            yield torch.from_numpy(self.rows.inputs[sl, :-1].copy()), torch.from_numpy(self.rows.labels[sl, 1:].copy())

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "split", "num_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r}")
        self.position = int(state["position"])
