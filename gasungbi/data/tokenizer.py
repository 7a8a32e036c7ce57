"""Byte-level BPE tokenizer: train it, save it in the Hugging Face layout, load it back.

The tokenizer is GPT-2 style byte-level BPE built with the `tokenizers` library:
  - no normalizer; the pre-tokenizer splits every digit off on its own (LLaMA, Touvron et al. 2023
    Sec. 2.1: numbers as digit sequences, so arithmetic is learned digit by digit rather than over
    a vocabulary of number tokens), then applies ByteLevel (GPT-2 regex split, no prefix space),
    whose alphabet holds all 256 bytes, so every UTF-8 string encodes and decodes back exactly
    (`decode(encode(s).ids) == s` for Korean, emoji, tabs, trailing spaces, NUL, ...). llama.cpp
    applies the same split under its "starcoder" pre-tokenizer (GGUF export names it);
  - the ByteLevel decoder, and no post-processor: `encode` adds no special tokens by itself, the
    shard builder adds <|bos|> / <|eos|> around each document explicitly;
  - the special tokens of SPECIAL_TOKENS take ids 0..10 in that order (bos=0, eos=1, pad=2).

Saved with `save_tokenizer`, a folder loads with `transformers.AutoTokenizer.from_pretrained`
as a PreTrainedTokenizerFast with the right bos / eos / pad and no space clean-up on decode.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Special tokens, ids 0.. in this order. bos/eos open and close every pretraining document,
# pad fills batches; the role markers and <|end|> frame chat turns; <think>/<answer> frame a
# reasoning trace and its final answer in post-training.
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
]
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = SPECIAL_TOKENS[:3]
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
N_BYTES = 256  # the byte alphabet every byte-level vocabulary starts from


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, out_dir: str | Path | None = None, *, progress: bool = False
) -> Tokenizer:
    """Trains a byte-level BPE of at most `vocab_size` tokens (specials included) on `documents`.

    `documents` is streamed, never held whole. The result may be smaller than `vocab_size` when the
    corpus runs out of pairs worth merging. If `out_dir` is given the tokenizer is saved there too.
    """
    if isinstance(documents, str):
        raise TypeError("documents must be an iterable of strings, got one str (wrap it in a list)")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size <= N_BYTES + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for merges: it must exceed "
            f"{N_BYTES} bytes + {len(SPECIAL_TOKENS)} special tokens = {N_BYTES + len(SPECIAL_TOKENS)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):  # the trainer's contract; shards rely on it
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}")
    if out_dir is not None:
        save_tokenizer(tok, out_dir)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, chat_template: str | None = None) -> Path:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    `chat_template` (a Jinja string, written by the post-training code) goes into
    tokenizer_config.json, where `apply_chat_template` finds it. Returns the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    present = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None]
    roles = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    named = {role: t for role, t in roles.items() if t in present}
    extra = [t for t in present if t not in named.values()]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "extra_special_tokens": extra,
        # Byte-level BPE decodes exactly; the clean-up would drop spaces before punctuation.
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    special_map = {**named, "additional_special_tokens": extra}  # the older file, read by older tools
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a tokenizer from a folder holding tokenizer.json, or from the file itself."""
    from gasungbi.errors import run_dir_hint

    path = Path(path)
    if hint := run_dir_hint(path):
        raise FileNotFoundError(hint)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (expected a tokenizer.json file or a folder holding one)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a plain Exception for malformed JSON
        raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from e


def tokenizer_hash(tok: Tokenizer) -> str:
    """A short fingerprint of the tokenizer's full definition, to check shards match a tokenizer."""
    return hashlib.blake2b(tok.to_str().encode("utf-8"), digest_size=8).hexdigest()
