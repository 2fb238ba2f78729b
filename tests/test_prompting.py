"""Prompting strategies against a scripted fake model: the control flow, prompt by prompt."""

from __future__ import annotations

import re

import pytest

from lmcraft.errors import ConfigError
from lmcraft.prompting.answers import AnswerSpec, extract_gsm, extract_label, extract_numeric, normalize_text
from lmcraft.prompting.scripted import ScriptedLM
from lmcraft.prompting.strategies import (
    Context,
    FewShot,
    FewShotCoT,
    Instruction,
    LeastToMost,
    MultipleChoice,
    Perplexity,
    Sampling,
    SelfConsistency,
    ZeroShot,
    ZeroShotCoT,
    majority_vote,
    parse_subquestions,
)
from lmcraft.prompting.templates import Prompt, PromptTemplate, Shots

TEMPLATE = PromptTemplate(
    description="Solve the problem.",
    instruction="Solve it carefully.",
    steps=["Find the numbers.", "Add them."],
    input="Question: {question}",
    answer_prefix="Answer:",
    target="{answer}",
    reasoning="{cot}",
)
DOCS = [
    {"question": "What is 2 plus 3?", "answer": "5", "cot": "2 + 3 = 5\n#### 5"},
    {"question": "What is 4 times 6?", "answer": "24", "cot": "4 * 6 = 24\n#### 24"},
]
POOL = [
    {"question": f"Demo {i}: what is {i} plus {i}?", "answer": str(2 * i), "cot": f"{i}+{i}={2 * i}\n#### {2 * i}"}
    for i in range(10)
]


def ctx(lm: ScriptedLM, chat: bool = False, **kw) -> Context:
    return Context(lm, TEMPLATE, AnswerSpec(type="numeric"), pool=POOL, chat=chat, **kw)


# ---------------------------------------------------------------- answers


def test_numeric_extraction_prefers_gsm_marker_then_answer_is_then_last_number() -> None:
    assert extract_gsm("so 3+4=7\n#### 1,234") == "1234"
    assert extract_numeric("12 apples, 3 left.\n#### 7") == "7"
    assert extract_numeric("The answer is 42. Check: 40 + 2 = 42, not 43") == "42"
    assert extract_numeric("we get 10, then 12.50") == "12.5"
    assert extract_numeric("$1,000.00 total") == "1000"
    assert extract_numeric("no digits") is None
    spec = AnswerSpec(type="numeric")
    assert spec.extract(" 70. Because 12 + 58", "first") == "70"
    assert spec.extract(" 3\n\nExplanation: 17 people", "first_line") == "3"
    assert spec.extract(" 12 + 17 = 29\nso 4", "first_line") == "29"
    assert spec.extract("\n\n", "first_line") is None


def test_label_and_normalised_matching() -> None:
    assert extract_label("I think this is SPAM, not ham.", ["ham", "spam"]) == "spam"
    assert extract_label("hammer", ["ham"]) is None
    assert normalize_text("The  Eiffel-Tower!") == "eiffeltower"
    spec = AnswerSpec(type="normalized")
    assert spec.match("the Paris.", "Paris") and not spec.match(None, "Paris")
    assert AnswerSpec(type="numeric").match("5.0", "5") and not AnswerSpec(type="exact").match("5.0", "5")


# ---------------------------------------------------------------- templates and shots


def test_prompt_renders_plain_and_chat() -> None:
    lm = ScriptedLM(chat=True)
    p = TEMPLATE.build(DOCS[0], POOL[:1])
    plain = p.render(lm, chat=False)
    assert plain == (
        "Solve the problem.\n\nQuestion: Demo 0: what is 0 plus 0?\nAnswer: 0\n\nQuestion: What is 2 plus 3?\nAnswer:"
    )
    chat = p.render(lm, chat=True)
    assert chat == (
        "<|system|>Solve the problem.<|end|><|user|>Question: Demo 0: what is 0 plus 0?<|end|>"
        "<|assistant|>Answer: 0<|end|><|user|>Question: What is 2 plus 3?<|end|><|assistant|>Answer:"
    )
    assert Prompt((("user", "hi"),), "A:").continued(" x").reply == "A: x"


def test_instruction_style_lists_numbered_steps() -> None:
    p = TEMPLATE.build(DOCS[0], style="instruction")
    assert p.messages[0] == ("system", "Solve it carefully.\n1. Find the numbers.\n2. Add them.")


def test_random_shots_reproducible_by_seed_and_independent_of_batch() -> None:
    picker = Shots(k=3, seed=7).bind(POOL, TEMPLATE.question)
    a = [d["answer"] for d in picker.pick(DOCS[0], 0)]
    assert a == [d["answer"] for d in Shots(k=3, seed=7).bind(POOL, TEMPLATE.question).pick(DOCS[0], 0)]
    picks_by_seed = {
        tuple(d["answer"] for d in Shots(k=3, seed=s).bind(POOL, TEMPLATE.question).pick(DOCS[0], 0)) for s in range(5)
    }
    assert len(picks_by_seed) > 1  # the seed matters
    # the same query id gets the same demos whatever else is asked around it
    assert [d["answer"] for d in picker.pick(DOCS[0], 0)] == a
    assert len(set(a)) == 3


def test_fixed_similarity_order_and_query_exclusion() -> None:
    fixed = Shots(k=2, selection="fixed", indices=[5, 2]).bind(POOL, TEMPLATE.question)
    assert [d["answer"] for d in fixed.pick(DOCS[0], 0)] == ["10", "4"]
    with pytest.raises(ConfigError, match="fixed few-shot indices"):
        Shots(k=2, selection="fixed", indices=[99]).bind(POOL, TEMPLATE.question)
    sim = Shots(k=2, selection="similarity").bind(POOL, TEMPLATE.question)
    query = {"question": "Demo 7: what is 7 plus 7?"}  # identical to POOL[7]: excluded, never shown as its own demo
    near = {"question": "what is 7 plus 7 again"}
    assert sim.pick(near, 0)[0] is POOL[7]
    assert POOL[7] not in sim.pick(query, 0)
    rev = Shots(k=2, selection="similarity", order="reversed").bind(POOL, TEMPLATE.question)
    assert rev.pick(near, 0)[-1] is POOL[7]
    shuf = Shots(k=5, order="shuffled", seed=3).bind(POOL, TEMPLATE.question)
    plain = Shots(k=5, seed=3).bind(POOL, TEMPLATE.question)
    assert sorted(map(id, shuf.pick(DOCS[0], 1))) == sorted(map(id, plain.pick(DOCS[0], 1)))
    with pytest.raises(ConfigError, match="needs demonstrations"):
        Shots(k=1).bind([], TEMPLATE.question)


# ---------------------------------------------------------------- strategies


def test_zero_shot_instruction_and_few_shot_prompts() -> None:
    lm = ScriptedLM([("2 plus 3", " 5"), ("4 times 6", " 24\nQuestion: next")])
    preds = ZeroShot().run(ctx(lm), DOCS, [0, 1])
    assert [p.answer for p in preds] == ["5", "24"] and all(p.correct for p in preds)
    call = lm.calls[-1]
    assert call.settings.max_new_tokens == 32 and call.settings.stop == ("\nQuestion:",)
    assert call.inputs[0] == "Solve the problem.\n\nQuestion: What is 2 plus 3?\nAnswer:"

    Instruction().run(ctx(lm), DOCS[:1], [0])
    assert lm.calls[-1].inputs[0].startswith("Solve it carefully.\n1. Find the numbers.")
    assert lm.calls[-1].settings.max_new_tokens == 256

    FewShot(shots=Shots(k=2, selection="fixed", indices=[1, 3])).run(ctx(lm), DOCS[:1], [0])
    assert "Question: Demo 1: what is 1 plus 1?\nAnswer: 2\n\nQuestion: Demo 3" in lm.calls[-1].inputs[0]


def test_zero_shot_cot_two_stage_appends_reasoning_then_asks_for_answer() -> None:
    lm = ScriptedLM(
        [
            ("Therefore, the answer", " 5."),
            ("Let's think step by step.", " We add 2 and 3 to get 5. Then 99 bottles."),
        ]
    )
    (pred,) = ZeroShotCoT().run(ctx(lm), DOCS[:1], [0])
    first, second = lm.prompts()
    assert first == "Solve the problem.\n\nQuestion: What is 2 plus 3?\nAnswer: Let's think step by step."
    assert second == first + " We add 2 and 3 to get 5. Then 99 bottles.\nTherefore, the answer (arabic numerals) is"
    assert [c.settings.max_new_tokens for c in lm.calls] == [256, 32]
    assert pred.answer == "5" and pred.correct  # read from stage two, not the reasoning's last number (99)
    assert pred.chains[0].outputs == [" We add 2 and 3 to get 5. Then 99 bottles.", " 5."]

    one = ScriptedLM([("step by step", " so 2+3=5 and the answer is 5")])
    (pred,) = ZeroShotCoT(two_stage=False).run(ctx(one), DOCS[:1], [0])
    assert len(one.calls) == 1 and pred.answer == "5"


def test_zero_shot_cot_chat_keeps_reasoning_in_the_assistant_turn() -> None:
    lm = ScriptedLM([("Therefore", " 5"), ("step by step", " 2+3=5")], chat=True)
    ZeroShotCoT().run(ctx(lm, chat=True), DOCS[:1], [0])
    first, second = lm.prompts()
    assert first.endswith("<|assistant|>Answer: Let's think step by step.")
    assert second == first + " 2+3=5\nTherefore, the answer (arabic numerals) is"
    assert lm.calls[0].settings.stop == ()  # chat turns end at the model's end-of-turn token


def test_few_shot_cot_demonstrations_carry_worked_solutions() -> None:
    lm = ScriptedLM(default=" 2 + 3 = 5\n#### 5")
    (pred,) = FewShotCoT(shots=Shots(k=1, selection="fixed", indices=[4])).run(ctx(lm), DOCS[:1], [0])
    assert (
        "Question: Demo 4: what is 4 plus 4?\nAnswer: 4+4=8\n#### 8\n\nQuestion: What is 2 plus 3?" in lm.prompts()[0]
    )
    assert pred.answer == "5" and pred.correct
    with pytest.raises(ConfigError, match="reasoning"):
        PromptTemplate(input="{question}").build(DOCS[0], POOL[:1], with_reasoning=True)


def test_majority_vote_ties_go_to_first_appearance() -> None:
    assert majority_vote(["3", "5", "5", "3", None]) == ("3", {"3": 2, "5": 2}, 0.4)
    assert majority_vote(["5", "3", "3", "5"])[0] == "5"
    assert majority_vote(["7", "8", "8"])[0] == "8"
    assert majority_vote([None, None]) == (None, {}, 0.0)
    spec = AnswerSpec(type="numeric")
    assert majority_vote(["5.0", "5", "6"], spec.key) == ("5.0", {"5": 2, "6": 1}, 2 / 3)


def test_self_consistency_batches_all_chains_and_votes() -> None:
    lm = ScriptedLM(
        [
            (re.compile(r"2 plus 3.*Therefore", re.S), [" 5", " 6", " 5", " 6", " 7"]),  # tie 5/6: 5 came first
            (re.compile(r"4 times 6.*Therefore", re.S), [" 24", " 24", " 20", " 24", " 1"]),
            ("step by step", [" chain a", " chain b", " chain c"]),
        ]
    )
    sc = SelfConsistency(n=5, base=ZeroShotCoT(), sampling=Sampling(temperature=0.8, top_p=0.9))
    preds = sc.run(ctx(lm), DOCS, [0, 1])
    assert len(lm.calls) == 2  # one batched call per stage for N x documents prompts
    reasoning, answer = lm.calls
    assert len(reasoning.inputs) == 10 and reasoning.inputs[:5] == [reasoning.inputs[0]] * 5
    assert reasoning.settings.temperature == 0.8 and reasoning.settings.top_p == 0.9
    assert answer.settings.temperature == 0.8
    assert [p.answer for p in preds] == ["5", "24"]
    assert preds[0].votes == {"5": 2, "6": 2, "7": 1} and preds[0].agreement == 0.4
    assert preds[1].agreement == 0.6 and len(preds[1].chains) == 5
    assert sc.title() == "self_consistency(zero_shot_cot, n=5)"


def test_least_to_most_feeds_answers_forward() -> None:
    lm = ScriptedLM(
        [
            ("Sub-questions:", " How much is 2?\n2. How much is 2 plus 3?\n3. Unrelated statement"),
            ("Q: Now answer the original question.", " The answer is 5."),
            ("Q: How much is 2 plus 3?", " 5"),
            ("Q: How much is 2?", " 2"),
        ]
    )
    l2m = LeastToMost(max_subquestions=3)
    (pred,) = l2m.run(ctx(lm), DOCS[:1], [0])
    decompose, sub1, sub2, final = lm.prompts()
    assert decompose.endswith("Question: What is 2 plus 3?\nSub-questions:\n1.")
    assert sub1.endswith("Question: What is 2 plus 3?\n\nQ: How much is 2?\nA:")
    assert "Q: How much is 2?\nA: 2\n\nQ: How much is 2 plus 3?\nA:" in sub2  # answer 1 fed into step 2
    assert (
        "Q: How much is 2?\nA: 2\n\nQ: How much is 2 plus 3?\nA: 5\n\nQ: Now answer the original question.\nA:" in final
    )
    assert pred.answer == "5" and pred.correct and len(pred.chains[0].prompts) == 4


def test_least_to_most_batches_each_step_across_documents() -> None:
    lm = ScriptedLM(
        [
            (re.compile(r"2 plus 3\?\nSub-questions"), " A?\n2. B?"),
            (re.compile(r"4 times 6\?\nSub-questions"), " C?"),
            ("original question", " 1"),
        ],
        default=" x",
    )
    LeastToMost(examples=[{"question": "Demo?", "subquestions": ["Part one?", "Part two?"]}]).run(ctx(lm), DOCS, [0, 1])
    assert [len(c.inputs) for c in lm.calls] == [2, 2, 1, 2]  # decompose, step 1 (both), step 2 (one), final
    assert "Demo?\n1. Part one?\n2. Part two?\n\n" in lm.calls[0].inputs[0]


def test_parse_subquestions() -> None:
    text = "1. How many?\n2) What total?\n- Why?\nSo we add."
    assert parse_subquestions(text, 5) == ["How many?", "What total?", "Why?"]
    assert parse_subquestions("step one\nstep two", 1) == ["step one"]
    assert parse_subquestions("1. How many?\n2. Why?\n3. how many?", 5) == ["How many?", "Why?"]


def test_multiple_choice_by_loglikelihood_with_length_normalisation() -> None:
    doc = {"question": "Capital of France?", "options": ["Paris", "the city of Lyon"], "gold": 0}
    scores = {" Paris": -3.0, " the city of Lyon": -4.0}
    lm = ScriptedLM(score=lambda ctx_, cont: scores[cont])
    t = TEMPLATE.model_copy(update={"choices": "options", "label": "gold"})
    c = Context(lm, t, AnswerSpec(), chat=False)
    (raw,) = MultipleChoice().run(c, [doc], [0])
    (norm,) = MultipleChoice(normalize="tokens").run(c, [doc], [0])
    assert raw.answer == "Paris" and raw.correct
    assert norm.answer == "the city of Lyon" and not norm.correct  # -4/4 tokens > -3/1 token
    ctx_text, cont = lm.calls[0].inputs[0]
    assert ctx_text.endswith("Question: Capital of France?\nAnswer:") and cont == " Paris"


def test_perplexity_strategy_scores_whole_texts() -> None:
    lm = ScriptedLM(score=lambda ctx_, text: -2.0 * len(text.split()))
    t = PromptTemplate(input="{text}")
    preds = Perplexity().run(Context(lm, t, AnswerSpec()), [{"text": "a b c"}], [0])
    assert preds[0].extra == {"logprob": -6.0, "tokens": 3, "bytes": 5}
