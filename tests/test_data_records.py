"""The one record reader: every format yields dict records that name their file and line/record."""

import gzip
import json
from pathlib import Path

import pytest

from lmcraft.data.records import RecordLayout, read_records
from lmcraft.errors import ConfigError, InputFileError


def test_formats_yield_records_with_where(tmp_path) -> None:
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n\n{"text": "y"}\n'))
    (tmp_path / "b.json").write_text(json.dumps([{"text": "z"}, {"text": "w"}]))
    (tmp_path / "c.tsv").write_text("text\tlabel\nhi\tpos\n")
    (tmp_path / "d.bio").write_text("Ann B-PER\nran O\n")
    got = [(r.path.name, r.where, r.fields) for r in read_records(str(tmp_path / "*"))]
    assert got == [
        ("a.jsonl.gz", "line 1", {"text": "x"}), ("a.jsonl.gz", "line 3", {"text": "y"}),
        ("b.json", "record 0", {"text": "z"}), ("b.json", "record 1", {"text": "w"}),
        ("c.tsv", "line 2", {"text": "hi", "label": "pos"}),
        ("d.bio", "line 1", {"tokens": ["Ann", "ran"], "tags": ["B-PER", "O"]}),
    ]
    (tmp_path / "e.txt").write_text("one\n\ntwo\n")
    lines = read_records(str(tmp_path / "e.txt"), "text", RecordLayout(text_field="body", text_mode="line"))
    assert [(r.where, r.fields) for r in lines] == [("line 1", {"body": "one"}), ("line 3", {"body": "two"})]


def test_parquet_records(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b"], "score": [1, 2]}), tmp_path / "p.parquet")
    assert [(r.where, r.fields) for r in read_records(str(tmp_path / "p.parquet"))] == [
        ("record 0", {"prompt": "a", "score": 1}), ("record 1", {"prompt": "b", "score": 2})]


def test_bad_input_names_file_and_line(tmp_path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n[1]\n')
    with pytest.raises(InputFileError, match=r"bad\.jsonl, line 2: expected a JSON object, got list"):
        list(read_records(str(tmp_path / "bad.jsonl")))
    (tmp_path / "bad.csv").write_text("text\nx,y\n")
    with pytest.raises(InputFileError, match=r"bad\.csv, line 2: expected 1 columns"):
        list(read_records(str(tmp_path / "bad.csv")))
    (tmp_path / "x.unknown").write_text("")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        list(read_records(str(tmp_path / "x.unknown")))
    with pytest.raises(ConfigError, match="matches no file"):
        list(read_records(str(tmp_path / "none-*.jsonl")))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "text"])
def test_records_in_a_declared_encoding(tmp_path: Path, fmt: str) -> None:
    """`encoding` in the layout reads Latin-1 records; a wrong declaration names the file and the encoding."""
    body = {"jsonl": '{"text": "café"}\n', "csv": "text\ncafé\n", "text": "café\n"}[fmt]
    path = tmp_path / f"x.{'txt' if fmt == 'text' else fmt}"
    path.write_bytes(body.encode("latin-1"))
    records = list(read_records(str(path), layout=RecordLayout(text_mode="line", encoding="latin-1")))
    assert [r.fields["text"] for r in records] == ["café"]
    path.write_bytes(body.encode("latin-1") + "\u20ac".encode("utf-16-le") + b"\x00\xd8")
    with pytest.raises(InputFileError, match=r"x\.\w+, (file|line 1): expected .*utf-16-le"):
        list(read_records(str(path), layout=RecordLayout(text_mode="line", encoding="utf-16-le")))
