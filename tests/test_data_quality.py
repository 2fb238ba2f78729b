"""Prepare steps by quality, licence and contamination: model scores (perplexity, classifier, toxicity), licence
boilerplate and copyright notices, decontamination against eval tasks and the eval-time overlap warning."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_model, save_chat_tokenizer
from lmcraft.data.decontaminate import normalized_words
from lmcraft.data.licence import CopyrightNotices, LicenceBoilerplate
from lmcraft.data.pipeline import build_steps
from lmcraft.data.prepare import prepare
from lmcraft.stages.prepare import PrepareConfig
from test_data_prepare import _paragraph

APACHE_PY = '''# Copyright 2020 The Example Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

import os


def main():
    return os.getcwd()
'''

MIT_JS = '''/*
 * Copyright (c) 2019 Jane Doe
 *
 * Permission is hereby granted, free of charge, to any person obtaining a copy
 * of this software and associated documentation files (the "Software"), to deal
 * in the Software without restriction, including without limitation the rights
 * to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 * copies of the Software, and to permit persons to whom the Software is
 * furnished to do so, subject to the following conditions:
 *
 * The above copyright notice and this permission notice shall be included in all
 * copies or substantial portions of the Software.
 *
 * THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 * IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 * FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.
 */
export function add(a, b) {
  return a + b;
}
'''

BOOK = "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little."

GUTENBERG = f'''The Project Gutenberg eBook of Moby Dick; Or, The Whale, by Herman Melville

This eBook is for the use of anyone anywhere in the United States and most other parts of the world at no cost and
with almost no restrictions whatsoever. You may copy it, give it away or re-use it under the terms of the Project
Gutenberg License included with this eBook or online at www.gutenberg.org.

Title: Moby Dick; Or, The Whale
Author: Herman Melville
Release Date: June, 2001 [eBook #2701]
Language: English

*** START OF THE PROJECT GUTENBERG EBOOK MOBY DICK; OR, THE WHALE ***

{BOOK}

End of the Project Gutenberg EBook of Moby Dick; or The Whale, by Herman Melville

*** END OF THE PROJECT GUTENBERG EBOOK MOBY DICK; OR, THE WHALE ***

Updated editions will replace the previous one--the old editions will be renamed.

START: FULL LICENSE
THE FULL PROJECT GUTENBERG LICENSE
PLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK
'''


def test_licence_cleaner_removes_real_headers_and_keeps_the_content() -> None:
    clean = LicenceBoilerplate()
    assert clean(APACHE_PY) == "import os\n\n\ndef main():\n    return os.getcwd()"
    assert clean(MIT_JS) == "export function add(a, b) {\n  return a + b;\n}"
    assert clean(GUTENBERG) == BOOK
    spdx = "#!/usr/bin/env python\n# SPDX-License-Identifier: MIT\nprint(1)\n"
    assert clean(spdx) == "#!/usr/bin/env python\nprint(1)"
    notice = "A story about the sea.\nCopyright (c) 2021 Example Press. All rights reserved.\nThe end."
    assert clean(notice) == "A story about the sea.\nThe end."
    plain = "# A heading\nThe river ran through the city; nobody owned the copyright to the wind.\n"
    assert clean(plain) == plain  # a comment block without a licence, prose that mentions copyright


def test_copyright_step_drops_or_flags_notice_dominated_documents() -> None:
    notices = MIT_JS.split("*/")[0]
    prose = _paragraph(random.Random(1))
    drop = CopyrightNotices(max_ratio=0.5).annotate([notices, prose])
    assert drop[0].reason == "dominated" and drop[0].score > 0.5 and drop[1].reason is None and drop[1].score == 0
    flag = CopyrightNotices(max_ratio=0.5, action="flag").annotate([notices])[0]
    assert flag.reason is None and flag.meta["copyright_notice"] is True


def test_a_one_line_document_is_not_all_or_nothing() -> None:
    """A speech stored as one line that mentions a licence once is not 'dominated' by it (sentences count)."""
    sentences = [f"The harvest of {1800 + i} was good for the farmers of the western states." for i in range(19)]
    speech = " ".join([*sentences[:9], "Congress granted the license to build the canal.", *sentences[9:]])
    verdict = CopyrightNotices(max_ratio=0.5).annotate([speech])[0]
    assert verdict.reason is None and 0 < verdict.score < 0.1


# ------------------------------------------------------------------------------------------ decontamination

def _write_task(folder: Path, items: list[str]) -> Path:
    task = {"name": "planted", "data": {"source": "inline", "records": [{"question": q, "answer": "4"} for q in items]},
            "template": {"input": "{question}", "target": "{answer}"}, "answer": {"type": "numeric"},
            "metrics": ["accuracy"]}
    path = folder / "planted.yaml"
    path.write_text(yaml.safe_dump(task), encoding="utf-8")
    return path


def test_decontaminate_finds_every_planted_eval_item(tmp_path: Path) -> None:
    from lmcraft.data.provenance import write_provenance
    from lmcraft.prompting.contamination import attach_eval_tasks, overlap_warnings
    from lmcraft.prompting.tasks import load_task

    rng = random.Random(0)
    items = [_paragraph(rng) for _ in range(6)] + ["How many apples does Tom have if he buys two and eats one"]
    held = "A question nobody planted into the training data at all, with enough words in it to be checked."
    task_file = _write_task(tmp_path, items + [held])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "The quick brown fox jumps over the lazy dog again and again today"}) + "\n")
    docs, planted = [], set()
    for i in range(40):
        text = _paragraph(rng)
        if i % 5 == 0:  # an eval item inside a training document, re-cased and re-punctuated
            k = i // 5
            item = (items + ["The quick brown fox jumps over the lazy dog again and again today"])[k]
            text = text + " " + item.upper().replace(".", " ;") + " " + _paragraph(rng)
            planted.add(k)
        docs.append({"text": text})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    for action in ("drop", "flag"):
        out = tmp_path / action
        cfg = PrepareConfig.model_validate({
            "inputs": [{"path": str(tmp_path / "train.jsonl"), "licence": "CC-BY-4.0"}], "output": str(out),
            "chunk_docs": 7,
            "steps": [{"type": "decontaminate", "tasks": [str(task_file)], "files": [str(other)], "action": action}],
        })
        steps = build_steps(cfg.steps)  # the config keeps the entries; the eval tasks attach to built steps
        attach_eval_tasks(steps)
        result = prepare(cfg, workers=2 if action == "flag" else 1, progress=False, steps=steps)
        (check,) = result["decontamination"]
        by_set = {s["name"]: s for s in check["sets"]}
        assert set(by_set["planted"]["contaminated"]) == {f"planted:{k}" for k in range(7)}  # every planted item
        assert by_set["planted"]["items"] == 8 and by_set["planted"]["unchecked_items"] == 0
        assert list(by_set[f"file:{other}"]["contaminated"]) == [f"file:{other}:0"]
        assert check["documents"] == 8
        rows = [json.loads(line) for line in _part_lines(out)]
        assert result["licences"] == {"CC-BY-4.0": {"documents": len(rows), "bytes": sum(
            len(r["text"].encode()) for r in rows)}}
        flagged = [r for r in rows if "contamination" in r.get("meta", {})]
        assert len(rows) == (40 if action == "flag" else 32) and len(flagged) == (8 if action == "flag" else 0)
        report = (out / "report.md").read_text()
        assert "## Decontamination" in report and "planted:6" in report

    # eval-time warning: a model folder that records training data flagged (not cleaned) against the task
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "index.json").write_text(json.dumps({"decontamination": result["decontamination"], "splits": {}}))
    model = tmp_path / "model"
    model.mkdir()
    write_provenance(model, packed, "train")
    task = load_task(task_file)
    (warning,) = overlap_warnings(model, task)
    assert "7 of 8 items of task 'planted'" in warning
    changed = load_task(_write_task(tmp_path / "changed" if (tmp_path / "changed").mkdir() is None else tmp_path,
                                    items[:3]))
    assert "not decontaminated against task 'planted'" in overlap_warnings(model, changed)[0]
    assert overlap_warnings(tmp_path, task) == []  # no record, no warning


def _part_lines(out: Path) -> list[str]:
    import zstandard

    lines = []
    for part in sorted((out / "parts").glob("*.jsonl.zst")):
        lines += zstandard.ZstdDecompressor().decompress(part.read_bytes()).decode().splitlines()
    return [line for line in lines if line]


def test_normalised_words_ignore_case_and_punctuation() -> None:
    assert normalized_words("Hello, WORLD! It's  ﬁne.") == ["hello", "world", "it", "s", "fine"]


# ------------------------------------------------------------------------------------------ model scores

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny causal LM and a tiny 2-label classifier (labels ok/toxic), saved with a byte-level tokenizer."""
    from lmcraft.hub import save_model

    root = tmp_path_factory.mktemp("models")
    rng = random.Random(0)
    vocab = save_chat_tokenizer(root / "tok", [_paragraph(rng) for _ in range(50)], 300)
    lm = build_tiny_model(vocab_size=vocab, max_position_embeddings=128)
    save_model(lm, root / "lm", tokenizer_dir=root / "tok")
    cls = build_tiny_model(head="cls", vocab_size=vocab, max_position_embeddings=128,
                           extra={"id2label": {"0": "ok", "1": "toxic"}, "label2id": {"ok": 0, "toxic": 1}})
    save_model(cls, root / "cls", tokenizer_dir=root / "tok")
    return {"lm": root / "lm", "cls": root / "cls"}


def _texts() -> list[str]:
    rng = random.Random(3)
    return [_paragraph(rng)[: rng.randint(20, 300)] for _ in range(9)]


def test_perplexity_batched_equals_one_by_one_direct_computation(models: dict[str, Path]) -> None:
    import torch

    from lmcraft.hub import load_model
    from lmcraft.tokenizer.load import load_tokenizer

    (step,) = build_steps([{"type": "perplexity", "model": str(models["lm"]), "batch_size": 4, "max_tokens": 40}])
    got = step.perplexities(_texts())
    model, tok = load_model(models["lm"]).eval(), load_tokenizer(models["lm"])
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for text, ppl in zip(_texts(), got, strict=True):
        ids = torch.tensor([[start] + tok.encode(text, add_special_tokens=False)[:40]])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)
        nll = -logp.gather(1, ids[0, 1:, None]).mean()
        assert ppl == pytest.approx(math.exp(nll.item()), rel=1e-4)


@pytest.mark.parity
def test_perplexity_matches_transformers(models: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from lmcraft.tokenizer.load import load_tokenizer

    (step,) = build_steps([{"type": "perplexity", "model": str(models["lm"]), "batch_size": 3}])
    got = step.perplexities(_texts())
    hf = AutoModelForCausalLM.from_pretrained(models["lm"]).eval()
    tok = load_tokenizer(models["lm"])
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for text, ppl in zip(_texts(), got, strict=True):
        ids = torch.tensor([[start] + tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            loss = hf(ids, labels=ids).loss
        assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-4)


def test_classifier_and_toxicity_are_one_mechanism_with_two_configs(models: dict[str, Path]) -> None:
    import torch

    from lmcraft.hub import load_model
    from lmcraft.tokenizer.load import load_tokenizer

    texts = _texts()
    quality, safety = build_steps([
        {"type": "classifier", "model": str(models["cls"]), "label": "ok", "threshold": 0.5, "batch_size": 4},
        {"type": "toxicity", "model": str(models["cls"]), "batch_size": 2},
    ])
    model, tok = load_model(models["cls"]).eval(), load_tokenizer(models["cls"])
    with torch.no_grad():
        ref = [model(torch.tensor([tok.encode(t)])).logits.softmax(-1)[0].tolist() for t in texts]
    p_ok, p_toxic = quality.probabilities(texts), safety.probabilities(texts)
    assert p_ok == pytest.approx([r[0] for r in ref], abs=1e-5)
    assert p_toxic == pytest.approx([r[1] for r in ref], abs=1e-5)
    for note, p in zip(quality.annotate(texts), p_ok, strict=True):
        assert (note.reason == "below_threshold") == (p < 0.5) and note.meta == {"quality": round(p, 6)}
    for note, p in zip(safety.annotate(texts), p_toxic, strict=True):
        assert (note.reason == "above_threshold") == (p >= 0.5) and note.meta == {"toxicity": round(p, 6)}


@pytest.mark.slow  # two spawned worker processes each import torch and load the models (~25 s here)
def test_model_steps_in_prepare_write_scores_and_histograms(models: dict[str, Path], tmp_path: Path) -> None:
    texts = _texts()
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    (step,) = build_steps([{"type": "perplexity", "model": str(models["lm"])}])
    ppl = sorted(step.perplexities(texts))
    head, tail = ppl[3], ppl[6]
    steps = [{"type": "perplexity", "model": str(models["lm"]), "head": head, "tail": tail, "max": ppl[-2]},
             {"type": "toxicity", "model": str(models["cls"]), "threshold": 0.99}]
    outs = []
    for workers in (1, 2):
        cfg = PrepareConfig.model_validate({"inputs": [str(tmp_path / "in.jsonl")], "chunk_docs": 4, "steps": steps,
                                            "output": str(tmp_path / f"w{workers}")})
        outs.append(prepare(cfg, workers=workers, progress=False))
    assert _part_lines(tmp_path / "w1") == _part_lines(tmp_path / "w2")
    stats = {s["name"]: s for s in outs[0]["steps"]}
    assert stats["perplexity"]["reasons"] == {"too_high": 1}
    assert sum(stats["perplexity"]["histogram"]["counts"]) == len(texts)
    assert sum(stats["toxicity"]["histogram"]["counts"]) == len(texts) - 1
    rows = [json.loads(line) for line in _part_lines(tmp_path / "w1")]
    buckets = [r["meta"]["perplexity_bucket"] for r in rows]
    assert buckets.count("head") == 3 and buckets.count("middle") == 3 and buckets.count("tail") == 2
    assert all(0 <= r["meta"]["toxicity"] <= 1 for r in rows)
    report = (tmp_path / "w1" / "report.md").read_text()
    assert "## Scores: perplexity" in report and "![score histograms](report-scores.png)" in report
    assert (tmp_path / "w1" / "report-scores.png").stat().st_size > 0
    (removed,) = stats["perplexity"]["examples"]  # the one document above `max`, with its score
    assert removed["reason"] == "too_high" and removed["score"] == pytest.approx(ppl[-1], rel=1e-4)
    assert texts[int(removed["id"].rsplit(":", 1)[-1]) - 1].startswith(removed["text"])


@pytest.mark.parametrize("recipe", ["prepare-quality.yaml", "decontaminate-demo.yaml"])
def test_quality_and_decontamination_recipes_validate(recipe: str) -> None:
    from lmcraft.config import load_config

    cfg = load_config(PrepareConfig, Path(__file__).parents[1] / "recipes" / recipe)
    steps = build_steps(cfg.steps)
    names = [s.name for s in steps]
    assert names[-1] == "decontaminate" and steps[-1].tasks == ["builtin"] and steps[-1].action == "flag"
    if recipe == "prepare-quality.yaml":
        ppl, cls = steps[names.index("perplexity")], steps[names.index("classifier")]
        assert ppl.head < ppl.tail < ppl.max and cls.label == "high"
        assert not any("201[7-9]" in s.path or "202" in s.path for s in cfg.inputs)  # the held-out speeches
