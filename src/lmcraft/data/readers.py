"""Streaming document readers: plain text, JSONL, JSON, CSV/TSV, Parquet, HTML and WARC, optionally compressed.

Every reader is a generator of `Document`s, so a corpus larger than memory streams through in
constant memory (a JSON *array* file is the one exception: it is parsed whole; use JSONL for big
corpora). Compression is chosen by suffix: `.gz`, `.zst`/`.zstd`, `.bz2`, `.xz`. HTML pages (`format: html`)
and WARC archives (`format: warc`, found by `.warc`/`.warc.gz`) give the page's main text with `url` and
`language` metadata (`lmcraft.data.web`, trafilatura). An input may declare its `licence`, which every document
carries to the part files and the packed index.

Bad input (undecodable bytes, invalid JSON, a missing or non-string text field, a null Parquet
value) is never dropped silently: each problem is recorded in an `ErrorLog` with the file, the
line or record number and what was expected, and is either skipped (`on_error="skip"`, counted
and reported) or raised as `InputFileError` (`on_error="raise"`).
"""

from __future__ import annotations

import bz2
import codecs
import csv
import glob
import gzip
import io
import json
import lzma
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from lmcraft.errors import ConfigError, InputFileError
from lmcraft.io import excerpt

__all__ = [
    "Document",
    "open_text_source",
    "text_encoding",
    "ErrorLog",
    "InputSpec",
    "detect_format",
    "expand_inputs",
    "open_binary",
    "read_documents",
    "read_file",
    "resolve_path",
    "strip_compression",
]

Format = Literal["auto", "text", "jsonl", "json", "csv", "tsv", "parquet", "html", "warc"]
TextMode = Literal["file", "paragraph", "line"]
OnError = Literal["skip", "raise"]

_COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")
_FORMAT_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".rst": "text",
    ".html": "text",
    ".htm": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".warc": "warc",
}


@dataclass(slots=True)
class Document:
    """One document: its text, a stable id (`path:line` or `path#record`) and free metadata."""

    text: str
    id: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class InputSpec:
    """Where documents come from. `path` may be a glob (matches are read in sorted order) and may
    start with `asset:NAME/` to name a file inside a fetched lmcraft asset (`asset:shakespeare/texts/*.txt`)."""

    path: str
    format: Format = "auto"
    text_field: str = "text"
    id_field: str | None = None
    text_mode: TextMode = "file"
    encoding: str = "utf-8"  # the text encoding of text/JSON/CSV inputs (any Python codec name)
    licence: str | None = None  # e.g. "CC-BY-4.0": carried by every document of this input into the outputs
    __pydantic_config__ = {"extra": "forbid"}  # pydantic reads this: unknown keys in a config are errors

    def __post_init__(self) -> None:
        self.encoding = text_encoding(self.encoding)


def text_encoding(name: str) -> str:
    """The canonical name of a Python text codec (`Latin-1` -> `iso8859-1`); `ValueError` for an unknown one."""
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise ValueError(f"encoding {name!r} is not a known text encoding (e.g. utf-8, latin-1, cp1252, "
                         "utf-16)") from None


def describe_inputs(specs: Iterable[InputSpec]) -> str:
    """The input paths of a config, cut to a bounded excerpt, for an error that is about all of them."""
    return excerpt(", ".join(str(spec.path) for spec in specs), 200)


@dataclass
class ErrorLog:
    """Counts of bad-input problems by kind, plus the first `keep` examples with file and line."""

    keep: int = 20
    counts: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, kind: str, path: str | Path, where: str, expected: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < self.keep:
            self.examples.append((str(path), where, f"{kind}: {expected}"))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: ErrorLog) -> None:
        self.counts.update(other.counts)
        room = self.keep - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])

    def counts_text(self) -> str:
        """`3 undecodable_bytes, 1 missing_field` (or "none"), for a console message; undecodable bytes come
        with the hint to declare the file's encoding."""
        text = ", ".join(f"{n:,} {kind}" for kind, n in sorted(self.counts.items())) or "none"
        if self.counts.get("undecodable_bytes"):
            text += "; a file that is not UTF-8 needs its `encoding:` in its input spec"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "examples": [list(e) for e in self.examples]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], keep: int = 20) -> ErrorLog:
        log = cls(keep=keep)
        log.counts.update(data.get("counts", {}))
        log.examples = [tuple(e) for e in data.get("examples", [])][:keep]
        return log


class _Bad(Exception):
    """Internal: one record is bad; carries the error kind and what was expected."""

    def __init__(self, kind: str, expected: str) -> None:
        super().__init__(expected)
        self.kind, self.expected = kind, expected


def strip_compression(name: str) -> tuple[str, str | None]:
    """(`name` without its compression suffix, that suffix or None): `x.jsonl.gz` -> (`x.jsonl`, `.gz`)."""
    lower = name.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, None


def detect_format(path: str | Path) -> str:
    """The reader for `path` from its suffix, ignoring a compression suffix (`x.jsonl.zst` -> jsonl)."""
    base, _ = strip_compression(Path(path).name)
    fmt = _FORMAT_BY_SUFFIX.get(Path(base).suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"cannot tell the format of {path} from its suffix; set format: to one of text, jsonl, json, csv, "
            "tsv, parquet, html, warc in the input spec"
        )
    return fmt


def open_binary(path: str | Path) -> IO[bytes]:
    """Open a file for binary reading, decompressing by suffix (gzip, zstd, bz2, xz)."""
    _, comp = strip_compression(str(path))
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".bz2":
        return bz2.open(path, "rb")
    if comp == ".xz":
        return lzma.open(path, "rb")
    if comp in (".zst", ".zstd"):
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 - closed through the wrapper
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


class _Utf8Recoder(io.RawIOBase):
    """A byte stream in another encoding, read as UTF-8 bytes, so that every reader sees UTF-8 input.

    A byte sequence that is invalid in the declared encoding raises `UnicodeDecodeError` (a `ValueError`) from
    `read`, which `read_file` reports as an unreadable file naming the encoding."""

    def __init__(self, fh: IO[bytes], encoding: str) -> None:
        self._text = io.TextIOWrapper(fh, encoding=encoding, errors="strict", newline="")
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while len(self._pending) < len(buffer):
            chunk = self._text.read(1 << 16)
            if not chunk:
                break
            self._pending += chunk.encode("utf-8")
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def close(self) -> None:
        self._text.close()
        super().close()


def open_text_source(path: str | Path, encoding: str = "utf-8") -> IO[bytes]:
    """`open_binary`, recoded to UTF-8 bytes when the file's declared encoding is another one."""
    fh = open_binary(path)
    if codecs.lookup(encoding).name == "utf-8":
        return fh
    return io.BufferedReader(_Utf8Recoder(fh, encoding))


def resolve_path(path: str) -> Path:
    """`asset:NAME/rest` -> `<fetched asset folder>/rest` (fetched through lmcraft.assets); other paths with `~`
    expanded. The one place where `asset:` paths are resolved."""
    if not path.startswith("asset:"):
        return Path(path).expanduser()
    name, _, rest = path[len("asset:") :].partition("/")
    from lmcraft.assets import fetch

    return fetch(name) / rest


def expand_inputs(specs: list[InputSpec]) -> list[tuple[InputSpec, Path]]:
    """Resolve globs into a deterministic (sorted, de-duplicated) list of (spec, file)."""
    out: list[tuple[InputSpec, Path]] = []
    seen: set[Path] = set()
    for spec in specs:
        pattern = str(resolve_path(spec.path))
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise ConfigError(f"input {spec.path!r} matches no file")
        for f in files:
            if f not in seen:
                seen.add(f)
                out.append((spec, f))
    return out


def _decode(raw: bytes, byte_offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Bad(
            "undecodable_bytes", f"valid UTF-8, got byte 0x{raw[err.start]:02x} at byte {byte_offset + err.start}"
        ) from None


Record = tuple[str, "tuple[str, str | None] | tuple[str, str | None, dict[str, Any]] | _Bad"]


def _read_text(fh: IO[bytes], mode: TextMode) -> Iterator[Record]:
    """Records of a plain-text file: the whole file, blank-line separated blocks, or non-empty lines."""
    if mode == "file":
        data = fh.read()
        try:
            yield "file", (data.decode("utf-8"), None)
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            yield "file", _Bad("undecodable_bytes", f"valid UTF-8, got byte 0x{data[err.start]:02x} on line {line}")
        return
    block: list[str] = []
    start, broken = 0, None
    for number, raw in enumerate(fh, start=1):
        try:
            text = _decode(raw)
        except _Bad as err:
            err.expected += f" (line {number})"
            if mode == "line":
                yield f"line {number}", err
                continue
            text, broken = "x", broken or err  # the block is reported once it ends
        if mode == "line":
            if text.strip():
                yield f"line {number}", (text.rstrip("\r\n"), None)
        elif text.strip():
            if not block:
                start = number
            block.append(text)
        elif block:
            yield f"line {start}", broken or ("".join(block).rstrip("\r\n"), None)
            block, broken = [], None
    if block:
        yield f"line {start}", broken or ("".join(block).rstrip("\r\n"), None)


def _field(record: Any, spec: InputSpec) -> tuple[str, str | None] | _Bad:
    if not isinstance(record, dict):
        return _Bad("not_an_object", f"a JSON object with a {spec.text_field!r} field, got {type(record).__name__}")
    if spec.text_field not in record:
        return _Bad("missing_field", f"a {spec.text_field!r} field; keys are {sorted(record)[:10]}")
    text = record[spec.text_field]
    if not isinstance(text, str):
        return _Bad("bad_field_type", f"{spec.text_field!r} to be a string, got {type(text).__name__}")
    doc_id = record.get(spec.id_field) if spec.id_field else None
    return text, None if doc_id is None else str(doc_id)


def _read_jsonl(fh: IO[bytes], spec: InputSpec) -> Iterator[Record]:
    for number, raw in enumerate(fh, start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(_decode(raw))
        except _Bad as err:
            yield f"line {number}", err
            continue
        except json.JSONDecodeError as err:
            yield f"line {number}", _Bad("invalid_json", f"one JSON object per line ({err.msg} at column {err.colno})")
            continue
        yield f"line {number}", _field(value, spec)


def _read_json(fh: IO[bytes], spec: InputSpec) -> Iterator[Record]:
    try:
        data = json.loads(_decode(fh.read()))
    except json.JSONDecodeError as err:
        raise _Bad("invalid_json", f"a JSON array of objects ({err.msg} at line {err.lineno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise _Bad("not_an_array", f"a JSON array of objects, got {type(data).__name__}")
    for index, value in enumerate(data):
        yield f"record {index}", _field(value, spec)


def _read_csv(fh: IO[bytes], spec: InputSpec, delimiter: str) -> Iterator[Record]:
    csv.field_size_limit(sys.maxsize)
    stream = io.TextIOWrapper(fh, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.reader(stream, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    if spec.text_field not in header:
        raise _Bad("missing_field", f"a header with a {spec.text_field!r} column; header is {header[:10]}")
    col = header.index(spec.text_field)
    id_col = header.index(spec.id_field) if spec.id_field in header else None
    while True:
        where = f"line {reader.line_num + 1}"
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield where, _Bad("invalid_csv", f"a well-formed CSV row ({err})")
            continue
        if len(row) <= col:
            yield where, _Bad("missing_field", f"{len(header)} columns, got {len(row)}")
        elif any("\udc80" <= ch <= "\udcff" for ch in row[col]):
            yield where, _Bad("undecodable_bytes", f"valid UTF-8 in column {spec.text_field!r}")
        else:
            yield where, (row[col], row[id_col] if id_col is not None and id_col < len(row) else None)


def _read_parquet(path: Path, spec: InputSpec) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow: pip install 'lmcraft[parquet]'") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if spec.text_field not in names:
        raise _Bad("missing_field", f"a {spec.text_field!r} column; columns are {names[:10]}")
    columns = [spec.text_field] + ([spec.id_field] if spec.id_field in names else [])
    index = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, doc_id in zip(texts, ids, strict=True):
            where = f"record {index}"
            if text is None:
                yield where, _Bad("missing_field", f"a non-null {spec.text_field!r}")
            elif not isinstance(text, str):
                yield where, _Bad("bad_field_type", f"a string column, got {type(text).__name__}")
            else:
                yield where, (text, None if doc_id is None else str(doc_id))
            index += 1


def _records(path: Path, spec: InputSpec, fmt: str, fh: IO[bytes] | None) -> Iterator[Record]:
    if fmt == "parquet":
        return _read_parquet(path, spec)
    assert fh is not None
    if fmt in ("html", "warc"):
        from lmcraft.data import web

        return (web.read_html if fmt == "html" else web.read_warc)(fh, _Bad)
    if fmt == "text":
        return _read_text(fh, spec.text_mode)
    if fmt == "jsonl":
        return _read_jsonl(fh, spec)
    if fmt == "json":
        return _read_json(fh, spec)
    return _read_csv(fh, spec, "\t" if fmt == "tsv" else ",")


def read_file(
    path: str | Path, spec: InputSpec | None = None, errors: ErrorLog | None = None, on_error: OnError = "skip"
) -> Iterator[Document]:
    """Stream the documents of one file. Bad records go to `errors` (skip) or raise `InputFileError`.

    Ids are `path` (whole-file text), `path:LINE` (line-based formats, first line of the record)
    or `path#INDEX` (JSON arrays, Parquet), unless `spec.id_field` names a field holding one.
    """
    path = Path(path)
    spec = spec or InputSpec(path=str(path))
    errors = errors if errors is not None else ErrorLog()
    fmt = detect_format(path) if spec.format == "auto" else spec.format

    def bad(err: _Bad, where: str) -> None:
        if on_error == "raise":
            raise InputFileError(path, where, f"expected {err.expected}") from None
        errors.add(err.kind, path, where, err.expected)

    fh = None if fmt == "parquet" else open_text_source(path, spec.encoding)
    try:
        for where, result in _records(path, spec, fmt, fh):
            if isinstance(result, _Bad):
                bad(result, where)
                continue
            text, field_id, *extra = result
            if field_id is not None:
                ident = field_id
            elif where == "file":
                ident = str(path)
            else:
                ident = f"{path}{':' if where.startswith('line') else '#'}{where.split()[-1]}"
            meta: dict[str, Any] = {"source": str(path), **(extra[0] if extra else {})}
            if spec.licence is not None:
                meta["licence"] = spec.licence
            yield Document(text=text, id=ident, meta=meta)
    except _Bad as err:  # a whole-file problem (bad header, not JSON at all)
        bad(err, "header" if fmt in ("csv", "tsv") else "file")
    except UnicodeDecodeError as err:  # a file recoded from its declared encoding
        bad(_Bad("undecodable_bytes", f"valid {spec.encoding} text ({err.reason})"), "file")
    except (OSError, EOFError, ValueError) as err:  # corrupt compressed stream, unreadable Parquet
        if isinstance(err, FileNotFoundError):
            raise
        bad(_Bad("unreadable_file", f"a readable {fmt} file ({type(err).__name__}: {err})"), "file")
    finally:
        if fh is not None:
            fh.close()


def read_documents(
    specs: list[InputSpec] | list[tuple[InputSpec, Path]],
    errors: ErrorLog | None = None,
    on_error: OnError = "skip",
) -> Iterator[Document]:
    """Stream the documents of every input, in file order then record order."""
    pairs = specs if specs and isinstance(specs[0], tuple) else expand_inputs(list(specs))  # type: ignore[arg-type]
    for spec, path in pairs:  # type: ignore[misc]
        yield from read_file(path, spec, errors, on_error)
