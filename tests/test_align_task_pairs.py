"""Preference pairs made from a prompting task (`data.task` of dpo/reward): each chosen answer is the item's gold
answer, each rejected one another item's different gold answer from the same split, the same draws for the same
seed; the data section takes files or a task, not both; and `lmcraft dpo` on task pairs reports the held-out
accuracy before and after training with its paired test (and the report's headline shows it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmcraft.align import toy
from lmcraft.align.config import PairsData
from lmcraft.align.grpo_config import TaskSection
from lmcraft.align.rewards import task_items
from lmcraft.align.task_pairs import as_labelled_answers, task_preferences
from lmcraft.cli import main
from lmcraft.headlines import headline_rows

SECTION = TaskSection(name="arithmetic", size=24, eval_size=8, system="Answer with the final number only.")


def test_pairs_prefer_the_gold_answer_to_another_items_answer() -> None:
    train_items, held_items = task_items(SECTION)
    train, held = task_preferences(SECTION, seed=0)
    assert len(train) == 24 and len(held) == 8
    for pairs, items in ((train, train_items), (held, held_items)):
        answers = {str(i["answer"]) for i in items}
        for pair, item in zip(pairs, items, strict=True):
            assert pair.prompt == item["messages"]
            assert pair.chosen == [{"role": "assistant", "content": str(item["answer"])}]
            rejected = pair.rejected[0]["content"]
            assert rejected != str(item["answer"]) and rejected in answers  # a wrong answer of the same split
    assert held[0].source == "task arithmetic, item 24"
    again, _ = task_preferences(SECTION, seed=0)
    other, _ = task_preferences(SECTION, seed=1)
    assert [p.rejected for p in again] == [p.rejected for p in train]
    assert [p.rejected for p in other] != [p.rejected for p in train]


def test_labelled_answers_from_pairs() -> None:
    train, _ = task_preferences(SECTION, seed=0)
    answers = as_labelled_answers(train[:2])
    assert [a.desirable for a in answers] == [True, False, True, False]
    assert answers[1].answer == train[0].rejected and answers[2].prompt == train[1].prompt


@pytest.mark.parametrize("data, message", [
    ({}, "exactly one of them"),
    ({"train": ["pairs.jsonl"], "task": {"name": "arithmetic"}}, "exactly one of them"),
    ({"task": {"name": "arithmetic"}, "val_size": 0.1}, "remove data.eval, data.val_size and data.limit"),
])
def test_data_takes_files_or_a_task(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PairsData(**data)


def test_dpo_on_task_pairs_reports_held_out_accuracy(tmp_path: Path) -> None:
    base = toy.build(tmp_path / "toy", num_sft=40, num_prompts=4, num_eval=4, hidden_size=32) / "base"
    out = tmp_path / "dpo"
    cfg = {"model": {"from": str(base)}, "peft": {"method": "lora", "r": 2},
           "data": {"task": {"name": "arithmetic", "size": 8, "eval_size": 6}, "max_length": 64},
           "dpo": {"beta": 0.5},
           "trainer": {"lr": 1e-2, "max_steps": 2, "micro_batch_size": 4, "eval_every": 2, "log_every": 1,
                       "progress": False, "tensorboard": False, "plot": False},
           "output_dir": str(out)}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["dpo", str(tmp_path / "dpo.yaml"), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 8 and summary["eval_count"] == 6 and summary["held_out"] == 6
    start = json.loads((out / "start_score.json").read_text())
    assert summary["accuracy_before"] == start["score"] == sum(start["correct"]) / 6
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    assert summary["right_before_only"] + summary["right_after_only"] <= 6 and 0 < summary["mcnemar_p"] <= 1
    rows = headline_rows("dpo", summary, out)
    assert [r[0] for r in rows][-1] == "held-out accuracy (6 problems)"
    assert rows[-1][1:3] == [summary["accuracy_before"], summary["accuracy_after"]]
