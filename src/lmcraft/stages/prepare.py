"""`lmcraft prepare CONFIG.yaml`: raw text -> cleaned, filtered, deduplicated documents -> token shards.

The run reads the inputs as a stream and cuts it into chunks of `chunk_docs` documents. Worker
processes (`--workers N`) run the per-document steps of a chunk; the main process applies the
deduplication decisions in input order and writes the chunk as one part:

    OUT/parts/part-00012.jsonl.zst   kept documents {"id", "text", "source"}
    OUT/parts/part-00012.tokens.npz  their token ids and sentence lengths (with `pack:`)
    OUT/parts/part-00012.dedup.npz   the dedup keys the chunk added (to rebuild indexes on resume)
    OUT/parts/part-00012.json        the chunk's statistics, written last: the chunk is complete

A killed run restarts after its last complete part (the dedup indexes are rebuilt from the saved
keys, the inputs are re-read and the finished documents skipped), so nothing is written twice.
Chunks are cut by document count and dedup is decided in order, so the output is byte-identical
for any `--workers`. At the end the token parts are packed into memory-mapped shards
(`OUT/packed/`), and `stats.json`, `report.md` and `report.png` describe every step.

`--shard i/N` processes a deterministic 1/N of the input for multi-machine runs, into
`OUT/shard-i-of-N/`: every N-th file when there are at least N files, else every N-th document.
Deduplication then works within a shard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from lmcraft.config import ExistingPath, Section, StageConfig
from lmcraft.errors import ConfigError, InputFileError
from lmcraft.io import clean_staging, excerpt, save_npz, staged_dir, write_bytes, write_text
from lmcraft.stages import add_config_arguments, claim, load_stage_config

__all__ = ["PackConfig", "PrepareConfig", "add_arguments", "run"]


class PackConfig(Section):
    """Tokenise kept documents and pack them into token shards."""

    tokenizer: ExistingPath = Field(description="a folder with tokenizer.json, or the file itself")
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="documents to the validation split (by id hash)")
    shard_tokens: int = Field(100_000_000, ge=1, description="start a new shard after this many tokens")
    sentences: bool = Field(True, description="keep sentence boundaries (needed for NSP/SOP readers)")
    eos_token: str | None = Field(None, description="default: eos_token, else sep_token, of tokenizer_config.json")


class PrepareConfig(StageConfig):
    inputs: list[Any] = Field(
        description="paths/globs (asset:NAME/... allowed) or {path, format, text_field, id_field, text_mode}"
    )
    output: Path = Field(description="run folder: parts/, packed/, stats.json, report.md, report.png")
    steps: list[Any] = Field(
        [],
        description="{type: NAME, ...}: html normalize whitespace boilerplate pii min_length language "
        "gopher_quality gopher_repetition c4 blocklist exact_dedup minhash_dedup augment",
    )
    on_error: Literal["skip", "raise"] = Field("skip", description="bad input records: count and skip, or stop")
    chunk_docs: int = Field(1000, ge=1, description="documents per chunk (the unit of work and of resuming)")
    pack: PackConfig | None = Field(None, description="tokenise and pack into token shards")
    seed: int = Field(0, description="seed of the train/validation split")
    title: str = Field("Data preparation report", description="title of report.md")

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> list[Any]:
        from pydantic import TypeAdapter

        from lmcraft.data.readers import InputSpec

        if not isinstance(value, list) or not value:
            raise ValueError("give a non-empty list of inputs (paths, globs or {path: ..., format: ...})")
        adapter = TypeAdapter(InputSpec)
        return [adapter.validate_python({"path": v} if isinstance(v, str) else v) for v in value]

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: Any) -> list[Any]:
        from lmcraft.data.pipeline import build_steps

        if not isinstance(value, list):
            raise ValueError("steps must be a list of {type: NAME, ...} entries")
        if any(not isinstance(v, dict) for v in value):
            return value  # already-built steps (a re-validated config)
        return build_steps(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--workers", type=int, default=1, help="worker processes for per-document steps (default 1)")
    parser.add_argument("--shard", default="0/1", metavar="i/N", help="process shard i of N (default 0/1: all)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r} must look like i/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need N >= 1 and 0 <= i < N")
    return i, n


def _fingerprint(cfg: PrepareConfig, shard: tuple[int, int]) -> str:
    from dataclasses import asdict

    data = {
        "inputs": [asdict(s) for s in cfg.inputs],
        "steps": [{"type": s.name, **{k: v for k, v in vars(s).items() if not k.startswith("_")}} for s in cfg.steps],
        "chunk_docs": cfg.chunk_docs,
        "on_error": cfg.on_error,
        "pack": cfg.pack.model_dump(mode="json") if cfg.pack else None,
        "seed": cfg.seed,
        "shard": list(shard),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# ---- worker side -------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(steps: list[Any], tokenizer: Any, in_pool: bool = True) -> None:
    if in_pool:  # one tokenizer thread per worker process: the workers are the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["steps"], _WORKER["tokenizer"] = steps, tokenizer


def _work(docs: list[Any]) -> Any:
    from lmcraft.data.pipeline import process_chunk

    return process_chunk(_WORKER["steps"], docs, _WORKER["tokenizer"])


# ---- main side ---------------------------------------------------------------------------------


def _context() -> Any:
    """fork where the platform has it: workers start in milliseconds and do not re-import the caller's
    main module (spawn would, and a script that imports torch would pay for it in every worker)."""
    import multiprocessing as mp

    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


class _Chunks:
    """The input stream cut into chunks of `size` documents, each with the input errors met reading it."""

    def __init__(self, cfg: PrepareConfig, files: list[Any], doc_shard: tuple[int, int] | None, skip: int) -> None:
        self.cfg, self.files, self.doc_shard, self.skip = cfg, files, doc_shard, skip

    def __iter__(self) -> Iterator[tuple[list[Any], dict[str, Any], int]]:
        from lmcraft.data.readers import ErrorLog, read_documents

        log = ErrorLog()
        keep_errors = self.doc_shard is None or self.doc_shard[0] == 0  # doc sharding: shard 0 reports errors
        docs: list[Any] = []
        seen = 0
        for index, doc in enumerate(read_documents(self.files, log, self.cfg.on_error)):
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


def _reset(log: Any) -> Any:
    log.counts.clear()
    log.examples.clear()
    return log


def _complete_parts(parts: Path) -> list[Path]:
    """Markers part-00000.json, part-00001.json, ... up to the first gap."""
    out = []
    k = 0
    while (parts / f"part-{k:05d}.json").is_file():
        out.append(parts / f"part-{k:05d}.json")
        k += 1
    return out


def _eos_id(pack: PackConfig, tok: Any) -> int:
    root = Path(pack.tokenizer)
    cfg_path = (root if root.is_dir() else root.parent) / "tokenizer_config.json"
    name = pack.eos_token
    if name is None and cfg_path.is_file():
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        name = config.get("eos_token") or config.get("sep_token")
        name = name.get("content") if isinstance(name, dict) else name
    if name is None:
        raise ConfigError(f"pack.eos_token is not set and {cfg_path} names no eos_token or sep_token")
    eos = tok.tokenizer.token_to_id(name)
    if eos is None:
        raise ConfigError(f"pack.eos_token {name!r} is not in the vocabulary of {pack.tokenizer}")
    return int(eos)


def _write_part(
    parts: Path, k: int, kept: list[Any], stats: list[Any], added: dict, decider: Any, meta: dict, cfg: PrepareConfig
) -> dict[str, Any]:
    import numpy as np
    import zstandard

    from lmcraft.data.pipeline import is_validation

    lines = []
    n_bytes = 0
    n_docs = 0
    for doc in kept:
        for out_id, text in doc.outputs:
            lines.append(json.dumps({"id": out_id, "text": text, "source": doc.source}, ensure_ascii=False))
            n_bytes += len(text.encode("utf-8"))
            n_docs += 1
    payload = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    write_bytes(parts / f"part-{k:05d}.jsonl.zst", zstandard.ZstdCompressor(level=3).compress(payload))
    if cfg.pack is not None:
        ids, doc_lens, sent_counts, sent_lens, val = [], [], [], [], []
        for doc in kept:
            for (out_id, _), (tok_ids, lens) in zip(doc.outputs, doc.tokens, strict=True):
                ids.append(tok_ids)
                doc_lens.append(len(tok_ids))
                sent_counts.append(len(lens))
                sent_lens.append(lens)
                val.append(is_validation(out_id, cfg.pack.val_fraction, cfg.seed))
        save_npz(
            parts / f"part-{k:05d}.tokens.npz",
            {
                "ids": np.concatenate(ids) if ids else np.empty(0, np.uint32),
                "doc_lens": np.array(doc_lens, dtype=np.int64),
                "sent_counts": np.array(sent_counts, dtype=np.int64),
                "sent_lens": np.concatenate(sent_lens) if sent_lens else np.empty(0, np.int32),
                "val": np.array(val, dtype=bool),
            },
        )
    if decider.indexes:
        save_npz(parts / f"part-{k:05d}.dedup.npz", decider.state(added))
    record = {
        **meta,
        "docs_written": n_docs,
        "bytes_written": n_bytes,
        "steps": [s.to_dict() for s in stats],
    }
    write_text(parts / f"part-{k:05d}.json", json.dumps(record) + "\n")
    return record


def _pack(cfg: PrepareConfig, parts: Path, n_parts: int, tok: Any, out: Path) -> dict[str, Any]:
    import numpy as np

    from lmcraft.data.pack import ShardWriter

    assert cfg.pack is not None
    with staged_dir(out / "packed") as stage:  # a finished packed/ stays whole until the new one is complete
        writer = ShardWriter(
            stage,
            vocab_size=tok.vocab_size,
            eos_id=_eos_id(cfg.pack, tok),
            shard_tokens=cfg.pack.shard_tokens,
            tokenizer=str(Path(cfg.pack.tokenizer).resolve()),
        )
        for k in range(n_parts):
            ids, doc_lens, sent_counts, sent_lens, val = _read_part(parts / f"part-{k:05d}.tokens.npz")
            starts = np.concatenate([[0], np.cumsum(doc_lens)])
            sstarts = np.concatenate([[0], np.cumsum(sent_counts)])
            for d in range(len(doc_lens)):
                writer.add(
                    "validation" if val[d] else "train",
                    ids[starts[d] : starts[d + 1]],
                    sent_lens[sstarts[d] : sstarts[d + 1]],
                )
        return writer.close()


def _read_part(path: Path) -> tuple[Any, ...]:
    """The arrays of one tokenized part file; a damaged file is named, with the way to rebuild it."""
    import zipfile

    import numpy as np

    try:
        with np.load(path) as z:
            return tuple(z[n] for n in ("ids", "doc_lens", "sent_counts", "sent_lens", "val"))
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as err:
        raise InputFileError(path, "whole file", f"a complete part file of an earlier run ({type(err).__name__}: "
                             f"{err}); delete it (and its .json) and rerun to rebuild it") from None


def _summarise(records: list[dict[str, Any]], n_files: int, shard: tuple[int, int]) -> dict[str, Any]:
    from lmcraft.data.pipeline import StepStats
    from lmcraft.data.readers import ErrorLog

    errors = ErrorLog()
    steps: list[StepStats] = []
    for rec in records:
        errors.merge(ErrorLog.from_dict(rec.get("errors") or {}))
        for i, st in enumerate(rec["steps"]):
            if i == len(steps):
                steps.append(StepStats(st["name"]))
            steps[i].add(StepStats.from_dict(st))
    return {
        "files": n_files,
        "shard": f"{shard[0]}/{shard[1]}" if shard[1] > 1 else None,
        "docs_read": sum(r["docs_read"] for r in records),
        "bytes_read": sum(r["bytes_read"] for r in records),
        "docs_written": sum(r["docs_written"] for r in records),
        "bytes_written": sum(r["bytes_written"] for r in records),
        "errors": errors.to_dict(),
        "steps": [s.to_dict() for s in steps],
    }


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(PrepareConfig, args)
    shard = _parse_shard(args.shard)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    folder = Path(cfg.output) / (f"shard-{shard[0]}-of-{shard[1]}" if shard[1] > 1 else "")
    identity = cfg if shard == (0, 1) else {**cfg.model_dump(mode="json"), "shard": list(shard)}
    with claim(args, "prepare", folder, identity, "output"):
        result = prepare(cfg, workers=args.workers, shard=shard, progress=not args.no_progress)
        _report_skipped(cfg, result)
    print(f"wrote {result['docs_written']:,} documents to {result['output']}; report: {result['report']}")
    if result.get("packed"):
        for name, sp in result["packed"]["splits"].items():
            print(f"  {name}: {sp['tokens']:,} tokens in {sp['documents']:,} documents")
    return 0


def _report_skipped(cfg: PrepareConfig, result: dict[str, Any]) -> None:
    """Say on the console what bad input was skipped; a run that kept no document is an error (exit 2)."""
    errors = result.get("errors") or {}
    if errors.get("counts"):
        counts = ", ".join(f"{n:,} {kind}" for kind, n in errors["counts"].items())
        first = "; ".join(" ".join(map(str, e)) for e in errors["examples"][:3])
        print(f"skipped bad input: {counts}; first: {first}", file=sys.stderr)
    if result["docs_written"] == 0:
        inputs = excerpt(", ".join(str(spec.path) for spec in cfg.inputs), 200)
        raise InputFileError(inputs, "every record", f"at least one usable document: {result['docs_read']:,} read, "
                             f"none kept (see {result['report']})")


def prepare(
    cfg: PrepareConfig,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    stop_after_chunks: int | None = None,
) -> dict[str, Any]:
    """Run the configured pipeline (see the module docstring); returns the run statistics.

    `stop_after_chunks` ends the run early after writing that many new chunks (to test resuming).
    """
    from tqdm import tqdm

    from lmcraft.data.pack import DocTokenizer
    from lmcraft.data.pipeline import Decider
    from lmcraft.data.readers import expand_inputs

    out = Path(cfg.output) / (f"shard-{shard[0]}-of-{shard[1]}" if shard[1] > 1 else "")
    parts = out / "parts"
    fingerprint = _fingerprint(cfg, shard)
    run_file = out / "run.json"
    if run_file.is_file():
        previous = json.loads(run_file.read_text(encoding="utf-8")).get("fingerprint")
        if previous != fingerprint:
            raise ConfigError(
                f"{out} holds a run with a different config (or shard); rerun with --overwrite to replace it, "
                "or choose another output folder"
            )
    parts.mkdir(parents=True, exist_ok=True)
    clean_staging(parts)  # files of a chunk that was being written when the last run died
    write_text(run_file, json.dumps({"fingerprint": fingerprint, "shard": list(shard)}) + "\n")

    files = expand_inputs(cfg.inputs)
    n_files = len(files)
    doc_shard = None
    if shard[1] > 1:
        if len(files) >= shard[1]:
            files = files[shard[0] :: shard[1]]
        else:
            doc_shard = shard
    steps = cfg.steps
    decider = Decider(steps)
    tok = None
    if cfg.pack is not None:
        path = Path(cfg.pack.tokenizer)
        tok = DocTokenizer(path / "tokenizer.json" if path.is_dir() else path, sentences=cfg.pack.sentences)
        _eos_id(cfg.pack, tok)  # fail early on a tokenizer without EOS

    done = _complete_parts(parts)
    records = [json.loads(p.read_text(encoding="utf-8")) for p in done]
    import numpy as np

    for k in range(len(done)):
        dedup_file = parts / f"part-{k:05d}.dedup.npz"
        if decider.indexes and dedup_file.is_file():
            with np.load(dedup_file) as z:
                decider.restore({name: z[name] for name in z.files})
    for stale in parts.glob("part-*"):  # leftovers of a chunk that was not completed
        if int(stale.name[5:10]) >= len(done):
            stale.unlink()
    skip = sum(r["docs_read"] for r in records)
    finished = bool(records) and records[-1].get("last", False)  # every chunk of the input is written

    chunks = _Chunks(cfg, files, doc_shard, skip)
    pool = None
    if not finished and workers > 1:  # started before the progress bar's monitor thread exists
        pool = _context().Pool(workers, initializer=_init_worker, initargs=(steps, tok))
    elif not finished:
        _init_worker(steps, tok, in_pool=False)
    bar = tqdm(desc="prepare", unit="doc", initial=skip, disable=not progress or finished, file=sys.stderr)
    k = len(done)
    new = 0
    try:
        if not finished:
            pending: deque = deque()

            def handle(item: tuple[Any, dict, int, int, bool]) -> None:
                nonlocal k, new
                result, errors, nbytes, ndocs, last = item
                kept, stats, added = decider.decide(result)
                meta = {"docs_read": ndocs, "bytes_read": nbytes, "errors": errors, "last": last}
                records.append(_write_part(parts, k, kept, stats, added, decider, meta, cfg))
                k += 1
                new += 1
                bar.update(ndocs)
                bar.set_postfix(kept=sum(r["docs_written"] for r in records), refresh=False)

            stopped = False
            for (docs, errors, nbytes), last in _with_last(chunks):
                if stop_after_chunks is not None and new + len(pending) >= stop_after_chunks:
                    stopped = True
                    break
                if pool is None:
                    handle((_work(docs), errors, nbytes, len(docs), last))
                else:
                    pending.append((pool.apply_async(_work, (docs,)), errors, nbytes, len(docs), last))
                    while len(pending) > 2 * workers:
                        res, *meta = pending.popleft()
                        handle((res.get(), *meta))
            while pending:
                res, *meta = pending.popleft()
                handle((res.get(), *meta))
            if stopped:
                return {"stopped": True, "chunks": k}
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    stats = _summarise(records, n_files, shard)
    if cfg.pack is not None:
        assert tok is not None
        stats["packed"] = _pack(cfg, parts, len(records), tok, out)
    write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    from lmcraft.data.report import write_report

    report = write_report(stats, out, cfg.title)
    return {**stats, "output": str(out), "report": str(report)}


def config_class() -> type:
    """The config class, listed by `lmcraft prepare --help` and checked by `lmcraft pipeline`."""
    return PrepareConfig
