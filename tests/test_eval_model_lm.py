"""`ModelLM` on a tiny lmcraft model: scores equal an unbatched forward, greedy answers do not depend on the
batch size, a prompt-tuned (PEFT) model goes through the same harness, and `lmcraft eval` runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmcraft import peft
from lmcraft.cli import main
from lmcraft.evaluate import evaluate_task
from lmcraft.hub import load_model, save_model
from lmcraft.prompting.lm import GenSettings
from lmcraft.prompting.model_lm import ModelLM
from lmcraft.prompting.tasks import load_task
from lmcraft.tokenizer.load import load_tokenizer
from lmcraft.tokenizer.train import DEFAULT_SPECIAL_TOKENS, save_tokenizer, train_tokenizer

TEXTS = [
    "the cat sat on the mat and the dog sat on the log",
    "what is two plus three? the answer is five",
    "spam: buy cheap pills now! ham: see you at lunch",
    "Question: how many apples are left? Answer: 7 apples",
] * 20

PROMPTS = ["the cat", "Question: how many apples are left? Answer:", "spam", "what is two plus three? the", "x y z"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("tiny")
    specials = DEFAULT_SPECIAL_TOKENS["bpe"]
    backend = train_tokenizer(TEXTS, "bpe", vocab_size=320, special_tokens=specials, show_progress=False)
    save_tokenizer(backend, root / "tok", specials)
    tok = load_tokenizer(root / "tok")
    model = tiny_model(
        vocab_size=backend.get_vocab_size(),
        hidden_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
        max_position_embeddings=256,
        initializer_range=0.3,  # spread-out logits: no near-ties for greedy decoding to trip on
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    )
    save_model(model, root / "model", tokenizer_dir=root / "tok")
    return root / "model"


def tiny_lm(folder, batch_size: int = 8, **kw) -> ModelLM:
    return ModelLM(
        load_model(folder, dtype="float64"), load_tokenizer(folder), batch_size=batch_size, progress=False, **kw
    )


def manual_logprob(model, ids: list[int], n: int) -> float:
    with torch.inference_mode():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids))))


def test_loglikelihood_equals_unbatched_forward(folder) -> None:
    lm = tiny_lm(folder, batch_size=3)
    pairs = [("the cat", " sat on the mat"), ("Question: how many", " apples"), ("", "spam"), ("x", " y z w v u")]
    scores = lm.loglikelihood(pairs)
    for (ctx, cont), (logp, n) in zip(pairs, scores, strict=True):
        ids = lm.encode(ctx + cont) if ctx else [lm.start_id, *lm.encode(cont)]
        n_ctx = len(lm.encode(ctx)) if ctx else 1
        assert n == len(ids) - n_ctx
        assert logp == pytest.approx(manual_logprob(lm.model, ids, n), abs=1e-9)


def test_rolling_loglikelihood_scores_every_token_once(folder) -> None:
    text = " ".join(TEXTS[:4])
    full = tiny_lm(folder)
    ids = [full.start_id, *full.tokenizer.encode(text, add_special_tokens=False)]
    ((logp, n),) = full.loglikelihood_rolling([text])
    assert n == len(ids) - 1
    assert logp == pytest.approx(manual_logprob(full.model, ids, n), abs=1e-9)
    windowed = tiny_lm(folder, max_length=16)
    ((logp_w, n_w),) = windowed.loglikelihood_rolling([text], stride=8)
    assert n_w == n and logp_w != pytest.approx(logp)  # shorter contexts: different, every token still counted
    first = manual_logprob(full.model, ids[:17], 16)  # the first window is the same with or without windows
    second = manual_logprob(full.model, ids[8:25], 8)  # the second predicts 8 new tokens after 8 of context
    ((logp_two, n_two),) = windowed.loglikelihood_rolling([full.tokenizer.decode(ids[1:25])], stride=8)
    assert n_two == 24 and logp_two == pytest.approx(first + second, abs=1e-9)


def test_greedy_generation_is_batch_invariant(folder) -> None:
    settings = GenSettings(max_new_tokens=12)
    one = tiny_lm(folder, batch_size=1).generate(PROMPTS, settings)
    four = tiny_lm(folder, batch_size=4).generate(PROMPTS, settings)
    assert one == four and len(set(one)) > 1


def test_sampling_is_seeded_and_stop_strings_cut(folder) -> None:
    lm = tiny_lm(folder, batch_size=2)
    sampled = GenSettings(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5)
    assert lm.generate(PROMPTS, sampled) == lm.generate(PROMPTS, sampled)
    greedy = lm.generate(PROMPTS[:1], GenSettings(max_new_tokens=12))[0]
    stop = greedy[3:6]
    cut = lm.generate(PROMPTS[:1], GenSettings(max_new_tokens=12, stop=(stop,)))[0]
    assert stop not in cut and greedy.startswith(cut)


TASK = {
    "name": "tiny_cls",
    "data": {
        "source": "inline",
        "records": [{"t": "buy cheap pills now", "y": "spam"}, {"t": "see you at lunch", "y": "ham"}],
    },
    "template": {"input": "{t}", "target": "{y}", "choices": ["ham", "spam"], "label": "y"},
    "answer": {"type": "label", "labels": ["ham", "spam"]},
    "generation": {"answer_max_new_tokens": 4},
    "strategies": [{"name": "zero_shot"}, {"name": "multiple_choice"}],
}


def test_prompt_tuned_model_runs_through_the_same_harness(folder) -> None:
    base = tiny_lm(folder)
    torch.manual_seed(1)
    tuned_model = peft.apply(load_model(folder, dtype="float64"), {"method": "prompt", "num_virtual_tokens": 3})
    tuned = ModelLM(tuned_model, base.tokenizer, batch_size=2, progress=False)
    pair = [("see you at", " lunch")]
    assert tuned.loglikelihood(pair)[0][0] != pytest.approx(base.loglikelihood(pair)[0][0])
    settings = GenSettings(max_new_tokens=8)
    assert tuned.generate(PROMPTS, settings) == ModelLM(tuned_model, base.tokenizer, batch_size=1).generate(
        PROMPTS, settings
    )
    result = evaluate_task(tuned, load_task(TASK), model_name="tiny+prompt-tuning")
    mc = result.strategies[1]
    assert mc.metrics["n"] == 2 and {p.answer for p in mc.predictions} <= {"ham", "spam"}


def test_eval_cli_writes_results_and_report(folder, tmp_path) -> None:
    (tmp_path / "task.yaml").write_text(json.dumps(TASK))
    out = tmp_path / "out"
    (tmp_path / "eval.yaml").write_text(
        f"model: {{path: {folder}, batch_size: 2, chat: true, threads: 1}}\n"
        f"tasks:\n  - task: task.yaml\n    limit: 2\noutput_dir: {out}\n"
    )
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert [s["strategy"] for s in results[0]["strategies"]] == ["zero_shot", "multiple_choice"]
    assert results[0]["chat"] is True and results[0]["n"] == 2
    assert "tiny_cls" in (out / "report.md").read_text() and (out / "report.html").is_file()
    assert (out / "tiny_cls.png").is_file()
    assert main(["eval", str(tmp_path / "eval.yaml"), "model.batch_size=0"]) == 2  # validated before any work


@pytest.mark.slow
def test_smollm2_greedy_answers_do_not_depend_on_batch_size() -> None:
    lm1 = ModelLM.load("smollm2-135m-instruct", batch_size=1, progress=False)
    lm8 = ModelLM(lm1.model, lm1.tokenizer, batch_size=8, progress=False)
    capital = lm1.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in lm1.generate([capital], GenSettings(max_new_tokens=12))[0]
    task = load_task("gsm_symbolic", {"data.size": 8})
    t = task.config.template
    prompts = [t.build(d, reply="Answer: Let's think step by step.").render(lm1, chat=True) for d in task.docs()]
    settings = GenSettings(max_new_tokens=32)
    assert lm1.generate(prompts, settings) == lm8.generate(prompts, settings)
