"""Tasks (YAML, data sources), metrics, the harness and the report, with a scripted fake model."""

from __future__ import annotations

import json
import math

import pytest

from lmcraft.errors import ConfigError, InputFileError
from lmcraft.evaluate import (
    build_report,
    evaluate_task,
    generation_metrics,
    label_f1,
    paired_comparisons,
    read_results,
    token_f1,
    wilson_interval,
    write_results,
)
from lmcraft.prompting.scripted import ScriptedLM
from lmcraft.prompting.tasks import builtin_tasks, load_task
from lmcraft.report import Report

MATH = {
    "name": "toy_math",
    "description": "Toy sums.",
    "data": {
        "source": "inline",
        "records": [
            {"q": "1+1", "a": 2, "meta": {"cot": "1+1=2\n#### 2"}},
            {"q": "2+2", "a": 4, "meta": {"cot": "2+2=4\n#### 4"}},
            {"q": "3+3", "a": 6, "meta": {"cot": "3+3=6\n#### 6"}},
        ],
        "fields": {"cot": "meta.cot"},
    },
    "fewshot": {"source": "inline", "records": [{"q": "5+5", "a": 10, "cot": "5+5=10\n#### 10"}]},
    "template": {"input": "Q: {q}", "answer_prefix": "A:", "target": "{a}", "reasoning": "{cot}"},
    "answer": {"type": "numeric"},
    "generation": {"max_new_tokens": 20, "answer_max_new_tokens": 5},
    "strategies": [
        {"name": "zero_shot"},
        {"name": "few_shot_cot", "shots": {"k": 1}},
        {"name": "self_consistency", "n": 3, "base": {"name": "zero_shot_cot"}},
    ],
    "metrics": ["accuracy", "f1", "exact_match"],
}


def sums_lm() -> ScriptedLM:
    """Right on 1+1 and 2+2, wrong on 3+3, whatever the strategy."""
    return ScriptedLM([("Q: 1+1", " 2"), ("Q: 2+2", " so #### 4"), ("Q: 3+3", " 7")])


# ---------------------------------------------------------------- metrics


def test_wilson_interval_matches_known_values() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_f1_metrics() -> None:
    assert token_f1("the big cat", "a big dog") == pytest.approx(0.5)
    assert token_f1("", "") == 1.0
    # gold: ham ham spam spam; pred: ham spam spam (unreadable): ham F1 = 2/3, spam F1 = 2/3 * ... computed below
    f1 = label_f1(["ham", "spam", "spam", None], ["ham", "ham", "spam", "spam"], ["ham", "spam"])
    ham = 2 * 1.0 * 0.5 / 1.5
    spam = 2 * 0.5 * 0.5 / 1.0
    assert f1 == pytest.approx((ham + spam) / 2)


def test_generation_metrics_via_sacrebleu_and_rouge() -> None:
    perfect = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"], ["bleu", "chrf", "rouge"])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert perfect["rougeL"] == pytest.approx(100.0)
    partial = generation_metrics(["the cat sat"], ["the cat sat on the mat"], ["rouge"])
    assert 0 < partial["rouge1"] < 100


# ---------------------------------------------------------------- tasks


def test_builtin_tasks_validate() -> None:
    assert {"gsm_symbolic", "spam", "moby_dick_ppl"} <= set(builtin_tasks())
    gsm = load_task("gsm_symbolic", {"data.size": 3})
    names = [s.title() for s in gsm.config.strategies]
    assert names == [
        "zero_shot",
        "zero_shot_cot",
        "few_shot_cot(k=4)",
        "self_consistency(zero_shot_cot, n=5)",
        "least_to_most",
    ]
    assert load_task("spam").config.answer.labels == ["ham", "spam"]


def test_gsm_symbolic_data_is_seeded() -> None:
    pytest.importorskip("reasoning_gym")
    task = load_task("gsm_symbolic", {"data.size": 4, "fewshot.size": 4})
    a, b = task.docs(), load_task("gsm_symbolic", {"data.size": 4}).docs()
    assert [d["question"] for d in a] == [d["question"] for d in b]
    assert a[0]["cot"].rstrip().endswith(f"#### {a[0]['answer']}")
    assert not {d["question"] for d in a} & {d["question"] for d in task.fewshot_docs()}


def test_task_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ConfigError, match="neither a YAML file nor a built-in task"):
        load_task("no_such_task")
    bad = {**MATH, "strategies": [{"name": "zero_shot_cott"}]}
    with pytest.raises(ConfigError, match="strategies"):
        load_task(bad)
    missing = {**MATH, "data": {**MATH["data"], "fields": {"cot": "meta.nope"}}}
    with pytest.raises(ConfigError, match="record 0 has no 'nope'"):
        load_task(missing).docs()
    (tmp_path / "d.jsonl").write_text('{"q": "1"}\nnot json\n')
    jsonl = {**MATH, "data": {"source": "jsonl", "path": str(tmp_path / "d.jsonl")}}
    with pytest.raises(InputFileError, match="line 2"):
        load_task(jsonl).docs()
    with pytest.raises(ConfigError, match="uses the field 'x'"):
        load_task({**MATH, "template": {"input": "{x}"}}).config.template.question({"q": 1})


def test_task_file_relative_data_shuffle_skip_limit(tmp_path) -> None:
    rows = [{"q": f"{i}+0", "a": i} for i in range(10)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "t.yaml").write_text(
        "name: t\ndata: {source: jsonl, path: rows.jsonl, shuffle: true, seed: 3, limit: 4}\n"
        "fewshot: {source: jsonl, path: rows.jsonl, shuffle: true, seed: 3, skip: 4}\n"
        "template: {input: 'Q: {q}', target: '{a}'}\n"
    )
    task = load_task(tmp_path / "t.yaml")
    test, pool = task.docs(), task.fewshot_docs()
    assert len(test) == 4 and len(pool) == 6
    assert sorted(d["a"] for d in test + pool) == list(range(10))  # a split: disjoint, complete
    assert [d["a"] for d in task.docs()] == [d["a"] for d in test]  # seeded
    assert len(task.docs(limit=2)) == 2


def test_files_source_reads_labelled_emails_and_chunks(tmp_path) -> None:
    (tmp_path / "spam-1").mkdir()
    (tmp_path / "easy-ham-1").mkdir()
    mail = "Subject: {s}\nContent-Type: text/html\n\n<p>Buy <b>now</b> &amp; save</p>\n"
    (tmp_path / "spam-1" / "a.json").write_text(json.dumps({"text": mail.format(s="WIN")}))
    plain = "Subject: lunch\nContent-Type: text/plain\n\nSee you   at noon.\n"
    (tmp_path / "easy-ham-1" / "b.json").write_text(json.dumps({"text": plain, "id": "b"}))
    spec = {
        "source": "files",
        "root": str(tmp_path),
        "glob": "*/*.json",
        "format": "json",
        "email": True,
        "labels": {"spam-*/*": "spam", "*ham-*/*": "ham"},
    }
    docs = load_task({**MATH, "data": spec, "fewshot": None}).docs()
    assert [(d["label"], d["text"]) for d in docs] == [
        ("ham", "Subject: lunch\n\nSee you at noon."),
        ("spam", "Subject: WIN\n\nBuy now & save"),
    ]
    assert docs[0]["id"] == "b"
    for i in (2, 10):
        (tmp_path / f"ch_{i}.txt").write_text("para one.\n\npara two is longer.\n\nthree")
    chunked = {"source": "files", "root": str(tmp_path), "glob": "ch_*.txt", "chunk_chars": 25}
    pieces = load_task({**MATH, "data": chunked, "fewshot": None}).docs()
    assert [p["path"] for p in pieces] == ["ch_2.txt"] * 3 + ["ch_10.txt"] * 3  # natural order: 2 before 10
    assert pieces[0]["text"] == "para one." and pieces[2]["text"] == "three"
    with pytest.raises(ConfigError, match="no files match"):
        load_task({**MATH, "data": {**chunked, "glob": "*.none"}, "fewshot": None}).docs()


# ---------------------------------------------------------------- harness and report


def test_evaluate_task_scores_every_strategy_and_writes_outputs(tmp_path) -> None:
    task = load_task(MATH)
    result = evaluate_task(sums_lm(), task, model_name="scripted")
    assert [s.strategy for s in result.strategies] == [
        "zero_shot",
        "few_shot_cot(k=1)",
        "self_consistency(zero_shot_cot, n=3)",
    ]
    for sr in result.strategies:
        m = sr.metrics
        assert m["accuracy"] == pytest.approx(2 / 3) and m["n"] == 3
        lo, hi = wilson_interval(2, 3)
        assert (m["accuracy_ci_low"], m["accuracy_ci_high"]) == (lo, hi)
        assert m["exact_match"] == pytest.approx(2 / 3)
        assert sr.seconds >= 0 and len(sr.predictions) == 3
    assert result.strategies[2].metrics["agreement"] == 1.0
    path = write_results([result], tmp_path)
    data = json.loads(path.read_text())
    assert load_task(data["results"][0]["config"]).config == task.config  # the saved task config reloads as is
    entry = data["results"][0]["strategies"][1]
    assert entry["strategy"] == "few_shot_cot(k=1)" and entry["metrics"]["accuracy"] == pytest.approx(2 / 3)
    samples = [json.loads(line) for line in (tmp_path / entry["samples"]).read_text().splitlines()]
    assert samples[2]["answer"] == "7" and samples[2]["gold"] == "6" and samples[2]["correct"] is False
    assert "Q: 5+5\nA: 5+5=10\n#### 10" in samples[0]["chains"][0]["prompts"][0]

    (back,) = read_results(tmp_path)
    assert [s.metrics for s in back.strategies] == [s.metrics for s in result.strategies]
    assert back.strategies[2].predictions[0].chains[1].outputs == result.strategies[2].predictions[0].chains[1].outputs

    build_report([result], tmp_path, "toy").write(tmp_path / "report.md", tmp_path / "report.html")
    md = (tmp_path / "report.md").read_text()
    assert "| zero_shot | 0.6667 | [" in md and "![toy_math: accuracy" in md and "(toy_math.png)" in md
    assert "exact McNemar test" in md and "| zero_shot | few_shot_cot(k=1) | 0 | 0 | 1 |" in md
    assert data["results"][0]["comparisons"][0]["p_value"] == 1.0
    assert (tmp_path / "toy_math.png").read_bytes()[:4] == b"\x89PNG"
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and "self_consistency(zero_shot_cot, n=3)" in html


def test_paired_comparisons_count_discordant_documents() -> None:
    """zero_shot is wrong on 3+3 only; a strategy that answers 7 to everything is right on none: 2 documents differ."""
    task = load_task({**MATH, "strategies": [{"name": "zero_shot"}, {"name": "few_shot", "shots": {"k": 1}}]})
    lm = ScriptedLM([("Q: 5+5\nA: 10\n\nQ: ", " 7"), ("Q: 1+1", " 2"), ("Q: 2+2", " so #### 4"), ("Q: 3+3", " 7")])
    result = evaluate_task(lm, task, model_name="scripted")
    (pair,) = paired_comparisons(result)
    assert pair == {"a": "zero_shot", "b": "few_shot(k=1)", "n": 3, "only_a": 2, "only_b": 0, "p_value": 0.5,
                    "significant": False}


def test_perplexity_and_classification_tasks() -> None:
    ppl_task = load_task(
        {
            "name": "ppl",
            "data": {"source": "inline", "records": [{"text": "a b"}, {"text": "c d e f"}]},
            "template": {"input": "{text}"},
            "metrics": ["perplexity"],
            "strategies": [{"name": "perplexity"}],
        }
    )
    lm = ScriptedLM(score=lambda ctx, text: -1.5 * len(text.split()))
    (sr,) = evaluate_task(lm, ppl_task).strategies
    assert sr.metrics["perplexity"] == pytest.approx(math.exp(1.5))
    assert sr.metrics["bits_per_byte"] == pytest.approx(9.0 / (math.log(2) * 10))

    cls = load_task(
        {
            "name": "cls",
            "data": {"source": "inline", "records": [{"t": "buy now", "y": "spam"}, {"t": "hi mom", "y": "ham"}]},
            "template": {"input": "{t}", "target": "{y}", "choices": ["ham", "spam"], "label": "y"},
            "answer": {"type": "label", "labels": ["ham", "spam"]},
            "metrics": ["accuracy", "f1"],
            "strategies": [{"name": "zero_shot"}, {"name": "multiple_choice"}],
        }
    )
    scores = {("buy now", " spam"): -1.0, ("buy now", " ham"): -2.0, ("hi mom", " spam"): -1.0}
    lm = ScriptedLM(
        [("buy now", " Spam!"), ("hi mom", " I think ham.")],
        score=lambda ctx, cont: scores.get((ctx.split("\n")[0], cont), -3.0),
    )
    zero, mc = evaluate_task(lm, cls).strategies
    assert zero.metrics["accuracy"] == 1.0 and zero.metrics["f1"] == 1.0
    assert mc.metrics["accuracy"] == 0.5 and [p.answer for p in mc.predictions] == ["spam", "spam"]


def test_report_markdown_and_html_blocks(tmp_path) -> None:
    r = Report("T").section("S").text("use `x|y` here").table(["a", "b"], [[1, 0.123456], ["p|q", None]])
    r.code("print('<hi>')", "python")
    md = r.to_markdown()
    assert "| 1 | 0.1235 |" in md and "| p\\|q |  |" in md and "```python\nprint('<hi>')\n```" in md
    html = r.to_html()
    assert "<code>x|y</code>" in html and "print(&#x27;&lt;hi&gt;&#x27;)" in html
    with pytest.raises(ValueError, match="cells"):
        r.table(["a"], [[1, 2]])
