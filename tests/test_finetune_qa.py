"""Extractive QA: SQuAD records, windows and span labels, best-span prediction, EM/F1, and the finetune stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from lmcraft.cli import main
from lmcraft.data.records import read_records
from lmcraft.errors import InputFileError
from lmcraft.finetune.qa import QAExample, qa_examples, qa_records
from lmcraft.finetune.tasks import QATask
from lmcraft.tokenizer.load import load_tokenizer
from test_finetune_support import FILLER, NAMES, PLACES, quick_trainer, tiny_model_folder, write_jsonl, write_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::lmcraft.hub.HubWarning")  # the MLM checkpoint gets a new qa head


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """`alice went to paris and bob went to rome ...`; the question names a person, the answer is their city."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        trips = list(zip(rng.sample(NAMES, 2), rng.sample(PLACES, 2), strict=True))
        parts = [f"{name} went to {place}" for name, place in trips]
        context = " and ".join(parts) + " " + " ".join(rng.choices(FILLER, k=4))
        name, place = trips[rng.randrange(2)]
        start = context.index(f"{name} went to {place}") + len(f"{name} went to ")
        rows.append({"question": name, "context": context, "answers": {"text": [place], "answer_start": [start]}})
    return rows


def test_flat_and_nested_squad_records(tmp_path: Path) -> None:
    flat = write_jsonl(tmp_path / "flat.jsonl", qa_rows(3))
    examples = qa_records(list(read_records(str(flat))))
    assert len(examples) == 3 and all(ex.context[s:s + len(t)] == t for ex in examples for t, s in ex.answers)
    nested = tmp_path / "squad.json"
    nested.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "bob went to rome", "qas": [{"id": "1", "question": "bob",
                                                   "answers": [{"text": "rome", "answer_start": 12}]}]}]}]}))
    (ex,) = qa_records(list(read_records(str(nested))))
    assert ex == QAExample("bob", "bob went to rome", (("rome", 12),), ex.where)


def test_an_answer_that_is_not_in_the_context_names_the_record(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "context": "bob went to rome",
                                                "answers": {"text": ["paris"], "answer_start": [12]}}])
    with pytest.raises(InputFileError, match=r"bad\.jsonl, line 1: expected .*'paris' is not at character 12"):
        qa_records(list(read_records(str(bad))))


def test_windows_share_the_stride_and_label_the_answer_tokens(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(write_tokenizer(tmp_path / "tok", encoder=True))
    context = "alice went to paris and " + " ".join(["the movie"] * 10) + " bob went to rome"
    ex = QAExample("bob", context, (("rome", context.index("rome")),), "x")
    windows, split = qa_examples([ex], tokenizer.backend, max_length=16, doc_stride=4)
    assert split == 1 and len(windows) > 2
    ids = tokenizer.backend.get_vocab()
    inside = [w for w in windows if w["start"]]
    assert inside and all(w["input_ids"][w["start"]] == ids["rome"] == w["input_ids"][w["end"]] for w in inside)
    assert any(w["start"] == w["end"] == 0 for w in windows)  # windows without the answer point at [CLS]
    for a, b in zip(windows, windows[1:], strict=False):  # consecutive windows overlap by the stride
        ctx_a = [o for o in a["qa"]["offsets"] if o is not None]
        ctx_b = [o for o in b["qa"]["offsets"] if o is not None]
        assert ctx_a[-4:] == ctx_b[:4]


def test_a_long_question_keeps_its_beginning_and_every_window_holds_context(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(write_tokenizer(tmp_path / "tok", encoder=True))
    context = "alice went to paris and bob went to rome"
    ex = QAExample("the movie " * 20 + "bob", context, (("rome", context.index("rome")),), "x")
    windows, _ = qa_examples([ex], tokenizer.backend, max_length=16, doc_stride=3)
    assert all(sum(o is not None for o in w["qa"]["offsets"]) >= 6 for w in windows)
    assert all(w["input_ids"][1:8] == tokenizer.backend.encode("the movie " * 4, add_special_tokens=False).ids[:7]
               for w in windows)


def test_best_span_respects_context_order_and_length() -> None:
    task = QATask(max_answer_length=2)
    logits = torch.full((6, 2), -5.0)
    logits[0] = torch.tensor([9.0, 9.0])  # [CLS]: never an answer
    logits[4, 0], logits[2, 1] = 8.0, 8.0  # end before start: not allowed
    logits[3, 0], logits[3, 1] = 3.0, 2.0
    offsets = [None, (0, 3), (4, 8), (9, 11), (12, 17), None]
    assert task.best_span(logits, offsets) == (pytest.approx(5.0), 3, 3)  # 8 + (-5) for (4, 4) or (2, 2) is less
    predicted, gold = task.predictions(logits[None], {"qa": [{"example": 0, "offsets": offsets,
                                                               "context": "bob went to paris", "answers": ["to"]}]})
    assert predicted == [(0, pytest.approx(5.0), "to")]  # the context's characters 9..11 (token 3's offsets)
    assert task.metrics(predicted, gold) == {"exact_match": 1.0, "f1": 1.0, "examples": 1.0}


def test_example_answer_is_the_best_window_and_metrics_follow_squad() -> None:
    task = QATask()
    predicted = [(0, 3.0, "the Rome"), (0, 1.0, "in rome."), (1, 0.5, "paris france")]
    gold = [(0, ["rome"]), (0, ["rome"]), (1, ["paris", "lyon"])]
    metrics = task.metrics(predicted, gold)
    assert metrics["exact_match"] == pytest.approx(0.5)  # "the Rome" ~ "rome" (best window); "paris france" != "paris"
    assert metrics["f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_finetune_qa_end_to_end(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    folder = tiny_model_folder(tmp_path, "bert")
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    cfg = {"task": "qa", "model": str(folder), "output_dir": str(tmp_path / "out"), "threads": 1,
           "data": {"train": {"path": str(data)}, "max_length": 16, "doc_stride": 4, "validation_fraction": 0.25},
           "trainer": quick_trainer(max_steps=6, eval_every=3, lr=3e-3)}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["finetune", str(tmp_path / "ft.yaml")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metric"] == "f1" and 0 <= summary["validation"]["f1"] <= 1
    assert summary["validation"]["examples"] == 10  # every held-out example scored once, over all its windows
    config = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert config["architectures"] == ["BertForQuestionAnswering"]
