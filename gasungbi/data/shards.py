"""Token shards: tokenize a corpus into flat binary files, then read them back as batches.

A shard folder holds
    manifest.json                 what is here (Manifest): dtype, vocab, token/byte counts, tokenizer hash
    train_000.bin, train_001.bin  flat token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    val_000.bin, ...

Each document is stored as `<|bos|> tokens <|eos|>` (both on by default): bos marks a document
start, which is also how generation starts, and eos teaches the model to stop. The stream of
documents is cut into shards of `shard_tokens` tokens, wherever the cut falls.

Train/validation split (independent of chunking, thread count and document order): a document
goes to val when blake2b(its UTF-8 bytes) / 2**64 < val_fraction. The one exception is the
document with the smallest hash, decided last: it goes to train if train would otherwise be empty,
else to val (when val_fraction > 0). So with >= 2 documents both splits are non-empty, and a
one-document corpus is all train. Identical documents always land in the same split.

Parallelism: `tokenizers`' encode_batch, which tokenizes a chunk of documents on all cores in Rust
with the GIL released. Worker processes would also parallelize the small Python part (hashing,
array building) but must ship the tokenizer and every document between processes, and forking a
process that already used the tokenizers thread pool is unsafe; one process keeps this simple and
keeps tokenization the bottleneck. Set RAYON_NUM_THREADS before starting Python to cap the threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from gasungbi import atomic

from .tokenizer import BOS_TOKEN, EOS_TOKEN, tokenizer_hash

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard
CHUNK_DOCS = 1024  # documents tokenized per encode_batch call ...
CHUNK_CHARS = 16 * 2**20  # ... or fewer, once they hold this many characters
SPLITS = ("train", "val")
_SHARD_FILE = re.compile(r"(train|val)_\d{3,}\.bin(\.tmp)?")


def is_shard_file(name: str) -> bool:
    """Whether a file name is one of the shard files :func:`build_shards` writes."""
    return _SHARD_FILE.fullmatch(name) is not None


@dataclass
class ShardInfo:
    file: str  # name inside the shard folder
    tokens: int


@dataclass
class SplitInfo:
    """Counts for one split. `tokens` include bos/eos; `bytes` are the documents' UTF-8 bytes."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float:
        """For bits-per-byte: bits/byte = (mean nats/token) / ln 2 / bytes_per_token."""
        return self.bytes / self.tokens if self.tokens else 0.0


@dataclass
class Manifest:
    """The contents of a shard folder, stored as manifest.json."""

    dtype: str  # "uint16" or "uint32", little-endian
    vocab_size: int
    tokenizer_hash: str  # tokenizer.tokenizer_hash of the tokenizer that made the shards
    source: str  # description of the corpus (corpus.describe_source)
    val_fraction: float
    bos_id: int | None  # prepended to every document, or None
    eos_id: int | None  # appended to every document, or None
    splits: dict[str, SplitInfo]
    version: int = MANIFEST_VERSION

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype).newbyteorder("<")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        splits = {}
        for name, split in raw.pop("splits").items():
            shards = [ShardInfo(**shard) for shard in split.pop("shards")]
            splits[name] = SplitInfo(**split, shards=shards)
        return cls(**raw, splits=splits)


def build_shards(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    prepend_bos: bool = True,
    append_eos: bool = True,
    source: str = "",
    progress: bool = True,
) -> Manifest:
    """Tokenizes `documents` into train/val shards in `out_dir` and returns the manifest written.

    Documents are streamed in chunks, never held whole. A previous build in `out_dir` (its
    manifest and shard files) is removed first; the manifest is written last, atomically, after
    every shard is complete, so a folder with a manifest never points at partial shards.
    Empty documents are skipped. `source` is recorded in the manifest.
    """
    if isinstance(documents, str):
        raise TypeError("documents must be an iterable of strings, got one str (wrap it in a list)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    bos = [_special_id(tokenizer, BOS_TOKEN)] if prepend_bos else []
    eos = [_special_id(tokenizer, EOS_TOKEN)] if append_eos else []
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.name == MANIFEST or _SHARD_FILE.fullmatch(old.name):
            old.unlink()
    encoder = Tokenizer.from_str(tokenizer.to_str())
    encoder.encode_special_tokens = True  # "<|eos|>" inside a document is text, not a control token
    writers = {split: _ShardWriter(out, split, dtype, shard_tokens) for split in SPLITS}
    val_below = int(val_fraction * 2**64)
    pending: _Doc | None = None  # the smallest-hash document so far, whose split is decided last
    n_docs = 0
    with tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress) as bar:
        for chunk in _chunks(documents):
            raw = [text.encode("utf-8") for text in chunk]
            for data, enc in zip(raw, encoder.encode_batch_fast(chunk, add_special_tokens=False)):
                doc = _Doc(_doc_hash(data), np.array(bos + enc.ids + eos, dtype=dtype), len(data))
                if pending is None or doc.hash < pending.hash:
                    doc, pending = pending, doc
                if doc is not None:
                    writers["val" if doc.hash < val_below else "train"].add(doc)
            for writer in writers.values():
                writer.flush()
            n_docs += len(chunk)
            bar.update(sum(map(len, raw)))
            bar.set_postfix(docs=n_docs)
    if pending is None:
        raise ValueError("no documents to shard (the iterable was empty or held only empty strings)")
    writers["val" if val_fraction > 0 and writers["train"].info.documents > 0 else "train"].add(pending)
    manifest = Manifest(
        dtype=dtype.name,
        vocab_size=vocab_size,
        tokenizer_hash=tokenizer_hash(tokenizer),
        source=source,
        val_fraction=val_fraction,
        bos_id=bos[0] if bos else None,
        eos_id=eos[0] if eos else None,
        splits={split: writer.close() for split, writer in writers.items()},
    )
    atomic.write_text(out / MANIFEST, manifest.to_json(), fsync=True)
    return manifest


def load_manifest(shard_dir: str | Path) -> Manifest:
    """Reads `shard_dir`/manifest.json; a clear error if it is missing or malformed."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {shard_dir}: not a shard folder, or its build did not finish")
    try:
        manifest = Manifest.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid shard manifest: {e!r}") from e
    if manifest.version != MANIFEST_VERSION:
        raise ValueError(f"{path} has manifest version {manifest.version}; this code reads {MANIFEST_VERSION}")
    return manifest


class TokenLoader:
    """Random [B, T] training batches from one split, deterministic and exactly resumable.

    Windows: each shard is cut into inputs of seq_len tokens starting every seq_len tokens; a
    window reads seq_len + 1 tokens so y is x shifted by one, and every token of a shard but the
    first is a target once per epoch. Windows never cross a shard end (a shard's last < seq_len
    tokens are unused). Nothing is read into RAM but the batch: shards are memory-mapped.

    Order: one global stream of windows, epoch e being a permutation of all windows drawn from
    numpy's Generator seeded with (seed, e). Each step consumes batch_size * world_size windows
    of the stream and rank r takes the slice [r * batch_size, (r + 1) * batch_size): K ranks of
    batch B/K see exactly the global batches of one rank of batch B. A batch may straddle two
    epochs; no window is dropped. The state is the stream position, shared by all ranks.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.manifest, self._shards = _open_split(shard_dir, split)
        counts = np.array([_num_windows(len(s), seq_len) for s in self._shards], dtype=np.int64)
        self._first_window = np.concatenate([[0], np.cumsum(counts)])  # window id where each shard starts
        self.num_windows = int(self._first_window[-1])
        if self.num_windows == 0:
            raise ValueError(_too_short(shard_dir, split, self.manifest, seq_len))
        self.position = 0  # windows of the global stream consumed so far, by all ranks together
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> float:
        """Epochs completed, fractional."""
        return self.position / self.num_windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (x, y), LongTensors [batch_size, seq_len]; y[:, t] is the token after x[:, t]."""
        B, T = self.batch_size, self.seq_len
        pos = self.position + self.rank * B + np.arange(B)  # this rank's slice of the global batch
        epochs = pos // self.num_windows
        windows = np.empty(B, dtype=np.int64)
        for e in np.unique(epochs):
            here = epochs == e
            windows[here] = self._permutation(int(e))[pos[here] % self.num_windows]
        self.position += B * self.world_size
        shard_of = np.searchsorted(self._first_window, windows, side="right") - 1
        starts = (windows - self._first_window[shard_of]) * T
        rows = [self._shards[s][i : i + T + 1] for s, i in zip(shard_of, starts)]
        buf = np.stack(rows).astype(np.int64)  # (B, T+1)
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())  # (B, T), (B, T)

    def state_dict(self) -> dict:
        """The position plus what must match on resume (seed, seq_len, split, window count)."""
        keys = ("position", "seed", "seq_len", "split", "num_windows")
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: dict) -> None:
        """Resumes at `state`'s position; the batches that follow equal those of an unbroken run."""
        for key in ("seed", "seq_len", "split", "num_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {getattr(self, key)!r}")
        self.position = int(state["position"])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # Keep only the previous epoch's, which the batch being assembled may straddle.
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perms[epoch]


def iter_eval_batches(
    shard_dir: str | Path,
    split: str,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (x, y) [b, seq_len] batches of the split's windows in order (the windows of TokenLoader).

    The last batch may be smaller. Global batch k goes to rank k % world_size, and `max_batches`
    caps the global batches, so the windows evaluated do not depend on world_size; except that the
    count is rounded up to a multiple of world_size (batches past the end wrap to the start), as every
    rank must run the same number of forwards: DDP and FSDP forwards are collective operations, and a
    rank left without a batch would leave the others waiting forever.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    manifest, shards = _open_split(shard_dir, split)
    windows = [(shard, i * seq_len) for shard in shards for i in range(_num_windows(len(shard), seq_len))]
    if not windows:
        raise ValueError(_too_short(shard_dir, split, manifest, seq_len))
    total = -(-len(windows) // batch_size)
    n_batches = total if max_batches is None else min(total, max_batches)
    n_batches = -(-n_batches // world_size) * world_size
    for k in range(rank, n_batches, world_size):
        batch = windows[(k % total) * batch_size : (k % total + 1) * batch_size]
        buf = np.stack([shard[i : i + seq_len + 1] for shard, i in batch]).astype(np.int64)  # (b, T+1)
        yield torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())


def _num_windows(n_tokens: int, seq_len: int) -> int:
    return max(n_tokens - 1, 0) // seq_len


def _too_short(shard_dir: str | Path, split: str, manifest: Manifest, seq_len: int) -> str:
    info = manifest.splits[split]
    largest = max((s.tokens for s in info.shards), default=0)
    return (
        f"split {split!r} in {shard_dir} has {info.tokens} tokens, too few for a window of seq_len + 1 = "
        f"{seq_len + 1} (windows stay inside one shard file; the largest has {largest} tokens)"
    )


def _open_split(shard_dir: str | Path, split: str) -> tuple[Manifest, list[np.memmap]]:
    """Memory-maps the split's shards, checking each file's size against the manifest."""
    manifest = load_manifest(shard_dir)
    if split not in manifest.splits:
        raise ValueError(f"no split {split!r} in {shard_dir} (splits: {sorted(manifest.splits)})")
    dtype = manifest.numpy_dtype
    shards = []
    for info in manifest.splits[split].shards:
        path = Path(shard_dir) / info.file
        size = path.stat().st_size if path.is_file() else None
        if size != info.tokens * dtype.itemsize:
            raise ValueError(f"shard {path} has {size} bytes, manifest says {info.tokens} {manifest.dtype} tokens")
        shards.append(np.memmap(path, dtype=dtype, mode="r"))
    return manifest, shards


class _Doc(NamedTuple):
    hash: int  # blake2b of the UTF-8 bytes, as a 64-bit integer
    tokens: np.ndarray  # with bos / eos
    n_bytes: int


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {token} token (train it with gasungbi.data.train_tokenizer)")
    return token_id


def _doc_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    """Non-empty documents in lists of <= CHUNK_DOCS documents / about CHUNK_CHARS characters."""
    chunk, chars = [], 0
    for doc in documents:
        if not doc:
            continue
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _ShardWriter:
    """Appends token arrays to <split>_000.bin, _001.bin, ..., closing each at shard_tokens tokens.

    A shard is written as <name>.tmp and renamed when complete.
    """

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.info = SplitInfo()
        self._buffer: list[np.ndarray] = []
        self._file = None

    def add(self, doc: _Doc) -> None:
        self._buffer.append(doc.tokens)
        self.info.documents += 1
        self.info.tokens += len(doc.tokens)
        self.info.bytes += doc.n_bytes

    def flush(self) -> None:
        if not self._buffer:
            return
        data = np.concatenate(self._buffer)
        self._buffer = []
        while len(data):
            if self._file is None:
                self.info.shards.append(ShardInfo(f"{self.split}_{len(self.info.shards):03d}.bin", 0))
                self._file = open(self._path(".tmp"), "wb")
            shard = self.info.shards[-1]
            part, data = data[: self.shard_tokens - shard.tokens], data[self.shard_tokens - shard.tokens :]
            self._file.write(part.tobytes())
            shard.tokens += len(part)
            if shard.tokens == self.shard_tokens:
                self._finish_shard()

    def close(self) -> SplitInfo:
        self.flush()
        if self._file is not None:
            self._finish_shard()
        return self.info

    def _path(self, suffix: str = "") -> Path:
        return self.out / (self.info.shards[-1].file + suffix)

    def _finish_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._path(".tmp"), self._path())
