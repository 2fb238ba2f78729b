"""lmcraft.io: atomic writes leave the old file or the new one, reads name the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcraft.errors import InputFileError
from lmcraft.io import atomic_file, read_json, read_text, read_yaml, write_json, write_jsonl


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_file(target, "w", encoding="utf-8") as fh:
        fh.write("{half")
        raise RuntimeError("disk full")
    assert read_json(target) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    write_jsonl(tmp_path / "rows.jsonl", [{"x": "é"}, {"x": 2}])
    assert read_text(tmp_path / "rows.jsonl") == '{"x": "é"}\n{"x": 2}\n'


def test_reads_name_the_file_and_place(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(InputFileError, match=r"bad\.json, line 2, column 7: not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "latin.txt").write_bytes(b"ok\ncaf\xe9")
    with pytest.raises(InputFileError, match=r"latin\.txt, byte 6: utf-8 text"):
        read_text(tmp_path / "latin.txt")
    assert read_text(tmp_path / "latin.txt", encoding="latin-1").endswith("café")
    (tmp_path / "bomb.yaml").write_text("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcd", "bcde", strict=True)))
    with pytest.raises(InputFileError, match=r"bomb\.yaml, document: not valid YAML: document expands to"):
        read_yaml(tmp_path / "bomb.yaml")
    (tmp_path / "ok.yaml").write_text("base: &b {lr: 1}\nrun: *b\n")
    assert read_yaml(tmp_path / "ok.yaml") == {"base": {"lr": 1}, "run": {"lr": 1}}
    with pytest.raises(FileNotFoundError, match="config not found"):
        read_yaml(tmp_path / "absent.yaml", "config")
