"""CLI: ``gasungbi prepare`` (a corpus -> a byte-level BPE tokenizer and token shards)."""

from __future__ import annotations

from gasungbi.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # save_tokenizer's


def prepare(out: str, corpus: str = "stdlib", vocab_size: int = 4096, tokenizer_bytes: int = 20_000_000,
            max_bytes: int | None = None, text_field: str = "text", val_fraction: float = 0.01,
            overwrite: bool = False) -> int:
    """Build a byte-level BPE tokenizer and token shards from a corpus.

    Args:
        out: output directory for tokenizer.json, the shards and manifest.json
        corpus: stdlib (the Python standard library), a file, folder or glob, a .jsonl/.parquet file, or
            hf:NAME[:SPLIT[:CONFIG]] (from the local Hugging Face cache)
        vocab_size: BPE vocabulary size
        tokenizer_bytes: train the tokenizer on the first N bytes of the corpus
        max_bytes: use only the first N bytes of the corpus
        text_field: the field holding the text in JSONL/Parquet/HF sources
        val_fraction: share of documents for validation
        overwrite: replace the tokenizer, manifest and shards already in --out
    """
    from pathlib import Path

    from gasungbi.data.prepare import prepare_corpus
    from gasungbi.data.shards import MANIFEST, is_shard_file
    from gasungbi.data.tokenizer import N_BYTES, SPECIAL_TOKENS
    from gasungbi.outputs import output_dir

    def replaced(path: Path) -> list[str]:  # what prepare writes; other files in --out stay
        return [p.name for p in path.iterdir() if p.name in (MANIFEST, *TOKENIZER_FILES) or is_shard_file(p.name)]

    if Path(corpus).is_dir() and Path(corpus).resolve() == Path(out).resolve():
        raise UserError(f"--out {out} is the corpus folder: choose another directory for the shards")
    output_dir(out, "--out", overwrite=overwrite, replaced=replaced)
    if vocab_size <= N_BYTES + len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size {vocab_size}: must exceed {N_BYTES} bytes + {len(SPECIAL_TOKENS)} special "
                        f"tokens = {N_BYTES + len(SPECIAL_TOKENS)} (e.g. 4096)")
    try:
        prepare_corpus(corpus, out, vocab_size=vocab_size, tokenizer_bytes=tokenizer_bytes, max_bytes=max_bytes,
                       text_field=text_field, val_fraction=val_fraction)
    except ValueError as e:  # CorpusError and the shard builder's checks name the input
        raise UserError(str(e)) from None
    return 0
