"""The part files of a prepare run: one chunk of the input, written as one part, and packed at the end.

    OUT/parts/part-00012.jsonl.zst   kept documents {"id", "text", "source"} (+ "licence" of its input and
                                     "meta": reader metadata (url, language) and annotate steps' scores, when set)
    OUT/parts/part-00012.tokens.npz  their token ids and sentence lengths (with `pack:`)
    OUT/parts/part-00012.dedup.npz   the dedup keys the chunk added (to rebuild indexes on resume)
    OUT/parts/part-00012.json        the chunk's statistics, written last: the chunk is complete

A part counts as complete when its `.json` record exists; the complete parts are those numbered 0, 1, ...
up to the first gap. `pack_parts` concatenates the token parts, in order, into memory-mapped shards.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lmcraft.errors import ConfigError, InputFileError
from lmcraft.io import read_json, save_npz, staged_dir, write_bytes, write_text

__all__ = ["complete_parts", "eos_id", "load_part_arrays", "pack_parts", "remove_incomplete", "write_part"]

_TOKEN_ARRAYS = ("ids", "doc_lens", "sent_counts", "sent_lens", "val")


def part_path(parts: Path, k: int, suffix: str) -> Path:
    return parts / f"part-{k:05d}{suffix}"


def complete_parts(parts: Path) -> list[dict[str, Any]]:
    """The records of parts 0, 1, ... up to the first gap (a part is complete once its `.json` exists)."""
    records = []
    while (path := part_path(parts, len(records), ".json")).is_file():
        records.append(read_json(path, "part record"))
    return records


def remove_incomplete(parts: Path, n_complete: int) -> None:
    """Delete the files of parts numbered `n_complete` and above: leftovers of a chunk that was not completed."""
    for stale in parts.glob("part-*"):
        if int(stale.name[5:10]) >= n_complete:
            stale.unlink()


def load_part_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a part's `.npz`; a damaged file is named, with the way to rebuild it."""
    try:
        with np.load(path) as z:
            return {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise InputFileError(path, "whole file", f"a complete part file of an earlier run ({type(err).__name__}: "
                             f"{err}); delete it (and its .json) and rerun to rebuild it") from None


def _token_arrays(path: Path) -> tuple[np.ndarray, ...]:
    arrays = load_part_arrays(path)
    missing = [n for n in _TOKEN_ARRAYS if n not in arrays]
    if missing:
        raise InputFileError(path, "whole file", f"a complete part file of an earlier run (no {', '.join(missing)}); "
                             "delete it (and its .json) and rerun to rebuild it")
    return tuple(arrays[n] for n in _TOKEN_ARRAYS)


def write_part(parts: Path, k: int, kept: list[Any], val_split: list[bool] | None, dedup_state: dict | None,
               meta: dict[str, Any], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Write part `k`: kept documents, their tokens (when `val_split` gives each output's split), the dedup
    keys it added, and last its record (`meta`, the output counts and the per-step `steps`), which is returned."""
    import zstandard

    lines = []
    n_bytes = 0
    for doc in kept:
        for out_id, text in doc.outputs:
            row = {"id": out_id, "text": text, "source": doc.source}
            if doc.licence is not None:
                row["licence"] = doc.licence
            if doc.meta:
                row["meta"] = doc.meta
            lines.append(json.dumps(row, ensure_ascii=False))
            n_bytes += len(text.encode("utf-8"))
    payload = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    write_bytes(part_path(parts, k, ".jsonl.zst"), zstandard.ZstdCompressor(level=3).compress(payload))
    if val_split is not None:
        ids, doc_lens, sent_counts, sent_lens = [], [], [], []
        for doc in kept:
            for tok_ids, lens in doc.tokens:
                ids.append(tok_ids)
                doc_lens.append(len(tok_ids))
                sent_counts.append(len(lens))
                sent_lens.append(lens)
        save_npz(
            part_path(parts, k, ".tokens.npz"),
            {
                "ids": np.concatenate(ids) if ids else np.empty(0, np.uint32),
                "doc_lens": np.array(doc_lens, dtype=np.int64),
                "sent_counts": np.array(sent_counts, dtype=np.int64),
                "sent_lens": np.concatenate(sent_lens) if sent_lens else np.empty(0, np.int32),
                "val": np.array(val_split, dtype=bool),
            },
        )
    if dedup_state is not None:
        save_npz(part_path(parts, k, ".dedup.npz"), dedup_state)
    record = {**meta, "docs_written": len(lines), "bytes_written": n_bytes, "steps": steps}
    write_text(part_path(parts, k, ".json"), json.dumps(record) + "\n")
    return record


def eos_id(tokenizer_path: Path, eos_token: str | None, tok: Any) -> int:
    """The id of `eos_token`, by default the `eos_token` (else `sep_token`) of the tokenizer's
    tokenizer_config.json."""
    root = Path(tokenizer_path)
    cfg_path = (root if root.is_dir() else root.parent) / "tokenizer_config.json"
    name = eos_token
    if name is None and cfg_path.is_file():
        config = read_json(cfg_path, "tokenizer config")
        name = config.get("eos_token") or config.get("sep_token")
        name = name.get("content") if isinstance(name, dict) else name
    if name is None:
        raise ConfigError(f"pack.eos_token is not set and {cfg_path} names no eos_token or sep_token")
    eos = tok.tokenizer.token_to_id(name)
    if eos is None:
        raise ConfigError(f"pack.eos_token {name!r} is not in the vocabulary of {tokenizer_path}")
    return int(eos)


def pack_parts(parts: Path, n_parts: int, packed: Path, shard_tokens: int, tok: Any, eos: int,
               tokenizer_name: str, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pack the token parts 0..n_parts-1, document by document in order, into `packed/` (train and validation
    splits); returns the shard index, which also carries `provenance` (the corpus' licences, what it was
    decontaminated against). The folder is built aside and replaces a finished `packed/` only once it is
    complete."""
    from lmcraft.data.pack import ShardWriter

    with staged_dir(packed) as stage:
        writer = ShardWriter(stage, vocab_size=tok.vocab_size, eos_id=eos, shard_tokens=shard_tokens,
                             tokenizer=tokenizer_name, **(provenance or {}))
        for k in range(n_parts):
            ids, doc_lens, sent_counts, sent_lens, val = _token_arrays(part_path(parts, k, ".tokens.npz"))
            starts = np.concatenate([[0], np.cumsum(doc_lens)])
            sstarts = np.concatenate([[0], np.cumsum(sent_counts)])
            for d in range(len(doc_lens)):
                writer.add(
                    "validation" if val[d] else "train",
                    ids[starts[d] : starts[d + 1]],
                    sent_lens[sstarts[d] : sstarts[d + 1]],
                )
        return writer.close()
