"""Very long documents are cut into bounded pieces before the per-document steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from lmcraft.data.long_documents import LongDocumentSplitter, split_text
from lmcraft.data.prepare import prepare
from lmcraft.data.readers import Document
from lmcraft.stages.prepare import PrepareConfig


def test_pieces_fit_and_prefer_the_largest_break() -> None:
    text = "First paragraph here.\n\nSecond one, a bit longer.\nIts second line. More words follow"
    pieces = split_text(text, 40)
    assert "".join(pieces) == text  # nothing lost, nothing added
    assert all(len(p.encode()) <= 40 for p in pieces)
    assert pieces[0] == "First paragraph here.\n\n"  # the paragraph break, not a space inside it
    assert split_text("short", 40) == ["short"]


def test_multibyte_text_without_breaks_is_cut_on_character_boundaries() -> None:
    text = "é" * 101  # 202 bytes, no break at all
    pieces = split_text(text, 50)
    assert "".join(pieces) == text and all(len(p.encode()) <= 50 for p in pieces) and len(pieces) == 5


def test_splitter_ids_meta_and_message() -> None:
    splitter = LongDocumentSplitter(64)
    docs = [Document("tiny", "a"), Document("word " * 40, "b", {"source": "f"})]
    out = list(splitter(docs))
    assert out[0].id == "a" and [d.id for d in out[1:]] == [f"b~{k}" for k in range(len(out) - 1)]
    assert all(d.meta == {"source": "f", "split_from": "b"} for d in out[1:])
    assert splitter.split_documents == 1 and splitter.pieces == len(out) - 1
    assert "1 document(s) longer than max_document_bytes=64" in (splitter.message() or "")
    assert LongDocumentSplitter(None).message() is None and list(LongDocumentSplitter(None)(docs)) == docs


def test_prepare_cuts_a_long_line_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "d.jsonl"
    long_text = " ".join(f"word{i}." for i in range(2000))  # ~15 kB on one line
    src.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "a short one"}) + "\n")
    cfg = PrepareConfig.model_validate({"inputs": [str(src)], "output": str(tmp_path / "o"),
                                        "max_document_bytes": 4096})
    stats = prepare(cfg, progress=False)
    assert stats["docs_written"] == 6 and "cut into 5 pieces" in capsys.readouterr().err
    payload = zstandard.ZstdDecompressor().decompress((tmp_path / "o" / "parts" / "part-00000.jsonl.zst").read_bytes())
    written = [json.loads(line) for line in payload.decode().splitlines()]
    assert "".join(r["text"] for r in written[:5]) == long_text and written[4]["id"].endswith(":1~4")
    with pytest.raises(ValueError, match="greater than or equal to 1024"):
        PrepareConfig.model_validate({"inputs": [str(src)], "output": str(tmp_path / "p"), "max_document_bytes": 10})
