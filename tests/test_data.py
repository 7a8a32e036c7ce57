"""Data pipeline: corpus sources, tokenizer round-trip, shard builds, the batch loader.

Nothing here touches the network: the Hugging Face test runs `datasets` in offline mode.
"""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from gasungbi.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    CorpusError,
    CorpusStats,
    TokenLoader,
    build_shards,
    describe_source,
    iter_documents,
    iter_eval_batches,
    load_manifest,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)
from gasungbi.data import corpus as corpus_module
from gasungbi.data import shards as shards_module

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"

ROUND_TRIP = [
    "가성비 좋은 모델을 만들자. 한국어 문장입니다.",
    "emoji 🤖👍🏽 family 👨‍👩‍👧 flags 🇰🇷",
    "def f(x):\n\tif x:  \n\t\treturn x  # trailing spaces   \n\n\n",
    "NUL\x00 bell\x07 esc\x1b del\x7f cr\r\n form\x0c vtab\x0b",
    "  leading and trailing spaces  ",
    "special text <|eos|> and <think>in prose</think> and <|bos|>",
    "a , b . c ! d ? e 's n't",
    "",
]

CORPUS = [
    f"document {i}: 가성비 {i * 7} 🤖 def f{i}(x):\n\treturn x + {i}\n" + "the quick brown fox " * (i % 5 + 1)
    for i in range(60)
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS + ROUND_TRIP, vocab_size=400)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok):
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok"), chat_template="{{ messages }}")


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def read_split_docs(shard_dir, tok, split) -> list[str]:
    """Decodes a split's shards back into documents, splitting at bos."""
    manifest = load_manifest(shard_dir)
    parts = [np.fromfile(Path(shard_dir) / s.file, dtype=manifest.numpy_dtype) for s in manifest.splits[split].shards]
    stream = np.concatenate(parts).tolist() if parts else []
    docs, current = [], None
    for t in stream:
        if t == BOS_ID:
            current = []
        elif t == EOS_ID:
            docs.append(tok.decode(current, skip_special_tokens=False))
            current = None
        else:
            current.append(t)
    assert current is None, "stream ended inside a document"
    return docs


# ---------------------------------------------------------------- corpus sources


def test_stdlib_source_is_deterministic_and_skips_site_packages():
    first = list(itertools.islice(iter_documents("stdlib"), 5))
    again = list(itertools.islice(iter_documents("stdlib"), 5))
    assert first == again and len(first) == 5 and all(d.strip() for d in first)
    assert describe_source("stdlib").startswith("stdlib:")
    from gasungbi.data.corpus import STDLIB_SKIPPED_DIRS, _stdlib_dir, _walk

    files = _walk(_stdlib_dir(), {".py"}, STDLIB_SKIPPED_DIRS)
    assert files == sorted(files) and len(files) > 100
    assert not any("site-packages" in f.parts for f in files)


def test_folder_glob_and_file_sources(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a.md", "# a")
    write(tmp_path / "sub" / "c.py", "print('c')")
    write(tmp_path / "data.bin", b"\x00binary")  # not a text suffix: ignored in a folder walk
    write(tmp_path / ".git" / "x.txt", "hidden")  # hidden folder: ignored
    write(tmp_path / "__pycache__" / "y.py", "cache")
    assert list(iter_documents(str(tmp_path))) == ["# a", "bee", "print('c')"]
    assert list(iter_documents(str(tmp_path / "*.txt"))) == ["bee"]
    # A glob is taken as written: only hidden names are left out, as glob itself does.
    assert list(iter_documents(str(tmp_path / "**" / "*.py"))) == ["cache", "print('c')"]
    assert list(iter_documents(str(tmp_path / "b.txt"))) == ["bee"]
    assert describe_source(str(tmp_path)) == f"folder:{tmp_path.resolve()}"


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.dumps({"body": f"row {i} 가"}) for i in range(3)]
    write(tmp_path / "c.jsonl", "\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    stats = CorpusStats()
    assert list(iter_documents(str(tmp_path / "c.jsonl"), text_field="body", stats=stats)) == ["row 0 가", "row 1 가", "row 2 가"]
    assert (stats.documents, stats.bytes) == (3, 3 * len("row 0 가".encode()))

    texts = [f"parquet {i}" if i % 100 else "" for i in range(2500)]  # > one row batch; some empty
    pq.write_table(pa.table({"text": texts, "n": list(range(2500))}), tmp_path / "p.parquet", row_group_size=700)
    stats = CorpusStats()
    docs = list(iter_documents(str(tmp_path / "p.parquet"), stats=stats))
    assert docs == [t for t in texts if t] and stats.skipped_empty == 25


def test_folder_reads_jsonl_records(tmp_path):
    write(tmp_path / "a.jsonl", json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    write(tmp_path / "b.txt", "three")
    assert list(iter_documents(str(tmp_path))) == ["one", "two", "three"]


def test_long_text_file_is_read_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "PIECE_BYTES", 100)
    text = "".join(f"paragraph {i}\r\nline two {'x' * (i % 7)}\n\n" for i in range(40)) + "tail without newline"
    path = write(tmp_path / "long.txt", text)
    pieces = list(iter_documents(str(path)))
    assert "".join(pieces) == text and len(pieces) > 5
    assert all(p.endswith("\n\n") and len(p.encode()) >= 100 for p in pieces[:-1])
    one_line = write(tmp_path / "one_line.txt", "y" * 1000)  # no line end: one piece, however long
    assert list(iter_documents(str(one_line))) == ["y" * 1000]
    bad = write(tmp_path / "bad_end.txt", text.encode() + b"\xff")  # bad byte at the very end
    stats = CorpusStats()
    with pytest.raises(CorpusError, match="no documents"):
        list(iter_documents(str(bad), stats=stats))
    assert stats.skipped_undecodable == 1 and stats.skipped_paths == [str(bad)]


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared data not present")
def test_single_file_corpus_splits_into_train_and_val(tok, tmp_path):
    pieces = list(iter_documents(str(SHAKESPEARE)))
    assert "".join(pieces) == SHAKESPEARE.read_text(encoding="utf-8") and len(pieces) > 10
    manifest = build_shards(pieces, tok, tmp_path, val_fraction=0.1, progress=False)
    assert manifest.splits["val"].documents >= 1 and manifest.splits["train"].bytes > 0.75 * SHAKESPEARE.stat().st_size


def test_undecodable_and_empty_files_are_skipped_and_counted(tmp_path):
    write(tmp_path / "a_good.txt", "fine")
    write(tmp_path / "b_bad.txt", b"caf\xe9 \xff\xfe latin-1")
    write(tmp_path / "c_empty.txt", "  \n\t ")
    write(tmp_path / "d.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n{"text": "\\ud800 lone surrogate"}\n')
    stats = CorpusStats()
    assert list(iter_documents(str(tmp_path), stats=stats)) == ["fine", "ok"]
    assert (stats.documents, stats.skipped_undecodable, stats.skipped_empty) == (2, 3, 1)
    assert str(tmp_path / "b_bad.txt") in stats.skipped_paths
    assert f"{tmp_path / 'd.jsonl'}:2" in stats.skipped_paths


def test_corpus_errors_name_the_bad_input(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match="nope.txt"):
        iter_documents(str(missing))
    with pytest.raises(CorpusError, match=r"matches no files"):
        iter_documents(str(tmp_path / "*.nothing"))
    write(tmp_path / "bin" / "x.dat", b"\x00")
    with pytest.raises(CorpusError, match=r"holds no text files"):
        iter_documents(str(tmp_path / "bin"))
    write(tmp_path / "blank.txt", "   ")
    with pytest.raises(CorpusError, match=r"blank.txt.*no documents"):
        list(iter_documents(str(tmp_path / "blank.txt")))
    bad = write(tmp_path / "bad.jsonl", '{"text": "a"}\n{not json\n')
    with pytest.raises(CorpusError, match=rf"{bad}:2: not valid JSON"):
        list(iter_documents(str(bad)))
    nofield = write(tmp_path / "nofield.jsonl", '{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(CorpusError, match=rf"{nofield}:2: no field 'text'"):
        list(iter_documents(str(nofield)))
    wrongtype = write(tmp_path / "num.jsonl", '{"text": 3}\n')
    with pytest.raises(CorpusError, match=rf"{wrongtype}:1: field 'text' is a int"):
        list(iter_documents(str(wrongtype)))
    with pytest.raises(CorpusError, match="bad Hugging Face source"):
        iter_documents("hf:")
    with pytest.raises(CorpusError, match="is a file"):
        iter_documents(f"hf:{bad}")


def test_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(CorpusError, match=r"p.parquet: no column 'text'"):
        list(iter_documents(str(tmp_path / "p.parquet")))


def test_hf_local_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # read when datasets is first imported ...
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # ... and patched here in case another test imported it first.

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "jsonl_ds"
    write(folder / "part.jsonl", "".join(json.dumps({"text": f"hf doc {i}", "id": i}) + "\n" for i in range(4)))
    assert list(iter_documents(f"hf:{folder}")) == [f"hf doc {i}" for i in range(4)]
    assert list(iter_documents(f"hf:{folder}:train")) == [f"hf doc {i}" for i in range(4)]
    with pytest.raises(CorpusError, match="no field 'body'"):
        list(iter_documents(f"hf:{folder}", text_field="body"))

    saved = tmp_path / "saved"
    d = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["t1", "", "t2"]}), "test": datasets.Dataset.from_dict({"text": ["e1"]})}
    )
    d.save_to_disk(str(saved))
    stats = CorpusStats()
    assert list(iter_documents(f"hf:{saved}", stats=stats)) == ["t1", "t2"] and stats.skipped_empty == 1
    assert list(iter_documents(f"hf:{saved}:test")) == ["e1"]
    with pytest.raises(CorpusError, match="cannot load Hugging Face dataset"):
        iter_documents(f"hf:{saved}:nosuchsplit")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"content": ["s1"]}).save_to_disk(str(single))
    assert list(iter_documents(f"hf:{single}", text_field="content")) == ["s1"]
    with pytest.raises(CorpusError, match="without splits"):
        iter_documents(f"hf:{single}:test")


# ---------------------------------------------------------------- tokenizer


def test_special_token_ids(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(11))
    assert (tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>"), tok.token_to_id("<|pad|>")) == (BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2)
    assert SPECIAL_TOKENS[3:] == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>", "<answer>", "</answer>"]
    assert 268 < tok.get_vocab_size() <= 400


def test_vocab_size_validation():
    with pytest.raises(ValueError, match="must exceed 256 bytes \\+ 11 special tokens = 267"):
        train_tokenizer(["abc"], vocab_size=267)
    with pytest.raises(TypeError, match="one str"):
        train_tokenizer("abc", vocab_size=300)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        train_tokenizer(["abc"], vocab_size=300.0)


@pytest.mark.parametrize("text", ROUND_TRIP + ["\U0010ffff unseen ☃ 漢字 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 é"])
def test_round_trip_tokenizers(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_round_trip_random_unicode(tok):
    rng = np.random.default_rng(0)
    for _ in range(200):
        points = rng.integers(0, 0x110000, size=int(rng.integers(1, 40)))
        text = "".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF)  # surrogates are not text
        text += "".join(rng.choice(list(" \t\n\r가a🤖"), size=5))
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_round_trip_transformers(tok, tok_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        hf = cls.from_pretrained(str(tok_dir))
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
        assert hf.convert_ids_to_tokens(list(range(11))) == SPECIAL_TOKENS
        assert hf.chat_template == "{{ messages }}"
        for text in ROUND_TRIP:
            ids = hf(text)["input_ids"]
            assert ids == tok.encode(text).ids  # no bos added, same ids as the tokenizers library
            assert hf.decode(ids) == text  # the saved default: no space clean-up
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["clean_up_tokenization_spaces"] is False and config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_save_load_tokenizer(tok, tok_dir, tmp_path):
    assert tokenizer_hash(load_tokenizer(tok_dir)) == tokenizer_hash(tok)
    assert tokenizer_hash(load_tokenizer(tok_dir / "tokenizer.json")) == tokenizer_hash(tok)
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(tmp_path / "empty")
    write(tmp_path / "broken" / "tokenizer.json", "{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "broken")
    plain = save_tokenizer(tok, tmp_path / "plain")
    assert "chat_template" not in json.loads((plain / "tokenizer_config.json").read_text())


# ---------------------------------------------------------------- shards


def test_shards_hold_exactly_the_documents(tok, tmp_path):
    docs = CORPUS + ["text with a literal <|eos|> and <|bos|> inside"]
    out = tmp_path / "shards"
    manifest = build_shards(iter(docs), tok, out, val_fraction=0.2, shard_tokens=500, source="test", progress=False)
    assert manifest == load_manifest(out)
    assert manifest.dtype == "uint16" and manifest.vocab_size == tok.get_vocab_size()
    assert manifest.tokenizer_hash == tokenizer_hash(tok) and (manifest.bos_id, manifest.eos_id) == (0, 1)
    train, val = manifest.splits["train"], manifest.splits["val"]
    assert train.documents + val.documents == len(docs) and val.documents > 0 and train.documents > val.documents
    literal = Tokenizer.from_str(tok.to_str())
    literal.encode_special_tokens = True  # how the shards encode text: "<|eos|>" is plain text
    assert train.tokens + val.tokens == sum(len(literal.encode(d).ids) + 2 for d in docs)
    # Documents come back exactly, each in one split; literal "<|eos|>" text is not a control token.
    train_docs, val_docs = read_split_docs(out, tok, "train"), read_split_docs(out, tok, "val")
    assert sorted(train_docs + val_docs) == sorted(docs)
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        info = manifest.splits[split]
        assert info.bytes == sum(len(d.encode()) for d in split_docs)
        assert info.tokens == sum(s.tokens for s in info.shards)
        assert all(s.tokens == 500 for s in info.shards[:-1]) and 0 < info.shards[-1].tokens <= 500
        assert all((out / s.file).stat().st_size == 2 * s.tokens for s in info.shards)
    assert len(train.shards) > 1
    assert not list(out.glob("*.tmp"))


def test_split_is_independent_of_chunking_threads_and_order(tok, tmp_path, monkeypatch):
    a = build_shards(CORPUS, tok, tmp_path / "a", val_fraction=0.3, progress=False)
    monkeypatch.setattr(shards_module, "CHUNK_DOCS", 7)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    b = build_shards(CORPUS, tok, tmp_path / "b", val_fraction=0.3, progress=False)
    c = build_shards(CORPUS[::-1], tok, tmp_path / "c", val_fraction=0.3, progress=False)
    assert a == b
    for f in ("train_000.bin", "val_000.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert sorted(read_split_docs(tmp_path / "a", tok, "val")) == sorted(read_split_docs(tmp_path / "c", tok, "val"))
    assert a.splits["val"].tokens == c.splits["val"].tokens


def test_small_corpora_get_both_splits_when_possible(tok, tmp_path):
    two = build_shards(["first doc", "second doc"], tok, tmp_path / "two", val_fraction=1e-9, progress=False)
    assert (two.splits["train"].documents, two.splits["val"].documents) == (1, 1)
    one = build_shards(["only doc"], tok, tmp_path / "one", val_fraction=0.999, progress=False)
    assert (one.splits["train"].documents, one.splits["val"].documents) == (1, 0)
    none = build_shards(["a", "b", "c"], tok, tmp_path / "none", val_fraction=0.0, progress=False)
    assert none.splits["val"].documents == 0
    with pytest.raises(ValueError, match="split 'val' .* has 0 tokens"):
        TokenLoader(tmp_path / "one", "val", batch_size=1, seq_len=4)
    with pytest.raises(ValueError, match="no documents"):
        build_shards(["", ""], tok, tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        build_shards(["a"], tok, tmp_path / "bad", val_fraction=1.0, progress=False)


def test_uint32_for_large_vocab(tmp_path):
    from tokenizers import models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(70_000)}
    vocab.update({"<|bos|>": 70_000, "<|eos|>": 70_001, "a": 70_002})
    big = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    m = build_shards(["a", "a a"], big, tmp_path, progress=False)
    assert m.dtype == "uint32"
    tokens = np.concatenate([np.fromfile(tmp_path / s.file, dtype="<u4") for sp in m.splits.values() for s in sp.shards])
    assert sorted(tokens.tolist()) == sorted([70_000, 70_002, 70_001, 70_000, 70_002, 70_002, 70_001])


def test_interrupted_rebuild_leaves_no_manifest(tok, tmp_path):
    build_shards(CORPUS, tok, tmp_path, shard_tokens=200, progress=False)
    old_shards = sorted(p.name for p in tmp_path.glob("train_*.bin"))

    def failing():
        yield from CORPUS[:40]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_shards(failing(), tok, tmp_path, shard_tokens=200, progress=False)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_manifest(tmp_path)
    m = build_shards(CORPUS[:5], tok, tmp_path, shard_tokens=10_000, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.bin*")) == ["train_000.bin", "val_000.bin"] and len(old_shards) > 1
    assert m.splits["train"].documents + m.splits["val"].documents == 5


def test_manifest_and_shard_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_manifest(tmp_path)
    write(tmp_path / "manifest.json", "{broken")
    with pytest.raises(ValueError, match="not a valid shard manifest"):
        load_manifest(tmp_path)
    build_shards(CORPUS, tok, tmp_path, progress=False)
    with pytest.raises(ValueError, match="no split 'test'"):
        TokenLoader(tmp_path, "test", batch_size=1, seq_len=4)
    shard = tmp_path / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="train_000.bin has .* bytes, manifest says"):
        TokenLoader(tmp_path, "train", batch_size=1, seq_len=4)


# ---------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("shards")
    build_shards(CORPUS, tok, out, val_fraction=0.1, shard_tokens=300, progress=False)
    return out


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_loader_windows_are_shifted_slices_covering_each_epoch(shard_dir):
    T = 16
    loader = TokenLoader(shard_dir, "train", batch_size=1, seq_len=T, seed=3)
    manifest = load_manifest(shard_dir)
    shards = [np.fromfile(shard_dir / s.file, dtype="<u2").astype(np.int64) for s in manifest.splits["train"].shards]
    expected = [tuple(s[i : i + T + 1]) for s in shards for i in range(0, len(s) - T, T)]
    assert loader.num_windows == len(expected) == sum((len(s) - 1) // T for s in shards)
    seen = []
    for x, y in take(loader, loader.num_windows):
        assert x.shape == y.shape == (1, T) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[0, 1:], y[0, :-1])
        seen.append(tuple(x[0].tolist()) + (y[0, -1].item(),))
    assert sorted(seen) == sorted(expected)  # every window exactly once per epoch
    assert loader.epoch == 1.0


def test_loader_is_deterministic_and_resumes_exactly(shard_dir):
    def make(seed=0):
        return TokenLoader(shard_dir, "train", batch_size=4, seq_len=32, seed=seed)

    n = make().num_windows // 2 + 2  # batches of 4 that run through two epoch ends, each inside a batch
    assert make().num_windows % 4 != 0
    full = take(make(), n)
    again = take(make(), n)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    assert not torch.equal(take(make(seed=1), 1)[0][0], full[0][0])

    first = make()
    take(first, 11)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = make()
    resumed.load_state_dict(state)
    rest = take(resumed, n - 11)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[11:], rest))

    other = TokenLoader(shard_dir, "train", batch_size=3, seq_len=8)
    with pytest.raises(ValueError, match="seq_len=32"):
        other.load_state_dict(state)


def test_rank_sharding_matches_one_process(shard_dir):
    B, T = 4, 16
    single = TokenLoader(shard_dir, "train", batch_size=B, seq_len=T, seed=5)
    ranks = [TokenLoader(shard_dir, "train", batch_size=B // 2, seq_len=T, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(2 * single.num_windows // B + 1):  # past an epoch end
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(shard_dir, "train", batch_size=1, seq_len=T, rank=2, world_size=2)


def test_too_short_split_is_a_clear_error(shard_dir):
    tokens = load_manifest(shard_dir).splits["val"].tokens
    with pytest.raises(ValueError, match=rf"split 'val' .* has {tokens} tokens, too few .* seq_len \+ 1 = 100001"):
        TokenLoader(shard_dir, "val", batch_size=1, seq_len=100_000)
    with pytest.raises(ValueError, match="too few"):
        next(iter_eval_batches(shard_dir, "val", batch_size=1, seq_len=100_000))


def test_eval_batches_are_sequential_windows(shard_dir):
    T = 8
    manifest = load_manifest(shard_dir)
    shards = [np.fromfile(shard_dir / s.file, dtype="<u2").astype(np.int64) for s in manifest.splits["val"].shards]
    expected = [s[i : i + T + 1] for s in shards for i in range(0, len(s) - T, T)]
    batches = list(iter_eval_batches(shard_dir, "val", batch_size=5, seq_len=T))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.tolist() == [w[:-1].tolist() for w in expected] and y.tolist() == [w[1:].tolist() for w in expected]
    assert all(b[0].shape[0] == 5 for b in batches[:-1]) and 1 <= batches[-1][0].shape[0] <= 5
    assert len(list(iter_eval_batches(shard_dir, "val", batch_size=1, seq_len=T, max_batches=3))) == 3
    for world, cap in ((2, None), (2, 3), (3, 1)):
        by_rank = [list(iter_eval_batches(shard_dir, "val", 5, T, cap, rank=r, world_size=world)) for r in range(world)]
        assert len({len(b) for b in by_rank}) == 1  # every rank runs as many forwards (collectives)
        interleaved = [b for group in zip(*by_rank) for b in group]
        n = len(batches) if cap is None else min(cap, len(batches))
        assert len(interleaved) == -(-n // world) * world
        assert all(torch.equal(a[0], batches[k % len(batches)][0]) for k, a in enumerate(interleaved))
