"""Data pipeline: corpus sources -> byte-level BPE tokenizer -> token shards -> batches.

    docs = iter_documents("stdlib")                      # or a path, glob, .jsonl, .parquet, hf:NAME
    tok = train_tokenizer(docs, vocab_size=8192, out_dir="runs/tok")
    build_shards(iter_documents("stdlib"), tok, "runs/shards")
    loader = TokenLoader("runs/shards", "train", batch_size=8, seq_len=256)
    x, y = loader.next_batch()                           # [8, 256] LongTensors, y = x shifted by one
"""

from .corpus import CorpusError, CorpusStats, describe_source, iter_documents
from .shards import Manifest, TokenLoader, build_shards, iter_eval_batches, load_manifest
from .tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "CorpusError",
    "CorpusStats",
    "Manifest",
    "TokenLoader",
    "build_shards",
    "describe_source",
    "iter_documents",
    "iter_eval_batches",
    "load_manifest",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_hash",
    "train_tokenizer",
]
