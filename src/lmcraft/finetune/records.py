"""Read labelled records from JSONL, JSON, CSV/TSV, CoNLL, plain text, or a folder of files per class.

Each record is a dict of fields plus `where` ("file, line N" / "record N") so that any later problem
(a missing label, a tag list of the wrong length) is reported with the file and the line. Paths may be
globs and may start with `asset:NAME/` (a fetched lmcraft asset). Compressed files (.gz, .zst, .bz2, .xz)
are read transparently.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcraft.data.readers import InputSpec, expand_inputs, open_binary, read_file
from lmcraft.errors import ConfigError, InputFileError
from lmcraft.finetune.config import DataSource

__all__ = ["Record", "read_records"]

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                   ".conll": "conll", ".bio": "conll", ".iob": "conll", ".txt": "text", ".text": "text",
                   ".md": "text"}


@dataclass
class Record:
    """One example's raw fields and where it came from (for error messages)."""

    fields: dict[str, Any]
    path: Path
    where: str

    def error(self, expected: str) -> InputFileError:
        return InputFileError(self.path, self.where, f"expected {expected}")


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.name.lower()
    for compressed in (".gz", ".zst", ".zstd", ".bz2", ".xz"):
        name = name.removesuffix(compressed)
    suffix = Path(name).suffix
    if suffix not in _SUFFIX_FORMATS:
        raise ConfigError(f"{path}: cannot tell the format from the suffix {suffix!r}; set format to one of "
                          f"{', '.join(sorted(set(_SUFFIX_FORMATS.values())))}")
    return _SUFFIX_FORMATS[suffix]


def _text(fh: Any, path: Path) -> str:
    data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputFileError(path, f"line {line}", f"expected UTF-8 text, got byte 0x{data[err.start]:02x}") from None


def _jsonl(path: Path) -> Iterator[Record]:
    with open_binary(path) as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"line {number}"
            try:
                value = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise InputFileError(path, where, f"expected one JSON object per line ({err})") from None
            if not isinstance(value, dict):
                raise InputFileError(path, where, f"expected a JSON object, got {type(value).__name__}")
            yield Record(value, path, where)


def _json(path: Path) -> Iterator[Record]:
    with open_binary(path) as fh:
        text = _text(fh, path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputFileError(path, f"line {err.lineno}", f"expected a JSON object or array ({err.msg})") from None
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise InputFileError(path, "file", f"expected a JSON object or an array of objects, got {type(value).__name__}")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputFileError(path, f"record {index}", f"expected a JSON object, got {type(item).__name__}")
        yield Record(item, path, "file" if isinstance(value, dict) else f"record {index}")


def _csv(path: Path, delimiter: str) -> Iterator[Record]:
    csv.field_size_limit(sys.maxsize)
    with open_binary(path) as fh:
        stream = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        reader = csv.DictReader(stream, delimiter=delimiter)
        try:
            for row in reader:
                where = f"line {reader.line_num}"
                if None in row:  # more cells than header columns
                    raise InputFileError(path, where, f"expected {len(reader.fieldnames or [])} columns as in the "
                                                      f"header, got more")
                yield Record(dict(row), path, where)
        except (csv.Error, UnicodeDecodeError) as err:
            where = f"line {reader.line_num + 1}"
            raise InputFileError(path, where, f"expected well-formed UTF-8 CSV ({err})") from None


def _conll(path: Path, source: DataSource) -> Iterator[Record]:
    """Sentences of `word ... tag` lines; blank lines separate sentences, -DOCSTART- lines are skipped."""
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    with open_binary(path) as fh:
        lines = _text(fh, path).splitlines()
    for number, line in enumerate([*lines, ""], start=1):
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if tokens:
                yield Record({source.tokens_field: tokens, source.tags_field: tags}, path, f"line {start}")
            tokens, tags = [], []
            continue
        if len(cols) < 2:
            raise InputFileError(path, f"line {number}", f"expected a word and a tag separated by whitespace, got "
                                                         f"{line.strip()!r}")
        try:
            tag = cols[source.conll_tag_column]
        except IndexError:
            raise InputFileError(path, f"line {number}", f"expected a column {source.conll_tag_column} with the tag, "
                                                         f"got {len(cols)} columns") from None
        if not tokens:
            start = number
        tokens.append(cols[0])
        tags.append(tag)


def _text_records(path: Path, source: DataSource) -> Iterator[Record]:
    spec = InputSpec(path=str(path), format="text", text_mode=source.text_mode)
    for doc in read_file(path, spec, on_error="raise"):
        where = "file" if source.text_mode == "file" else f"line {doc.id.rsplit(':', 1)[-1]}"
        yield Record({source.text_field: doc.text}, path, where)


def _folder(root: Path, source: DataSource) -> Iterator[Record]:
    """`root/<class name>/<file>`: the whole file is the text, the subfolder name the label."""
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{root}: format folder expects one subfolder per class; found none")
    for folder in classes:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            with open_binary(file) as fh:
                text = _text(fh, file)
            yield Record({source.text_field: text, source.label_field: folder.name}, file, "file")


def _resolve_folder(path: str) -> Path:
    if path.startswith("asset:"):
        from lmcraft.assets import fetch

        name, _, rest = path[len("asset:"):].partition("/")
        return fetch(name) / rest
    return Path(path).expanduser()


def read_records(source: DataSource) -> list[Record]:
    """All records of `source` in file order (globs sorted), then record order."""
    if source.format == "folder":
        root = _resolve_folder(source.path)
        if not root.is_dir():
            raise ConfigError(f"data path {source.path!r} (format folder) is not a folder")
        return list(_folder(root, source))
    out: list[Record] = []
    for _, path in expand_inputs([InputSpec(path=source.path)]):
        fmt = _format_of(path, source.format)
        if fmt == "jsonl":
            out.extend(_jsonl(path))
        elif fmt == "json":
            out.extend(_json(path))
        elif fmt in ("csv", "tsv"):
            out.extend(_csv(path, "\t" if fmt == "tsv" else ","))
        elif fmt == "conll":
            out.extend(_conll(path, source))
        else:
            out.extend(_text_records(path, source))
    if not out:
        raise ConfigError(f"data path {source.path!r} holds no records")
    return out
