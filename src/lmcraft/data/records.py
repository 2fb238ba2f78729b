"""The one record reader: labelled or structured examples from JSONL, JSON, CSV/TSV, Parquet, CoNLL, gettext `.po`
catalogues (parallel text: `lmcraft.data.gettext`), plain text, or a folder with one subfolder per class, for
every stage that reads examples (fine-tuning, alignment, prompting).

Each record is a dict of fields plus where it came from (`line N` for line-based files, `record N` for JSON arrays
and Parquet, `file` for whole files), so that any later problem (a missing label, a tag list of the wrong length)
names the file and the line. Paths may be globs (matches in sorted order) and may start with `asset:NAME/` (a
fetched lmcraft asset, resolved by `data.readers.resolve_path`). Compressed files (.gz, .zst, .bz2, .xz) are read
transparently. Bad input raises `InputFileError` (file, line/record, what was expected); a path that matches
nothing or a format that cannot be told raises `ConfigError`.

The streaming document reader of the prepare pipeline (`data.readers.read_documents`) shares the file opening,
compression, glob and `asset:` handling; it differs in that it may skip bad records and count them.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from lmcraft.data.readers import (
    InputSpec,
    TextMode,
    detect_format,
    expand_inputs,
    open_text_source,
    read_file,
    resolve_path,
    strip_compression,
)
from lmcraft.errors import ConfigError, InputFileError

__all__ = ["RECORD_FORMATS", "Record", "RecordFormat", "RecordLayout", "read_records"]

RecordFormat = Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "conll", "po", "text", "folder"]
RECORD_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "conll", "po", "text", "folder")
_CONLL_SUFFIXES = (".conll", ".bio", ".iob")


@dataclass
class Record:
    """One example's raw fields and where it came from (for error messages)."""

    fields: dict[str, Any]
    path: Path
    where: str

    @property
    def source(self) -> str:
        """`file, line N` / `file, record N`: how error messages name this record."""
        return f"{self.path}, {self.where}"

    def error(self, expected: str) -> InputFileError:
        return InputFileError(self.path, self.where, f"expected {expected}")


@dataclass(frozen=True)
class RecordLayout:
    """Field names for the formats whose files do not name their fields: the text of a plain-text file (split by
    `text_mode`), the text and label of a folder-per-class file, the words and tags of a CoNLL sentence (tag in
    whitespace-separated column `conll_tag_column`, word first); and the files' text `encoding`."""

    text_field: str = "text"
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    conll_tag_column: int = -1
    text_mode: TextMode = "file"
    encoding: str = "utf-8"  # the files' text encoding (a Python codec name)


def record_format(path: Path, declared: RecordFormat = "auto") -> str:
    """`declared` unless `auto`; else the format of `path` from its suffix (a compression suffix ignored)."""
    if declared != "auto":
        return declared
    base, _ = strip_compression(path.name.lower())
    if Path(base).suffix in _CONLL_SUFFIXES:
        return "conll"
    if Path(base).suffix == ".po":
        return "po"
    try:
        return detect_format(path)
    except ConfigError:
        raise ConfigError(f"{path}: cannot tell the format from the suffix {Path(base).suffix!r}; set format to "
                          f"one of {', '.join(RECORD_FORMATS)}") from None


def read_records(path: str, format: RecordFormat = "auto", layout: RecordLayout | None = None) -> Iterator[Record]:
    """Every record under `path` (a file, a glob, or with format `folder` a folder), files in sorted order."""
    layout = layout or RecordLayout()
    if format == "folder":
        root = resolve_path(path)
        if not root.is_dir():
            raise ConfigError(f"data path {path!r} (format folder) is not a folder")
        yield from _folder(root, layout)
        return
    for _, file in expand_inputs([InputSpec(path=path)]):
        fmt = record_format(file, format)
        if fmt == "parquet":
            yield from _parquet(file)
        elif fmt == "text":
            yield from _text_records(file, layout)
        else:
            with _declared_encoding(file, layout.encoding), open_text_source(file, layout.encoding) as fh:
                if fmt == "jsonl":
                    yield from _jsonl(fh, file)
                elif fmt == "json":
                    yield from _json(fh, file)
                elif fmt in ("csv", "tsv"):
                    yield from _csv(fh, file, "\t" if fmt == "tsv" else ",")
                elif fmt == "po":
                    yield from _po(fh, file)
                else:
                    yield from _conll(fh, file, layout)


@contextmanager
def _declared_encoding(path: Path, encoding: str) -> Iterator[None]:
    """Turns bytes that are invalid in a file's declared (non-UTF-8) encoding into an error naming the file."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise InputFileError(path, "file", f"expected {encoding} text ({err.reason}); is `encoding` right?") from None


def _utf8(fh: IO[bytes], path: Path) -> str:
    data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputFileError(path, f"line {line}", f"expected UTF-8 text, got byte 0x{data[err.start]:02x}") from None


def _object(value: Any, path: Path, where: str) -> Record:
    if not isinstance(value, dict):
        raise InputFileError(path, where, f"expected a JSON object, got {type(value).__name__}")
    return Record(value, path, where)


def _jsonl(fh: IO[bytes], path: Path) -> Iterator[Record]:
    for number, raw in enumerate(fh, start=1):
        if not raw.strip():
            continue
        where = f"line {number}"
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise InputFileError(path, where, f"expected one JSON object per line in UTF-8 ({err})") from None
        except json.JSONDecodeError as err:
            raise InputFileError(path, where, f"expected one JSON object per line ({err.msg} at column "
                                              f"{err.colno})") from None
        yield _object(value, path, where)


def _po(fh: IO[bytes], path: Path) -> Iterator[Record]:
    from lmcraft.data.gettext import po_messages

    for line, fields in po_messages(_utf8(fh, path), path):
        yield Record(fields, path, f"line {line}")


def _json(fh: IO[bytes], path: Path) -> Iterator[Record]:
    try:
        value = json.loads(_utf8(fh, path))
    except json.JSONDecodeError as err:
        raise InputFileError(path, f"line {err.lineno}", f"expected a JSON object or an array of objects ({err.msg}); "
                                                         "use the .jsonl suffix for one object per line") from None
    items = value if isinstance(value, list) else [value]
    for index, item in enumerate(items):
        yield _object(item, path, f"record {index}")


def _csv(fh: IO[bytes], path: Path, delimiter: str) -> Iterator[Record]:
    csv.field_size_limit(sys.maxsize)
    reader = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8", newline=""), delimiter=delimiter)
    try:
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row:  # more cells than header columns
                raise InputFileError(path, where, f"expected {len(reader.fieldnames or [])} columns as in the "
                                                  "header, got more")
            yield Record(dict(row), path, where)
    except (csv.Error, UnicodeDecodeError) as err:
        raise InputFileError(path, f"line {reader.line_num + 1}", f"expected well-formed CSV text ({err})") from None


def _parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow: pip install 'lmcraft[parquet]'") from None
    try:
        table = pq.ParquetFile(path)
        index = 0
        for batch in table.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield Record(row, path, f"record {index}")
                index += 1
    except (OSError, ValueError) as err:
        raise InputFileError(path, "file", f"expected a readable Parquet file ({type(err).__name__}: {err})") from None


def _conll(fh: IO[bytes], path: Path, layout: RecordLayout) -> Iterator[Record]:
    """Sentences of `word ... tag` lines; blank lines separate sentences, -DOCSTART- lines are skipped."""
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    lines = _utf8(fh, path).splitlines()
    for number, line in enumerate([*lines, ""], start=1):
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if tokens:
                yield Record({layout.tokens_field: tokens, layout.tags_field: tags}, path, f"line {start}")
            tokens, tags = [], []
            continue
        if len(cols) < 2:
            raise InputFileError(path, f"line {number}", f"expected a word and a tag separated by whitespace, got "
                                                         f"{line.strip()!r}")
        try:
            tag = cols[layout.conll_tag_column]
        except IndexError:
            raise InputFileError(path, f"line {number}", f"expected a column {layout.conll_tag_column} with the tag, "
                                                         f"got {len(cols)} columns") from None
        if not tokens:
            start = number
        tokens.append(cols[0])
        tags.append(tag)


def _text_records(path: Path, layout: RecordLayout) -> Iterator[Record]:
    spec = InputSpec(path=str(path), format="text", text_mode=layout.text_mode, encoding=layout.encoding)
    for doc in read_file(path, spec, on_error="raise"):
        where = "file" if layout.text_mode == "file" else f"line {doc.id.rsplit(':', 1)[-1]}"
        yield Record({layout.text_field: doc.text}, path, where)


def _folder(root: Path, layout: RecordLayout) -> Iterator[Record]:
    """`root/<class name>/<file>`: the whole file is the text, the subfolder name the label."""
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{root}: format folder expects one subfolder per class; found none")
    for folder in classes:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            with _declared_encoding(file, layout.encoding), open_text_source(file, layout.encoding) as fh:
                text = _utf8(fh, file)
            yield Record({layout.text_field: text, layout.label_field: folder.name}, file, "file")
