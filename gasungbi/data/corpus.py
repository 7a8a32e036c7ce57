"""Corpus sources: turn a source string into a stream of text documents.

One function, `iter_documents(source)`, reads every kind of corpus the pipeline accepts:

    "stdlib"                   the running Python's standard-library `.py` files (no download)
    path/to/file.txt           one text file = one document (a long one: several, see PIECE_BYTES)
    path/to/folder             every text-like file below it (recursive, sorted, hidden names
                               left out), read as above; `.jsonl` / `.parquet` files in it as records
    "data/*.txt"               a glob pattern (sorted); matched files are read as above
    corpus.jsonl               one JSON object per line, the document is `obj[text_field]`
    corpus.parquet             column `text_field`, read in row batches with pyarrow
    "hf:NAME[:SPLIT[:CONFIG]]" a Hugging Face dataset, streamed; NAME may be a Hub name, a local
                               folder of data files, or a `save_to_disk` folder

Every source yields documents in a deterministic order, so a shard build is reproducible.
Problems with the input itself (missing path, malformed jsonl line, no documents at all) raise
`CorpusError` naming the bad input. Problems with one document (invalid UTF-8, empty text) never
stop a run: the document is skipped and counted in `CorpusStats`.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# Suffixes read as plain text when a folder is walked (an explicitly named file or glob match is
# read as text whatever its suffix).
TEXT_SUFFIXES = frozenset(
    ".txt .md .markdown .rst .tex .py .pyi .c .h .cc .cpp .hpp .cu .rs .go .java .js .ts .sh "
    ".toml .yaml .yml .html .css".split()
)
RECORD_SUFFIXES = frozenset({".jsonl", ".parquet"})
# Folders never descended into. For "stdlib" the test suites are left out too: they are large,
# repetitive, and hold files that are deliberately malformed or not UTF-8.
SKIPPED_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})
STDLIB_SKIPPED_DIRS = SKIPPED_DIRS | {"test", "tests", "idle_test"}
MAX_SKIPPED_PATHS = 20  # how many skipped documents CorpusStats names, for the log
# A text file longer than this is read as consecutive pieces, each a document: a piece closes at
# the first blank line after PIECE_BYTES (or at a line end after 2 * PIECE_BYTES). So a large file
# is never held whole, and a one-file corpus (tiny Shakespeare) still has documents to split into
# train and val. The pieces concatenate back to the file exactly.
PIECE_BYTES = 64 * 1024
PARQUET_BATCH_ROWS = 1024
HF_BATCH_ROWS = 1024


class CorpusError(ValueError):
    """A corpus source that cannot be read; the message names the source, file or line."""


@dataclass
class CorpusStats:
    """Counters filled in while a source is read, for logs and manifests."""

    documents: int = 0  # documents yielded
    bytes: int = 0  # UTF-8 bytes of the yielded documents
    skipped_undecodable: int = 0  # files / records that were not valid UTF-8
    skipped_empty: int = 0  # documents that were empty or whitespace only
    skipped_paths: list[str] = field(default_factory=list)  # the first few skipped, "path[:line]"

    def note_skip(self, where: str) -> None:
        if len(self.skipped_paths) < MAX_SKIPPED_PATHS:
            self.skipped_paths.append(where)


def iter_documents(source: str, text_field: str = "text", stats: CorpusStats | None = None) -> Iterator[str]:
    """Yields the documents of `source` (see the module docstring for the accepted forms).

    A missing path, a glob that matches nothing and a folder without text files raise CorpusError
    here, at the call; errors inside files (a bad jsonl line) raise while iterating, and so does a
    source that turns out to hold no document at all. Pass `stats` to read the counters afterwards.
    """
    stats = stats if stats is not None else CorpusStats()
    return _counted(_open_source(source, text_field, stats), source, stats)


def describe_source(source: str) -> str:
    """A one-line description of a source for logs and manifests (resolves paths, reads nothing)."""
    if source == "stdlib":
        return f"stdlib:{_stdlib_dir()}"
    if source.startswith("hf:"):
        return source
    path = Path(source)
    if path.is_dir():
        return f"folder:{path.resolve()}"
    if path.is_file():
        return f"file:{path.resolve()}"
    return f"glob:{source}" if any(c in source for c in "*?[") else source


def _counted(raw: Iterator[tuple[str, str | None]], source: str, stats: CorpusStats) -> Iterator[str]:
    """Skips and counts empty or unencodable documents, counts the rest, and fails on no documents."""
    yielded = 0
    for where, text in raw:
        if text is None or not text.strip():
            stats.skipped_empty += 1
            stats.note_skip(where)
            continue
        try:
            n_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\ud800" escape
            stats.skipped_undecodable += 1
            stats.note_skip(where)
            continue
        stats.documents += 1
        stats.bytes += n_bytes
        yielded += 1
        yield text
    if yielded == 0:
        problem = _file_problem(Path(source)) if Path(source).is_file() else None
        if problem:
            raise CorpusError(f"corpus source {source!r} yielded no documents: it {problem}")
        named = f"; e.g. {', '.join(stats.skipped_paths[:3])}" if stats.skipped_paths else ""
        raise CorpusError(
            f"corpus source {source!r} yielded no documents "
            f"(skipped so far: {stats.skipped_empty} empty, {stats.skipped_undecodable} binary or not UTF-8{named})"
        )


def _file_problem(path: Path) -> str | None:
    """Why a file holds no text: empty, binary (NUL bytes), or not UTF-8 (where); None if it is text."""
    if path.suffix.lower() in RECORD_SUFFIXES:
        return None  # records: their own errors name the line
    with open(path, "rb") as f:
        head = f.read(PIECE_BYTES)
    if not head.strip():
        return "is empty" if not head else "holds only whitespace"
    if b"\0" in head:
        return "is a binary file (it holds NUL bytes), not text"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.end < len(head) or len(head) < PIECE_BYTES:  # not just a character cut at the end of the block
            return f"is not UTF-8 text (byte {head[e.start]:#04x} at offset {e.start}); convert it, e.g. iconv -t utf-8"
    return None if _is_utf8(path) else "is not UTF-8 text; convert it, e.g. iconv -t utf-8"


def _open_source(source: str, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str | None]]:
    """Resolves `source` eagerly (so path errors raise at once) and returns its (where, text) stream."""
    if source == "stdlib":
        root = _stdlib_dir()
        files = _walk(root, {".py"}, STDLIB_SKIPPED_DIRS)
        if not files:
            raise CorpusError(f"no .py files found in the standard library folder {root}")
        return _read_files(files, text_field, stats)
    if source.startswith("hf:"):
        return _iter_hf(source, text_field)
    path = Path(source)
    if path.is_dir():
        files = _walk(path, TEXT_SUFFIXES | RECORD_SUFFIXES, SKIPPED_DIRS)
        if not files:
            suffixes = " ".join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))
            raise CorpusError(f"folder {source!r} holds no text files (looked for {suffixes})")
        return _read_files(files, text_field, stats)
    if path.is_file():
        return _read_files([path], text_field, stats)
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        if not files:
            raise CorpusError(f"glob pattern {source!r} matches no files")
        return _read_files(files, text_field, stats)
    raise CorpusError(f"corpus source {source!r} does not exist (not a file, folder, glob, 'stdlib' or 'hf:NAME')")


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, suffixes: set[str] | frozenset[str], skipped_dirs: frozenset[str]) -> list[Path]:
    """Files under `root` with one of `suffixes`, sorted; hidden names and `skipped_dirs` pruned."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skipped_dirs and not d.startswith(".")]
        kept = [f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
        found += [Path(dirpath, f) for f in kept]
    return sorted(found)


def _read_files(files: list[Path], text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str | None]]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _iter_jsonl(path, text_field, stats)
        elif suffix == ".parquet":
            yield from _iter_parquet(path, text_field, stats)
        else:
            yield from _iter_text_file(path, stats)


def _iter_text_file(path: Path, stats: CorpusStats) -> Iterator[tuple[str, str | None]]:
    """The file as one document (skipped and counted if it is not UTF-8), or as pieces if long."""
    if path.stat().st_size > PIECE_BYTES:
        yield from _iter_pieces(path, stats)
        return
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:  # not UTF-8, or binary that happens to decode
        stats.skipped_undecodable += 1
        stats.note_skip(str(path))
        return
    yield str(path), text


def _iter_pieces(path: Path, stats: CorpusStats) -> Iterator[tuple[str, str | None]]:
    """A long file in pieces of about PIECE_BYTES ending at a blank line, streamed from disk."""
    if not _is_utf8(path):  # checked first, so a bad file is skipped whole, never half-yielded
        stats.skipped_undecodable += 1
        stats.note_skip(str(path))
        return
    with open(path, "rb") as f:
        piece, size, count = [], 0, 0
        for line in f:
            piece.append(line)
            size += len(line)
            if size >= PIECE_BYTES and (not line.strip() or size >= 2 * PIECE_BYTES):
                count += 1
                yield f"{path}:piece {count}", b"".join(piece).decode("utf-8")
                piece, size = [], 0
        if piece:
            yield f"{path}:piece {count + 1}", b"".join(piece).decode("utf-8")


def _is_utf8(path: Path) -> bool:
    """Whether the whole file is valid UTF-8, read block by block."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _iter_jsonl(path: Path, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str | None]]:
    """One JSON object per line; blank lines are ignored, a line that is not UTF-8 is skipped."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.skipped_undecodable += 1
                stats.note_skip(where)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or text_field not in record:
                raise CorpusError(f"{where}: no field {text_field!r} in this line")
            yield where, _as_text(record[text_field], where, text_field)


def _iter_parquet(path: Path, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str | None]]:
    """Column `text_field`, read batch by batch so a large file is never loaded whole."""
    import pyarrow.parquet as pq  # optional dependency (the `hf` extra)

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise CorpusError(f"{path}: cannot read as parquet ({e})") from e
    if text_field not in parquet.schema_arrow.names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            where = f"{path}:row {row}"
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    stats.skipped_undecodable += 1
                    stats.note_skip(where)
                    continue
            yield where, _as_text(value, where, text_field)


def _as_text(value: object, where: str, text_field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise CorpusError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string")


def _iter_hf(source: str, text_field: str) -> Iterator[tuple[str, str | None]]:
    """`hf:NAME[:SPLIT[:CONFIG]]`, streamed with `datasets`; SPLIT defaults to "train"."""
    parts = source[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise CorpusError(f"bad Hugging Face source {source!r}: expected hf:NAME[:SPLIT[:CONFIG]]")
    name, split, config = (parts + ["", ""])[:3]
    if Path(name).is_file():
        raise CorpusError(f"{source!r}: {name} is a file; pass the file path itself as the source, not hf:")
    import datasets  # optional dependency (the `hf` extra)

    try:
        if (Path(name) / "state.json").is_file() or (Path(name) / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(name)  # a `save_to_disk` folder, which load_dataset refuses
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split or "train"]
            elif split:
                raise CorpusError(f"{name} holds a single saved Dataset without splits; drop :{split}")
            rows = (row for batch in dataset.iter(batch_size=HF_BATCH_ROWS) for row in _unbatch(batch))
        else:
            rows = iter(datasets.load_dataset(name, config or None, split=split or "train", streaming=True))
    except CorpusError:
        raise
    except Exception as e:  # datasets raises many types (missing, offline, bad config); keep the cause
        raise CorpusError(f"cannot load Hugging Face dataset {source!r}: {e}") from e
    return _hf_rows(rows, source, text_field)


def _unbatch(batch: dict[str, list]) -> Iterator[dict]:
    columns = list(batch)
    for values in zip(*(batch[c] for c in columns)):
        yield dict(zip(columns, values))


def _hf_rows(rows: Iterator[dict], source: str, text_field: str) -> Iterator[tuple[str, str | None]]:
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        if text_field not in row:
            raise CorpusError(f"{where}: no field {text_field!r} (fields: {sorted(row)})")
        yield where, _as_text(row[text_field], where, text_field)
