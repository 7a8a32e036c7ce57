"""Corpus -> tokenizer + token shards in one directory, the input of ``gasungbi train``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from gasungbi.data.corpus import CorpusStats, describe_source, iter_documents
from gasungbi.data.shards import Manifest, build_shards
from gasungbi.data.tokenizer import save_tokenizer, train_tokenizer
from gasungbi.data.conventions import CHAT_TEMPLATE


def _take_bytes(docs: Iterator[str], limit: int | None) -> Iterator[str]:
    """Documents until their UTF-8 size reaches ``limit`` (the document that crosses it is kept)."""
    if limit is None:
        yield from docs
        return
    seen = 0
    for d in docs:
        if seen >= limit:
            return
        seen += len(d.encode("utf-8"))
        yield d


def prepare_corpus(source: str, out_dir: str | Path, vocab_size: int = 4096, tokenizer_bytes: int | None = 20_000_000,
                   max_bytes: int | None = None, text_field: str = "text", val_fraction: float = 0.01,
                   progress: bool = True) -> Manifest:
    """Train a byte-level BPE on the first ``tokenizer_bytes`` of ``source`` and shard the first
    ``max_bytes`` (all by default) into ``out_dir``; writes tokenizer files next to the shards."""
    out = Path(out_dir)
    stats = CorpusStats()
    tok_docs = _take_bytes(iter_documents(source, text_field), min(filter(None, (tokenizer_bytes, max_bytes)), default=None))
    if progress:
        print(f"training a {vocab_size}-token BPE on {describe_source(source)} ...", flush=True)
    tok = train_tokenizer(tok_docs, vocab_size)
    save_tokenizer(tok, out, chat_template=CHAT_TEMPLATE)
    manifest = build_shards(_take_bytes(iter_documents(source, text_field, stats), max_bytes), tok, out,
                            val_fraction=val_fraction, source=describe_source(source), progress=progress)
    if progress:
        tr, va = manifest.splits["train"], manifest.splits["val"]
        skipped = stats.skipped_undecodable + stats.skipped_empty
        print(f"shards in {out}: train {tr.tokens:,} tokens ({tr.documents} docs, {tr.bytes_per_token:.2f} bytes/token), "
              f"val {va.tokens:,} tokens ({va.documents} docs)" + (f"; skipped {skipped} documents "
              f"({stats.skipped_undecodable} undecodable, {stats.skipped_empty} empty)" if skipped else ""))
    return manifest

