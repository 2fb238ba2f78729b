"""The prepare executor: raw text -> cleaned, filtered, deduplicated documents -> part files -> token shards.

The run reads the inputs as a stream and cuts it into chunks of `chunk_docs` documents. Worker processes
(`workers`) run the per-document steps of a chunk (`process_chunk`); the main process applies the
deduplication decisions in input order (`Decider`) and writes the chunk as one part (`lmcraft.data.parts`).

A killed run restarts after its last complete part (the dedup indexes are rebuilt from the saved keys, the
inputs are re-read and the finished documents skipped), so nothing is written twice. Chunks are cut by
document count and dedup is decided in order, so the output is byte-identical for any number of workers. At
the end the token parts are packed into memory-mapped shards (`OUT/packed/`), and `stats.json`, `report.md`
and `report.png` describe every step. A run folder belongs to one config: `run.json` records its
fingerprint (the sha256 of the config fields that decide the output, and the shard).

Sharding (`shard = (i, N)`) processes a deterministic 1/N of the input, into `OUT/shard-i-of-N/`: every N-th
file when there are at least N files, else every N-th document. Deduplication then works within a shard.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcraft.data.executors import ExecutorKind, make_executor
from lmcraft.data.long_documents import LongDocumentSplitter
from lmcraft.data.parts import complete_parts, eos_id, load_part_arrays, pack_parts, remove_incomplete, write_part
from lmcraft.data.pipeline import ChunkResult, Decider, StepStats, build_steps, example, is_validation
from lmcraft.data.readers import Document, ErrorLog, expand_inputs, read_documents
from lmcraft.errors import ConfigError
from lmcraft.io import clean_staging, read_json, write_text

if TYPE_CHECKING:
    from lmcraft.data.prepare_config import PrepareConfig

__all__ = ["prepare", "shard_folder"]


def shard_folder(output: Path, shard: tuple[int, int]) -> Path:
    """`output` itself, or `output/shard-i-of-N` for shard i of N > 1."""
    return Path(output) / (f"shard-{shard[0]}-of-{shard[1]}" if shard[1] > 1 else "")


def fingerprint(cfg: PrepareConfig, steps: list[Any], shard: tuple[int, int]) -> str:
    """sha256 of what decides the output: inputs, steps (with every default), chunking, error policy, packing, seed
    and shard."""
    data = {
        "inputs": [asdict(s) for s in cfg.inputs],
        "steps": [{"type": s.name, **{k: v for k, v in vars(s).items() if not k.startswith("_")}} for s in steps],
        "chunk_docs": cfg.chunk_docs,
        "max_document_bytes": cfg.max_document_bytes,
        "on_error": cfg.on_error,
        "pack": cfg.pack.model_dump(mode="json") if cfg.pack else None,
        "seed": cfg.seed,
        "shard": list(shard),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# ---- main side ---------------------------------------------------------------------------------


class _Chunks:
    """The input stream cut into chunks of `size` documents, each with the input errors met reading it."""

    def __init__(self, cfg: PrepareConfig, files: list[Any], doc_shard: tuple[int, int] | None, skip: int) -> None:
        self.cfg, self.files, self.doc_shard, self.skip = cfg, files, doc_shard, skip
        self.splitter = LongDocumentSplitter(cfg.max_document_bytes)

    def __iter__(self) -> Iterator[tuple[list[Document], dict[str, Any], int]]:
        log = ErrorLog()
        keep_errors = self.doc_shard is None or self.doc_shard[0] == 0  # doc sharding: shard 0 reports errors
        docs: list[Document] = []
        seen = 0
        for index, doc in enumerate(self.splitter(read_documents(self.files, log, self.cfg.on_error))):
            if self.doc_shard is not None and index % self.doc_shard[1] != self.doc_shard[0]:
                continue
            seen += 1
            if seen <= self.skip:
                if seen == self.skip:
                    log = _reset(log)
                continue
            docs.append(doc)
            if len(docs) == self.cfg.chunk_docs:
                yield docs, (log.to_dict() if keep_errors else {}), sum(len(d.text.encode("utf-8")) for d in docs)
                docs, log = [], _reset(log)
        if docs or (keep_errors and log.total):
            yield docs, (log.to_dict() if keep_errors else {}), sum(len(d.text.encode("utf-8")) for d in docs)


def _with_last(items: Any) -> Iterator[tuple[Any, bool]]:
    """(item, is it the last one) with one item of look-ahead."""
    it = iter(items)
    current = next(it, None)
    while current is not None:
        following = next(it, None)
        yield current, following is None
        current = following


def _reset(log: ErrorLog) -> ErrorLog:
    log.counts.clear()
    log.examples.clear()
    return log


def _licences(kept: list[Any]) -> dict[str, dict[str, int]]:
    """{licence: {documents, bytes}} of the kept outputs whose input declares a licence."""
    out: dict[str, dict[str, int]] = {}
    for doc in kept:
        if doc.licence is None:
            continue
        entry = out.setdefault(doc.licence, {"documents": 0, "bytes": 0})
        entry["documents"] += len(doc.outputs)
        entry["bytes"] += sum(len(text.encode("utf-8")) for _, text in doc.outputs)
    return out


def _spread(items: list[Any], n: int) -> list[Any]:
    """`n` items evenly spaced over `items` (all of them when there are at most `n`)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def _summarise(records: list[dict[str, Any]], n_files: int, shard: tuple[int, int],
               kept_examples: int = 6) -> dict[str, Any]:
    """The run's statistics: the sums of the parts' records, per step and overall; as kept examples the first
    kept document of `kept_examples` chunks spread over the run (the removed ones are per step)."""
    errors = ErrorLog()
    steps: list[StepStats] = []
    licences: Counter = Counter()
    licence_bytes: Counter = Counter()
    for rec in records:
        for name, entry in rec.get("licences", {}).items():
            licences[name] += entry["documents"]
            licence_bytes[name] += entry["bytes"]
        errors.merge(ErrorLog.from_dict(rec.get("errors") or {}))
        for i, st in enumerate(rec["steps"]):
            if i == len(steps):
                steps.append(StepStats(st["name"]))
            steps[i].add(StepStats.from_dict(st))
    summary = {
        "files": n_files,
        "shard": f"{shard[0]}/{shard[1]}" if shard[1] > 1 else None,
        "docs_read": sum(r["docs_read"] for r in records),
        "bytes_read": sum(r["bytes_read"] for r in records),
        "docs_written": sum(r["docs_written"] for r in records),
        "bytes_written": sum(r["bytes_written"] for r in records),
        "errors": errors.to_dict(),
        "steps": [s.to_dict() for s in steps],
        "kept_examples": _spread([r["kept_example"] for r in records if "kept_example" in r], kept_examples),
    }
    if licences:
        summary["licences"] = {name: {"documents": licences[name], "bytes": licence_bytes[name]}
                               for name in sorted(licences)}
    return summary


def _claim_run_file(out: Path, digest: str, shard: tuple[int, int]) -> None:
    """Record the run's fingerprint in `out/run.json`; refuse a folder holding a run of another config."""
    run_file = out / "run.json"
    if run_file.is_file() and read_json(run_file, "prepare run record").get("fingerprint") != digest:
        raise ConfigError(
            f"{out} holds a run with a different config (or shard); rerun with --overwrite to replace it, "
            "or choose another output folder"
        )
    (out / "parts").mkdir(parents=True, exist_ok=True)
    clean_staging(out / "parts")  # files of a chunk that was being written when the last run died
    write_text(run_file, json.dumps({"fingerprint": digest, "shard": list(shard)}) + "\n")


def prepare(
    cfg: PrepareConfig,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    stop_after_chunks: int | None = None,
    executor: ExecutorKind = "local",
    ray_address: str | None = None,
    steps: list[Any] | None = None,
) -> dict[str, Any]:
    """Run the configured pipeline (see the module docstring); returns the run statistics.

    `steps` are `cfg.steps` built (`pipeline.build_steps`, the default), given by a caller that attached what
    some steps take from higher floors (`lmcraft prepare` wiring: eval tasks, a decoder for back-translation).

    `executor` is where the per-document steps run (`lmcraft.data.executors`: local processes or Ray actors);
    the output does not depend on it. `stop_after_chunks` ends the run early after writing that many new chunks
    (to test resuming).
    """
    from tqdm import tqdm

    from lmcraft.data.pack import DocTokenizer
    from lmcraft.data.report import write_report

    out = shard_folder(cfg.output, shard)
    parts = out / "parts"
    if steps is None:
        steps = build_steps(cfg.steps)
    _claim_run_file(out, fingerprint(cfg, steps, shard), shard)

    files = expand_inputs(cfg.inputs)
    n_files = len(files)
    doc_shard = None
    if shard[1] > 1:
        if len(files) >= shard[1]:
            files = files[shard[0] :: shard[1]]
        else:
            doc_shard = shard
    decider = Decider(steps)
    tok = None
    if cfg.pack is not None:
        path = Path(cfg.pack.tokenizer)
        tok = DocTokenizer(path / "tokenizer.json" if path.is_dir() else path, sentences=cfg.pack.sentences)
        eos = eos_id(cfg.pack.tokenizer, cfg.pack.eos_token, tok)  # fail early on a tokenizer without EOS

    records = complete_parts(parts)
    for k in range(len(records)):
        dedup_file = parts / f"part-{k:05d}.dedup.npz"
        if decider.indexes and dedup_file.is_file():
            decider.restore(load_part_arrays(dedup_file))
    remove_incomplete(parts, len(records))
    skip = sum(r["docs_read"] for r in records)
    finished = bool(records) and records[-1].get("last", False)  # every chunk of the input is written

    chunks = _Chunks(cfg, files, doc_shard, skip)
    # started before the progress bar's monitor thread exists (a forked pool must not inherit it)
    pool = make_executor(executor, workers, steps, tok, ray_address) if not finished else None
    bar = tqdm(desc="prepare", unit="doc", initial=skip, disable=not progress or finished, file=sys.stderr)
    new = 0
    try:
        if not finished:
            pending: deque = deque()

            def handle(item: tuple[ChunkResult, dict, int, int, bool]) -> None:
                nonlocal new
                result, errors, nbytes, ndocs, last = item
                kept, stats, added = decider.decide(result)
                val = None
                if cfg.pack is not None:
                    val = [is_validation(out_id, cfg.pack.val_fraction, cfg.seed)
                           for doc in kept for out_id, _ in doc.outputs]
                meta = {"docs_read": ndocs, "bytes_read": nbytes, "errors": errors, "last": last}
                if kept:  # the report shows some chunks' first kept document
                    meta["kept_example"] = example(kept[0])
                licences = _licences(kept)
                if licences:
                    meta["licences"] = licences
                dedup = decider.state(added) if decider.indexes else None
                records.append(write_part(parts, len(records), kept, val, dedup, meta, [s.to_dict() for s in stats]))
                new += 1
                bar.update(ndocs)
                bar.set_postfix(kept=sum(r["docs_written"] for r in records), refresh=False)

            stopped = False
            for (docs, errors, nbytes), last in _with_last(chunks):
                if stop_after_chunks is not None and new + len(pending) >= stop_after_chunks:
                    stopped = True
                    break
                assert pool is not None
                pending.append((pool.submit(docs), errors, nbytes, len(docs), last))
                while len(pending) > pool.capacity:
                    res, *meta = pending.popleft()
                    handle((res.get(), *meta))
            while pending:
                res, *meta = pending.popleft()
                handle((res.get(), *meta))
            if chunks.splitter.message():
                print(chunks.splitter.message(), file=sys.stderr)
            if stopped:
                return {"stopped": True, "chunks": len(records)}
    finally:
        bar.close()
        if pool is not None:
            pool.close()

    stats = _summarise(records, n_files, shard)
    checked = [step.record(st) for step, st in zip(steps, stats["steps"], strict=True) if hasattr(step, "record")]
    if checked:  # what the data was decontaminated against (read back by `lmcraft eval` through pretrain)
        stats["decontamination"] = checked
    if cfg.pack is not None:
        assert tok is not None
        provenance = {k: stats[k] for k in ("licences", "decontamination") if k in stats}
        stats["packed"] = pack_parts(parts, len(records), out / "packed", cfg.pack.shard_tokens, tok, eos,
                                     str(Path(cfg.pack.tokenizer).resolve()), provenance)
    write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    report = write_report(stats, out, cfg.title)
    return {**stats, "output": str(out), "report": str(report)}
