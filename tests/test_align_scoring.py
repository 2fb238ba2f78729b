"""Scorers: rules, a reward model read through its chat template, and an LLM judge's expected digit rating."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmcraft.align import toy
from lmcraft.align.instruct import ChatFormatter
from lmcraft.align.rlaif import rank_samples
from lmcraft.align.scoring import JudgeScorer, RewardModelScorer, RuleScorer, ScorerSpec
from lmcraft.tokenizer.load import load_tokenizer

PROMPT = [{"role": "user", "content": "name some colors"}]


def test_rules() -> None:
    contains = RuleScorer(ScorerSpec(rule="contains", words=["thanks", "please"]))
    assert contains([PROMPT] * 3, ["red Thanks", "red thanksgiving", "please, red"]).tolist() == [1.0, 0.0, 1.0]
    both = RuleScorer(ScorerSpec(rule="contains", words=["thanks", "please"], mode="all"))
    assert both([PROMPT] * 2, ["please red thanks", "red thanks"]).tolist() == [1.0, 0.0]
    assert RuleScorer(ScorerSpec(rule="regex", pattern=r"^\w+ \w+$"))([PROMPT] * 2, ["a b", "a b c"]).tolist() == [
        1.0, 0.0]
    assert RuleScorer(ScorerSpec(rule="length", target=4))([PROMPT] * 2, ["a b c d", "a b"]).tolist() == [0.0, -0.5]
    with pytest.raises(ValueError, match="needs 'words'"):
        ScorerSpec(rule="contains")
    with pytest.raises(ValueError, match="needs from"):
        ScorerSpec(kind="judge")


def test_rank_samples_pairs_best_with_worst() -> None:
    prompts = [(PROMPT, "a"), (PROMPT, "b")]
    answers = [["red", "red thanks", "blue"], ["red", "blue"]]
    pairs, scores = rank_samples(prompts, answers, RuleScorer(ScorerSpec(rule="contains", words=["thanks"])))
    assert scores == [[0.0, 1.0, 0.0], [0.0, 0.0]]
    assert len(pairs) == 1 and pairs[0].chosen[0]["content"] == "red thanks"
    assert pairs[0].rejected[0]["content"] == "red" and pairs[0].source == "a"  # ties: the first worst answer


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy.build(tmp_path_factory.mktemp("toy"), num_sft=50, num_prompts=4, num_eval=2, hidden_size=32) / "base"


def test_reward_model_scorer_reads_prompt_and_answer_through_the_template(base: Path) -> None:
    from lmcraft.hub import load_model

    tok = load_tokenizer(base)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="newly initialised"):  # a random head is enough to check the plumbing
        model = load_model(base, head="reward")
    scores = RewardModelScorer(model, tok, batch_size=2)([PROMPT] * 3, ["red", "red blue thanks", "green"])
    for answer, score in zip(["red", "red blue thanks", "green"], scores.tolist(), strict=True):
        ids = ChatFormatter(tok).tokenize([*PROMPT, {"role": "assistant", "content": answer}]).input_ids
        assert score == pytest.approx(model(torch.tensor([ids])).logits.item(), abs=1e-5)


def test_judge_expected_rating(base: Path) -> None:
    from lmcraft.hub import load_model

    tok = load_tokenizer(base)
    model = load_model(base)
    judge = JudgeScorer(model, tok, scale=5, batch_size=2)
    scores = judge([PROMPT] * 3, ["red", "blue", "red thanks"])
    assert all(1.0 <= s <= 5.0 for s in scores.tolist())
    request = tok.encode(judge.request(PROMPT, "blue"), add_special_tokens=False)
    assert judge.request(PROMPT, "blue").endswith("<|im_start|>assistant\nRating: ")
    with torch.no_grad():
        logits = model(torch.tensor([request])).logits[0, -1]
    probs = logits[[tok.encode(str(k), add_special_tokens=False)[0] for k in range(1, 6)]].softmax(-1)
    assert scores[1].item() == pytest.approx(float((probs * torch.arange(1, 6)).sum()), abs=1e-5)


def test_judge_prompt_needs_placeholders() -> None:
    with pytest.raises(ValueError, match="placeholders"):
        ScorerSpec(kind="judge", **{"from": "x"}, prompt="rate it")
