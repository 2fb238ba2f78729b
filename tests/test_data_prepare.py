"""`lmcraft prepare` / `lmcraft tokenizer`: determinism across workers, resume, shards, reports, config errors."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmcraft.cli import main
from lmcraft.config import load_config
from lmcraft.data.datasets import CausalWindows, PackedCorpus
from lmcraft.data.prepare import prepare
from lmcraft.data.tokenizer_training import TokenizerConfig, train_on_inputs
from lmcraft.errors import ConfigError
from lmcraft.stages.prepare import PrepareConfig

_ROOTS = (
    "walk build mark stone light wood field water land hold stand turn keep read speak teach work play call talk "
    "help fish farm paint sail plant cook clean open start rain snow wind sing dream learn count bank crowd guard"
).split()
_WORDS = "the of and to in that with have be river city king people garden market wine salt castle".split() + [
    root + end for root in _ROOTS for end in ("", "s", "ed", "ing", "er", "ers")
]


def _paragraph(rng: random.Random) -> str:
    sentences = [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
        for _ in range(rng.randint(3, 7))
    ]
    return " ".join(sentences)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JSONL (with bad lines and duplicates), plain text paragraphs and an HTML file."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    paras = [_paragraph(rng) for _ in range(160)]
    with open(root / "a.jsonl", "w", encoding="utf-8") as fh:
        for i, p in enumerate(paras[:100]):
            fh.write(json.dumps({"text": p}) + "\n")
            if i % 25 == 0:
                fh.write("{broken json\n")
            if i % 10 == 0:
                fh.write(json.dumps({"text": p.upper()}) + "\n")  # exact duplicate after normalisation
        fh.write(json.dumps({"text": "Contact me at jane@example.com or 555-123-4567. " + paras[0]}) + "\n")
        fh.write(
            json.dumps({"text": "Ceci est un texte en français. Il ne doit pas rester dans le corpus anglais."}) + "\n"
        )
    (root / "b.txt").write_text("\n\n".join(paras[100:] + ["too short", "   "]), encoding="utf-8")
    (root / "c.html").write_text(
        f"<html><body><nav>Menu</nav><p>{paras[5]}</p><script>x()</script></body></html>", encoding="utf-8"
    )
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    cfg = TokenizerConfig(
        inputs=[{"path": str(corpus / "b.txt"), "text_mode": "paragraph"}], output=out, vocab_size=400
    )
    report = train_on_inputs(cfg, progress=False)
    assert report["bytes_per_token"] > 1.5 and report["held_out_tokens"] > 0
    return out


def _config(corpus: Path, out: Path, tokenizer: Path | None, **extra) -> PrepareConfig:
    return PrepareConfig.model_validate(_config_data(corpus, out, tokenizer, **extra))


def _config_data(corpus: Path, out: Path, tokenizer: Path | None, **extra) -> dict:
    data = {
        "inputs": [
            str(corpus / "a.jsonl"),
            {"path": str(corpus / "b.txt"), "text_mode": "paragraph"},
            str(corpus / "c.html"),
        ],
        "output": str(out),
        "chunk_docs": 16,
        "steps": [
            {"type": "html"},
            {"type": "normalize"},
            {"type": "whitespace"},
            {"type": "boilerplate"},
            {"type": "language", "languages": ["en"], "min_score": 0.5},
            {"type": "gopher_quality", "min_words": 20, "min_stop_words": None},
            {"type": "gopher_repetition", "top_ngram_max_fraction": {}, "dup_ngram_max_fraction": {}},
            {"type": "pii"},
            {"type": "exact_dedup"},
            {"type": "minhash_dedup", "threshold": 0.8},
        ],
        **extra,
    }
    if tokenizer is not None:
        data["pack"] = {"tokenizer": str(tokenizer), "val_fraction": 0.1, "shard_tokens": 2000}
    return data


def _digest(folder: Path) -> dict[str, str]:
    """sha256 of every output file except the run fingerprint (which embeds nothing run-specific)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".png" and not p.name.startswith(".lmcraft")  # run marker and lock
    }


def test_prepare_end_to_end_and_identical_for_any_worker_count(
    corpus: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    one = prepare(_config(corpus, tmp_path / "w1", tokenizer_dir), workers=1, progress=False)
    two = prepare(_config(corpus, tmp_path / "w2", tokenizer_dir), workers=2, progress=False)
    assert _digest(tmp_path / "w1") == _digest(tmp_path / "w2")
    assert one["docs_written"] == two["docs_written"] > 100
    steps = {s["name"]: s for s in one["steps"]}
    assert steps["html"]["modified"] == 1
    assert steps["language"]["reasons"] == {"lang_fr": 1, "low_score": 1}  # French, and "too short"
    assert steps["exact_dedup"]["reasons"] == {"duplicate": 11}  # 10 upper-cased copies + the HTML page
    assert steps["minhash_dedup"]["reasons"] == {"near_duplicate": 1}  # paragraph 0 with contact details added
    assert steps["pii"]["modified"] == 1
    assert one["errors"]["counts"] == {"invalid_json": 4}
    assert one["docs_read"] == sum(1 for line in open(corpus / "a.jsonl") if "broken" not in line) + 61 + 1
    for st in one["steps"]:  # the books balance at every step
        assert st["docs_in"] - sum(st["reasons"].values()) == st["docs_out"]
    text = (tmp_path / "w1" / "report.md").read_text()
    assert "| exact_dedup | " in text and "invalid_json" in text and (tmp_path / "w1" / "report.png").stat().st_size > 0
    # report examples: the first documents each step removed, in input order, and kept ones spread over the run
    assert [(e["reason"], e["text"][:40]) for e in steps["language"]["examples"]] == [
        ("lang_fr", "Ceci est un texte en français. Il ne doi"), ("low_score", "too short")]
    dups = steps["exact_dedup"]["examples"]
    assert len(dups) == 2 and all(e["reason"] == "duplicate" and e["text"].isupper() for e in dups)  # upper-cased
    kept_rows = {r["id"]: r["text"] for part in sorted((tmp_path / "w1" / "parts").glob("*.jsonl.zst"))
                 for r in map(json.loads, _read_zst_lines(part))}
    assert len(one["kept_examples"]) == 6
    assert all(kept_rows[e["id"]].startswith(e["text"]) for e in one["kept_examples"])
    assert "## Kept and removed examples" in text and "| removed | language: lang_fr |" in text
    assert (tmp_path / "w1" / "report-examples.png").stat().st_size > 0
    packed = one["packed"]["splits"]
    assert packed["train"]["documents"] + packed["validation"]["documents"] == one["docs_written"]
    corpus_train = PackedCorpus(tmp_path / "w1" / "packed", "train")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    docs = [json.loads(line) for line in _read_zst_lines(tmp_path / "w1" / "parts" / "part-00000.jsonl.zst")]
    first_train = next(d for d in docs if not _is_val(d["id"]))
    assert tok.decode(corpus_train.tokens(0)[:-1].tolist()) == first_train["text"]
    assert len(CausalWindows(tmp_path / "w1" / "packed", "train", seq_len=32)) > 10


def _is_val(doc_id: str) -> bool:
    from lmcraft.data.pipeline import is_validation

    return is_validation(doc_id, 0.1, 0)


def _read_zst_lines(path: Path) -> list[str]:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(path.read_bytes()).decode().splitlines()


def test_resume_after_interruption_gives_identical_output(corpus: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    prepare(_config(corpus, tmp_path / "full", tokenizer_dir), progress=False)
    cfg = _config(corpus, tmp_path / "resumed", tokenizer_dir)
    stopped = prepare(cfg, workers=2, progress=False, stop_after_chunks=3)
    assert stopped == {"stopped": True, "chunks": 3}
    parts = tmp_path / "resumed" / "parts"
    # a chunk that was being written when the process died: files without the .json marker
    (parts / "part-00003.jsonl.zst").write_bytes(b"partial")
    (parts / ".lmcraft-tmp-part-00003.tokens.npz.123.abcdef01").write_bytes(b"partial")
    prepare(cfg, workers=1, progress=False)
    assert _digest(tmp_path / "full") == _digest(tmp_path / "resumed")
    again = prepare(cfg, progress=False)  # a finished run only re-packs and re-reports
    assert _digest(tmp_path / "full") == _digest(tmp_path / "resumed")
    assert again["docs_written"] > 0


def test_changed_config_needs_overwrite(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, config = tmp_path / "first.yaml", tmp_path / "changed.yaml"
    first.write_text(yaml.safe_dump(_config_data(corpus, tmp_path / "o", None)))
    assert main(["prepare", str(first), "--no-progress"]) == 0
    changed = _config(corpus, tmp_path / "o", None, chunk_docs=7)
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare(changed, progress=False)
    config.write_text(yaml.safe_dump(_config_data(corpus, tmp_path / "o", None, chunk_docs=7)))
    assert main(["prepare", str(config), "--no-progress"]) == 2  # the folder holds another config's run
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["prepare", str(config), "--no-progress", "--overwrite"]) == 0
    assert json.loads((tmp_path / "o" / "stats.json").read_text())["docs_written"] > 0


def test_shards_partition_the_input(corpus: Path, tmp_path: Path) -> None:
    whole = _config(corpus, tmp_path / "all", None, steps=[])
    prepare(whole, progress=False)
    ids_all = _ids(tmp_path / "all")
    for n in (2, 5):  # 3 files: by file for N=2, by document for N=5
        ids = []
        for i in range(n):
            prepare(_config(corpus, tmp_path / f"s{n}", None, steps=[]), shard=(i, n), progress=False)
            ids.append(_ids(tmp_path / f"s{n}" / f"shard-{i}-of-{n}"))
        flat = [x for part in ids for x in part]
        assert sorted(flat) == sorted(ids_all) and len(set(flat)) == len(flat)
        assert all(ids)


def _ids(folder: Path) -> list[str]:
    return [
        json.loads(line)["id"] for p in sorted((folder / "parts").glob("*.jsonl.zst")) for line in _read_zst_lines(p)
    ]


def test_config_errors_name_the_step(tmp_path: Path) -> None:
    """A step entry is a "name -> options" block (`config.named_options`): its problems come in the config-error
    format, each at its full key, an unknown key or step name with a did-you-mean."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"inputs": ["x.txt"], "output": "o", "steps": [{"type": "c4", "min_sentence": 2}]}))
    with pytest.raises(ConfigError) as err:
        load_config(PrepareConfig, path)
    assert str(err.value) == (f"invalid config {path}: unknown key 'steps.0.min_sentence'. "
                              "Did you mean 'min_sentences'? "
                              "Allowed keys here: min_sentences, remove_curly_brace, remove_lorem_ipsum.")
    path.write_text(yaml.safe_dump({"inputs": ["x.txt"], "output": "o", "steps": [
        {"type": "pii"}, {"type": "min_lenght", "min_chars": 3}, {"type": "perplexity", "head": 2.0},
        {"type": "perplexity", "model": "m", "head": 2.0}, {"type": "c4", "min_sentences": "three"}]}))
    with pytest.raises(ConfigError) as err:
        load_config(PrepareConfig, path)
    text = str(err.value)
    assert text.startswith(f"invalid config {path}: key 'steps.1.type': unknown step 'min_lenght'. "
                           "Did you mean 'min_length'? Known: html, normalize, ")
    assert "missing required key 'steps.2.model'." in text
    assert "key 'steps.3': give both head and tail thresholds, head <= tail (perplexities)." in text
    assert "key 'steps.4.min_sentences': Input should be a valid integer, unable to parse string as an integer " \
           "(given: 'three')." in text
    assert "steps.0" not in text  # the good step is not named
    path.write_text(
        yaml.safe_dump({"inputs": ["x.txt"], "output": "o", "steps": [{"type": "augment"}, {"type": "pii"}]})
    )
    with pytest.raises(ConfigError, match="key 'steps': Value error, step 0 augments the documents: it must be the "
                                          "last step"):
        load_config(PrepareConfig, path)
    path.write_text(yaml.safe_dump({"inputs": [], "output": "o"}))
    with pytest.raises(ConfigError, match="non-empty list of inputs"):
        load_config(PrepareConfig, path)


def test_cli_prepare_and_tokenizer(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tok_cfg = tmp_path / "tok.yaml"
    tok_cfg.write_text(
        yaml.safe_dump(
            {
                "inputs": [{"path": str(corpus / "b.txt"), "text_mode": "paragraph"}],
                "output": str(tmp_path / "tok"),
                "kind": "unigram",
                "vocab_size": 300,
            }
        )
    )
    assert main(["tokenizer", str(tok_cfg)]) == 0
    assert "unigram tokenizer" in capsys.readouterr().out
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "inputs": [str(corpus / "a.jsonl")],
                "output": str(tmp_path / "p"),
                "steps": [{"type": "whitespace"}, {"type": "exact_dedup"}],
                "pack": {"tokenizer": str(tmp_path / "tok")},
            }
        )
    )
    assert main(["prepare", str(cfg), "chunk_docs=50", "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and (tmp_path / "p" / "packed" / "index.json").is_file()
    assert main(["prepare", str(cfg), "--shard", "3/2"]) == 2
    assert "--shard" in capsys.readouterr().err


def test_augment_step_in_the_pipeline(corpus: Path, tmp_path: Path) -> None:
    cfg = _config(corpus, tmp_path / "aug", None, steps=[{"type": "augment", "ops": ["swap", "delete"], "copies": 2}])
    result = prepare(cfg, progress=False)
    assert result["docs_written"] == 3 * result["docs_read"]
    assert result["steps"][0]["docs_out"] == result["docs_written"]


@pytest.mark.slow
def test_killed_process_resumes_without_duplicates(corpus: Path, tmp_path: Path) -> None:
    """SIGKILL a real `lmcraft prepare` after its first parts, run it again, compare with an uninterrupted run."""
    cfg = _config(corpus, tmp_path / "killed", None, chunk_docs=4)
    path = tmp_path / "c.yaml"
    data = json.loads(cfg.model_dump_json(exclude={"steps"}))
    data["steps"] = [
        {"type": "whitespace"},
        {"type": "language", "languages": ["en"], "min_score": 0.5},
        {"type": "minhash_dedup"},
    ]
    path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "lmcraft", "prepare", str(path), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "parts" / "part-00005.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (tmp_path / "killed" / "stats.json").exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    full = tmp_path / "full.yaml"
    data["output"] = str(tmp_path / "full")
    full.write_text(yaml.safe_dump(data))
    assert subprocess.run([*cmd[:4], str(full), "--no-progress"], capture_output=True).returncode == 0
    assert _digest(tmp_path / "full") == _digest(tmp_path / "killed")


def test_ctrl_c_with_workers_exits_130_quietly(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group) ends `prepare --workers 2` with 130 and one line, no tracebacks
    from the pool's workers."""
    path = tmp_path / "c.yaml"
    rng = random.Random(1)
    big = tmp_path / "big.jsonl"  # thousands of chunks: the run cannot end between the marker and the signal
    big.write_text("".join(json.dumps({"text": _paragraph(rng)}) + "\n" for _ in range(6000)))
    data = {"inputs": [str(big)], "output": str(tmp_path / "out"), "chunk_docs": 2,
            "steps": [{"type": "language", "languages": ["en"], "min_score": 0.5}, {"type": "minhash_dedup"}]}
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "lmcraft", "prepare", str(path), "--no-progress", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            # a background job of a non-interactive shell (CI) inherits SIGINT ignored: undo that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    marker = tmp_path / "out" / "parts" / "part-00003.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"ForkPoolWorker" not in err and b"KeyboardInterrupt" not in err


def test_rerun_after_completion_writes_nothing_new(tmp_path: Path) -> None:
    """Bad records after the last document form a final errors-only chunk; a re-run must not repeat it."""
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(5)) + "{bad\n{bad\n")
    cfg = PrepareConfig.model_validate({"inputs": [str(src)], "output": str(tmp_path / "o"), "chunk_docs": 5})
    first = prepare(cfg, progress=False)
    assert first["errors"]["counts"] == {"invalid_json": 2} and first["docs_written"] == 5
    parts = sorted(p.name for p in (tmp_path / "o" / "parts").iterdir())
    assert prepare(cfg, progress=False)["errors"]["counts"] == {"invalid_json": 2}
    assert sorted(p.name for p in (tmp_path / "o" / "parts").iterdir()) == parts


def test_corrupt_part_is_named_and_the_finished_packed_folder_survives(
    corpus: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    """A rerun of a finished run re-packs into a staging folder: a damaged part file stops it with an error
    naming the file, and the packed/ of the finished run is left whole."""
    from lmcraft.errors import InputFileError

    cfg = _config(corpus, tmp_path / "o", tokenizer_dir)
    prepare(cfg, progress=False)
    packed = _digest(tmp_path / "o" / "packed")
    damaged = tmp_path / "o" / "parts" / "part-00001.tokens.npz"
    damaged.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InputFileError, match="part-00001.tokens.npz"):
        prepare(cfg, progress=False)
    assert _digest(tmp_path / "o" / "packed") == packed
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".lmcraft-tmp-packed")]
