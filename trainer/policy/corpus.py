"""Prompt corpora: the engineered prompts users train on, from the files they actually have.

`.txt` (one prompt per line), `.csv` / `.tsv` (a named column), `.jsonl` (a named field), `.parquet`
(DiffusionDB's metadata; needs pyarrow) and Hugging Face dataset files (`hf-dataset:OWNER/NAME/path`,
fetched through the weights resolver's offline rules). Every prompt is whitespace-normalised, empties
and case-insensitive duplicates are dropped, and optional length and blocklist filters apply. A bad
file is one `CorpusError` naming the file, the line or row, and the problem.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HF_DATASET_PREFIX = "hf-dataset:"
FORMATS = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
# A prompt longer than this is not a prompt (a pasted file, a broken row): refused with its line.
MAX_PROMPT_CHARS = 5_000
_WHITESPACE = re.compile(r"\s+")


class CorpusError(ValueError):
    """A corpus file that cannot be read as prompts; the message names the file, line and problem."""

    def __init__(self, path: Path | str, problem: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


@dataclass
class Corpus:
    """The prompts kept, in file order, and what happened to the others."""

    prompts: list[str]
    source: str
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def stats(self) -> dict:
        return {"corpus": self.source, "read": self.read, "kept": len(self.prompts), "dropped": dict(self.dropped)}


def normalize_prompt(text: str) -> str:
    """Collapse runs of whitespace (newlines, tabs) to one space and strip the ends."""
    return _WHITESPACE.sub(" ", text).strip()


def read_corpus(
    spec: str | Path,
    *,
    column: str = "prompt",
    min_words: int = 1,
    max_words: int | None = None,
    blocklist: str | Path | None = None,
    limit: int | None = None,
    allow_download: bool | None = None,
) -> Corpus:
    """Read prompts from a file or `hf-dataset:OWNER/NAME/path/to/file`, normalised and filtered.

    Args:
        column: the csv/tsv column, jsonl field or parquet column holding the prompt.
        min_words, max_words: keep prompts with this many words (inclusive).
        blocklist: a text file of terms, one per line; a prompt containing any of them (whole words,
            case-insensitive) is dropped.
        limit: stop after this many kept prompts.
    """
    path = resolve_corpus_path(spec, allow_download=allow_download)
    if min_words < 0 or (max_words is not None and max_words < min_words):
        raise ValueError(f"need 0 <= min_words <= max_words; got min_words={min_words}, max_words={max_words}")
    blocked = _read_blocklist(Path(blocklist)) if blocklist else None
    corpus = Corpus([], str(spec))
    seen: set[str] = set()

    def drop(reason: str) -> None:
        corpus.dropped[reason] = corpus.dropped.get(reason, 0) + 1

    for line, raw in _records(path, column):
        corpus.read += 1
        if len(raw) > MAX_PROMPT_CHARS:
            raise CorpusError(path, f"a prompt of {len(raw)} characters (the limit is {MAX_PROMPT_CHARS}); "
                                    "is this the right file or column?", line)
        prompt = normalize_prompt(raw)
        words = len(prompt.split())
        if not prompt:
            drop("empty")
        elif words < min_words or (max_words is not None and words > max_words):
            drop("length")
        elif blocked is not None and blocked.search(prompt):
            drop("blocklist")
        elif prompt.lower() in seen:
            drop("duplicate")
        else:
            seen.add(prompt.lower())
            corpus.prompts.append(prompt)
            if limit is not None and len(corpus.prompts) >= limit:
                break
    if not corpus.prompts:
        raise CorpusError(path, f"no prompts left ({corpus.read} read, dropped: {corpus.dropped or 'none'})")
    return corpus


def resolve_corpus_path(spec: str | Path, *, allow_download: bool | None = None) -> Path:
    """A local path as is (checked), or a Hugging Face dataset file through the weights resolver."""
    text = str(spec).strip()
    if not text:
        raise ValueError("no corpus given: pass a .txt/.csv/.tsv/.jsonl/.parquet file or hf-dataset:OWNER/NAME/FILE")
    if text.startswith(HF_DATASET_PREFIX):
        from promptist_core.weights import resolve_dataset_file

        path = resolve_dataset_file(text[len(HF_DATASET_PREFIX):], allow_download=allow_download)
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise CorpusError(path, "no such file" if not path.exists() else "not a file")
    if path.suffix.lower() not in FORMATS:
        raise CorpusError(path, f"unknown corpus format '{path.suffix}'; use one of {', '.join(FORMATS)}")
    return path


def _records(path: Path, column: str) -> Iterator[tuple[int, str]]:
    """(line or row number, prompt text) for every record of the file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(path, column)
        return
    if suffix == ".txt":
        yield from enumerate(_read_text(path).splitlines(), 1)
    elif suffix == ".jsonl":
        yield from _jsonl_records(path, column)
    else:
        yield from _table_records(path, _read_text(path), column, "\t" if suffix == ".tsv" else ",")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CorpusError(path, f"not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8", line) from None


def jsonl_objects(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-empty line of a JSONL file; `what` says what an object holds."""
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(path, f"invalid JSON ({e.msg} at column {e.colno})", i) from None
        if not isinstance(record, dict):
            raise CorpusError(path, f"expected a JSON object with {what}, got {type(record).__name__}", i)
        yield i, record


def _jsonl_records(path: Path, column: str) -> Iterator[tuple[int, str]]:
    for i, record in jsonl_objects(path, f"a '{column}' field"):
        if column not in record:
            raise CorpusError(path, f"no field '{column}' (fields: {', '.join(record) or 'none'}); "
                                    "choose one with --column", i)
        yield i, _as_text(path, record[column], column, i)


def _table_records(path: Path, text: str, column: str, delimiter: str) -> Iterator[tuple[int, str]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise CorpusError(path, "the file is empty") from None
    except csv.Error as e:
        raise CorpusError(path, f"malformed header ({e})", 1) from None
    if column not in header:
        raise CorpusError(path, f"no column '{column}' (columns: {', '.join(header) or 'none'}); "
                                "choose one with --column", 1)
    index = header.index(column)
    try:
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise CorpusError(path, f"{len(row)} fields where the header has {len(header)}", line)
            yield line, row[index]
    except csv.Error as e:
        raise CorpusError(path, f"malformed row ({e})", reader.line_num) from None


def _parquet_records(path: Path, column: str) -> Iterator[tuple[int, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(path, "reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except Exception as e:
        raise CorpusError(path, f"not a readable parquet file ({type(e).__name__}: {e})") from None
    if column not in names:
        raise CorpusError(path, f"no column '{column}' (columns: {', '.join(names)}); choose one with --column")
    row = 0
    for batch in table.iter_batches(columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield row, _as_text(path, value, column, row) if value is not None else ""


def _as_text(path: Path, value, column: str, line: int) -> str:
    if not isinstance(value, str):
        raise CorpusError(path, f"'{column}' is {type(value).__name__}, not text", line)
    return value


def _read_blocklist(path: Path) -> re.Pattern:
    if not path.is_file():
        raise CorpusError(path, "blocklist file not found")
    terms = [normalize_prompt(t) for t in _read_text(path).splitlines()]
    terms = [t for t in terms if t and not t.startswith("#")]
    if not terms:
        raise CorpusError(path, "the blocklist holds no terms (one per line)")
    return re.compile(r"\b(?:" + "|".join(re.escape(t) for t in terms) + r")\b", re.IGNORECASE)
