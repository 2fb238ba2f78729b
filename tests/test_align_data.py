"""Record formats: alpaca, sharegpt, messages, prompt/chosen/rejected, KTO's labelled answers; errors name the file
and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcraft.align.data import (
    load_conversations,
    load_labelled_answers,
    load_preferences,
    load_prompts,
    record_to_messages,
)
from lmcraft.errors import InputFileError


def write(path: Path, rows: list[dict], jsonl: bool = True) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return path


def test_alpaca_with_input_system_and_history(tmp_path: Path) -> None:
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Be terse.",
             "history": [["hi", "hello"]]}, {"instruction": "Say hi", "input": "", "output": "hi"}]
    convs = load_conversations([write(tmp_path / "a.json", rows, jsonl=False)])
    assert convs[0].messages == [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Add.\n2 and 3"},
        {"role": "assistant", "content": "5"}]
    assert convs[1].messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert convs[1].source.endswith("a.json, record 1")


def test_sharegpt_and_messages_formats(tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                               {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}], "system": "S"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    convs = load_conversations([write(tmp_path / "c.jsonl", rows)])
    assert [m["role"] for m in convs[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert convs[0].messages[0]["content"] == "S" and convs[1].messages[1] == {"role": "assistant", "content": "a"}


def test_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    with pytest.raises(InputFileError, match=r"bad\.jsonl, line 2: expected a string field 'output'"):
        load_conversations([path])
    path.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(InputFileError, match="line 1: expected at least one assistant message"):
        load_conversations([path])
    path.write_text('{"conversations": [{"from": "alien", "value": "q"}]}\n')
    with pytest.raises(InputFileError, match="'from' among"):
        load_conversations([path])
    path.write_text('{"messages": [}\n')
    with pytest.raises(InputFileError, match="line 1: expected one JSON object per line"):
        load_conversations([path])
    with pytest.raises(InputFileError, match="expected one of the keys"):
        record_to_messages({"text": "x"}, where="f.jsonl, line 9")


def test_preference_formats(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "chosen": "good", "rejected": "bad", "margin": 2},
        {"instruction": "i", "input": "x", "chosen": "good", "rejected": "bad"},
        {"conversations": [{"from": "human", "value": "p"}], "chosen": {"from": "gpt", "value": "good"},
         "rejected": {"from": "gpt", "value": "bad"}},  # LLaMA-Factory dpo_en_demo layout
        {"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "bad"}]},  # implicit prompt
    ]
    pairs = load_preferences([write(tmp_path / "p.jsonl", rows)])
    for pair in pairs:
        assert pair.chosen == [{"role": "assistant", "content": "good"}]
        assert pair.rejected == [{"role": "assistant", "content": "bad"}]
        assert pair.prompt[-1]["role"] == "user"
    assert pairs[1].prompt[-1]["content"] == "i\nx" and pairs[0].margin == 2.0 and pairs[1].margin == 0.0
    assert pairs[0].to_record() == {"prompt": [{"role": "user", "content": "p"}], "chosen": pairs[0].chosen,
                                    "rejected": pairs[0].rejected, "margin": 2.0}
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "x"}])
    with pytest.raises(InputFileError, match="'chosen' and 'rejected' fields"):
        load_preferences([bad])


def test_prompts_from_any_record(tmp_path: Path) -> None:
    rows = [{"prompt": "p1"}, {"instruction": "p2"}, {"prompt": "p3", "chosen": "a", "rejected": "b"},
            {"messages": [{"role": "user", "content": "p4"}, {"role": "assistant", "content": "a"}]}]
    prompts = load_prompts([write(tmp_path / "q.jsonl", rows)], limit=3)
    assert [p[-1]["content"] for p, _ in prompts] == ["p1", "p2", "p3"]


# the layout of LLaMA-Factory's kto_en_demo.json (a JSON array), and TRL's unpaired prompt/completion/label JSONL
KTO_DEMO = [
    {"messages": [{"content": "Summarise: spyware.", "role": "user"},
                  {"content": "It is about spyware.", "role": "assistant"}], "label": True},
    {"messages": [{"content": "Be brief.", "role": "system"}, {"content": "2 + 2?", "role": "user"},
                  {"content": "Five.", "role": "assistant"}], "label": False},
]


def test_kto_labelled_answers(tmp_path: Path) -> None:
    demo = load_labelled_answers([write(tmp_path / "kto_en_demo.json", KTO_DEMO, jsonl=False)])
    assert [a.desirable for a in demo] == [True, False]
    assert demo[1].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    assert demo[1].answer == [{"role": "assistant", "content": "Five."}] and demo[1].source.endswith("record 1")
    trl = [{"prompt": "q", "completion": "good", "label": True},
           {"prompt": [{"role": "user", "content": "q2"}], "completion": [{"role": "assistant", "content": "bad"}],
            "label": False}]
    rows = load_labelled_answers([write(tmp_path / "trl.jsonl", trl)])
    assert [(a.prompt[-1]["content"], a.answer[0]["content"], a.desirable) for a in rows] == [
        ("q", "good", True), ("q2", "bad", False)]
    pairs = load_labelled_answers([write(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])])
    assert [(a.answer[0]["content"], a.desirable) for a in pairs] == [("c", True), ("r", False)]


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "q", "completion": "a", "label": "yes"}, "boolean 'label'.*got 'yes'"),
    ({"prompt": "q", "completion": "a"}, "boolean 'label'.*got missing"),
    ({"messages": [{"role": "user", "content": "q"}], "label": True}, "a prompt before the answer"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "label": True},
     "assistant message"),
    ({"completion": "a", "label": True}, "'prompt' field beside 'completion'"),
    ({"text": "a", "label": True}, "'messages' \\+ 'label'.*keys are label, text"),
])
def test_kto_errors_name_file_and_line(tmp_path: Path, record: dict, expected: str) -> None:
    path = write(tmp_path / "kto.jsonl", [{"prompt": "fine", "completion": "ok", "label": True}, record])
    with pytest.raises(InputFileError, match=f"kto.jsonl, line 2: expected .*{expected}"):
        load_labelled_answers([path])
