"""Readers: every format, compression, streaming, and bad input reported with file and line."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pytest

from lmcraft.data.readers import ErrorLog, InputSpec, detect_format, expand_inputs, read_documents, read_file
from lmcraft.errors import ConfigError, InputFileError


def _texts(path: Path, **spec) -> list[str]:
    return [d.text for d in read_file(path, InputSpec(path=str(path), **spec))]


def test_plain_text_modes(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("one\nline two\n\n\n  \nthree\n\nfour\n", encoding="utf-8")
    assert _texts(f) == ["one\nline two\n\n\n  \nthree\n\nfour\n"]
    docs = list(read_file(f, InputSpec(path=str(f), text_mode="paragraph")))
    assert [d.text for d in docs] == ["one\nline two", "three", "four"]
    assert [d.id for d in docs] == [f"{f}:1", f"{f}:6", f"{f}:8"]
    assert _texts(f, text_mode="line") == ["one", "line two", "three", "four"]


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst", ".bz2", ".xz"])
def test_jsonl_with_compression(tmp_path: Path, suffix: str) -> None:
    import lzma

    import zstandard

    raw = b'{"text": "alpha", "id": "x1"}\n\n{"text": "beta"}\n'
    path = tmp_path / f"d.jsonl{suffix}"
    packers = {
        "": lambda b: b,
        ".gz": gzip.compress,
        ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
        ".bz2": bz2.compress,
        ".xz": lzma.compress,
    }
    path.write_bytes(packers[suffix](raw))
    docs = list(read_file(path, InputSpec(path=str(path), id_field="id")))
    assert [d.text for d in docs] == ["alpha", "beta"]
    assert docs[0].id == "x1" and docs[1].id == f"{path}:3"
    assert detect_format(path) == "jsonl"


def test_jsonl_bad_records_are_counted_with_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "ok"}\n{not json}\n{"body": "x"}\n{"text": 3}\n[1]\n{"text": "caf\xff"}\n{"text": "end"}\n'
    )
    log = ErrorLog()
    texts = [d.text for d in read_file(path, errors=log)]
    assert texts == ["ok", "end"]
    assert log.counts == {
        "invalid_json": 1,
        "missing_field": 1,
        "bad_field_type": 1,
        "not_an_object": 1,
        "undecodable_bytes": 1,
    }
    wheres = [w for _, w, _ in log.examples]
    assert wheres == ["line 2", "line 3", "line 4", "line 5", "line 6"]
    assert all(p == str(path) for p, _, _ in log.examples)
    with pytest.raises(InputFileError, match=r"bad\.jsonl, line 2: expected one JSON object per line"):
        list(read_file(path, on_error="raise"))


def test_custom_text_field_json_array_and_csv(tmp_path: Path) -> None:
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"body": "first"}, {"body": "second"}, {"title": "no body"}]))
    log = ErrorLog()
    docs = list(read_file(arr, InputSpec(path=str(arr), text_field="body"), log))
    assert [d.text for d in docs] == ["first", "second"] and docs[1].id == f"{arr}#1"
    assert log.examples == [(str(arr), "record 2", "missing_field: a 'body' field; keys are ['title']")]

    csv_path = tmp_path / "c.csv"
    csv_path.write_bytes(b'id,text\n1,"multi\nline, with comma"\n2,plain\n3\n4,bad \xff byte\n')
    log = ErrorLog()
    docs = list(read_file(csv_path, InputSpec(path=str(csv_path), id_field="id"), log))
    assert [(d.id, d.text) for d in docs] == [("1", "multi\nline, with comma"), ("2", "plain")]
    assert log.counts == {"missing_field": 1, "undecodable_bytes": 1}
    assert [w for _, w, _ in log.examples] == ["line 5", "line 6"]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabel\nhello\t1\n")
    assert _texts(tsv) == ["hello"]


def test_csv_without_the_column_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("a,b\n1,2\n")
    log = ErrorLog()
    assert list(read_file(path, errors=log)) == []
    assert log.examples == [(str(path), "header", "missing_field: a header with a 'text' column; header is ['a', 'b']")]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "n": [1, 2, 3]}), path)
    log = ErrorLog()
    docs = list(read_file(path, errors=log))
    assert [(d.id, d.text) for d in docs] == [(f"{path}#0", "a"), (f"{path}#2", "c")]
    assert log.examples == [(str(path), "record 1", "missing_field: a non-null 'text'")]


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252", "utf-16"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".jsonl.gz"])
def test_declared_encoding_reads_every_format(tmp_path: Path, encoding: str, suffix: str) -> None:
    """`encoding:` on an input reads non-UTF-8 text, compressed or not, in every text format."""
    texts = ["café au lait", "naïve façade"]
    body = {".txt": "\n\n".join(texts) + "\n", ".csv": "text\n" + "\n".join(texts) + "\n"}.get(
        suffix.removesuffix(".gz"), "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    raw = body.encode(encoding)
    f = tmp_path / f"x{suffix}"
    f.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    spec = InputSpec(path=str(f), encoding=encoding, text_mode="paragraph")
    assert [d.text for d in read_file(f, spec)] == texts


def test_wrong_declared_encoding_and_unknown_encoding(tmp_path: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_bytes("line one\n".encode("utf-16-le") + b"\x00\xd8")  # a lone high surrogate at the end
    log = ErrorLog()
    assert list(read_file(f, InputSpec(path=str(f), encoding="utf-16-le", text_mode="line"), log)) == []
    assert log.counts == {"undecodable_bytes": 1} and "valid utf-16-le text" in log.examples[0][2]
    assert "needs its `encoding:`" in log.counts_text()
    with pytest.raises(ValueError, match="'klingon' is not a known text encoding"):
        InputSpec(path=str(f), encoding="klingon")


def test_undecodable_text_and_corrupt_archive(tmp_path: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_bytes(b"good para\n\nbad \xc3\x28 para\nstill bad\n\nfine\n")
    log = ErrorLog()
    whole = ErrorLog()
    assert [d.text for d in read_file(f, errors=whole)] == []  # file mode: the file is one bad document
    assert whole.examples == [(str(f), "file", "undecodable_bytes: valid UTF-8, got byte 0xc3 on line 3")]
    docs = [d.text for d in read_file(f, InputSpec(path=str(f), text_mode="paragraph"), log)]
    assert docs == ["good para", "fine"]
    assert log.examples[0][1] == "line 3" and "undecodable_bytes" in log.examples[0][2]
    gz = tmp_path / "broken.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    log = ErrorLog()
    list(read_file(gz, errors=log))
    assert log.counts == {"unreadable_file": 1}


def test_streaming_is_lazy(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        for i in range(10_000):
            fh.write(json.dumps({"text": f"doc {i}"}) + "\n")
    stream = read_file(path)
    assert next(stream).text == "doc 0"  # a generator: nothing else was parsed yet
    assert sum(1 for _ in stream) == 9_999


def test_expand_inputs_globs_and_errors(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text(name)
    pairs = expand_inputs([InputSpec(path=str(tmp_path / "*.txt")), InputSpec(path=str(tmp_path / "a.txt"))])
    assert [p.name for _, p in pairs] == ["a.txt", "b.txt"]
    assert [d.text for d in read_documents([InputSpec(path=str(tmp_path / "*"))])] == ["a.txt", "b.txt", "c.md"]
    with pytest.raises(ConfigError, match="matches no file"):
        expand_inputs([InputSpec(path=str(tmp_path / "*.csv"))])
    (tmp_path / "x.weird").write_text("?")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        detect_format(tmp_path / "x.weird")
