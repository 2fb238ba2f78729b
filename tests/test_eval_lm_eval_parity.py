"""`lmcraft eval` agrees with lm-evaluation-harness (`lm_eval`, its `hf` backend) on the same model and local data.

A multiple-choice task (2 fixed few-shot demonstrations, first-n in lm-eval) and a perplexity task whose texts are
longer than the 128-token context (lm-eval's disjoint windows: our `stride` = the context) are defined on local
JSONL files for both harnesses; the accuracy and every per-item log-likelihood must agree to 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import build_tiny_model, save_chat_tokenizer
from lmcraft.cli import main
from lmcraft.hub import save_model

pytestmark = pytest.mark.parity

CONTEXT = 128
TOL = 1e-4
TEXTS = ["the cat sat on the mat. the dog ran in the park. a bird sang a song."] * 10
ANIMALS = ["cat", "dog", "bird", "fish"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval")
    vocab = save_chat_tokenizer(root / "tok", TEXTS, 300)
    model = build_tiny_model(vocab_size=vocab, max_position_embeddings=CONTEXT, eos_token_id=0, initializer_range=0.2)
    save_model(model, root / "model", tokenizer_dir=root / "tok")
    _jsonl(root / "train.jsonl", [{"question": f"what sat on the mat {i}", "choices": ANIMALS[:3], "label": i % 3,
                                   "answer": ANIMALS[i % 3]} for i in range(4)])
    _jsonl(root / "test.jsonl", [{"question": f"who ran in the park {i}", "choices": ANIMALS, "label": i % 4,
                                  "answer": ANIMALS[i % 4]} for i in range(8)])
    _jsonl(root / "ppl.jsonl", [{"text": "a dog ran in the park and a bird sang. " * k} for k in (2, 15, 40)])
    return root


def _lm_eval_samples(root: Path) -> tuple[dict, dict]:
    """lm-eval's results and per-document samples for both tasks (offline, local JSON data sets)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = root / "lm_eval_tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "mc.yaml").write_text(f"""task: lmcraft_mc
dataset_path: json
dataset_kwargs: {{data_files: {{train: "{root}/train.jsonl", test: "{root}/test.jsonl"}}}}
test_split: test
fewshot_split: train
num_fewshot: 2
fewshot_config: {{sampler: first_n}}
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list: [{{metric: acc}}]
""")
    (tasks / "ppl.yaml").write_text(f"""task: lmcraft_ppl
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{root}/ppl.jsonl"}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: bits_per_byte}}]
""")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={root / 'model'},dtype=float32,"
                                  f"max_length={CONTEXT}", tasks=["lmcraft_mc", "lmcraft_ppl"],
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True, batch_size=1,
                                  device="cpu")
    return out["results"], out["samples"]


def _lmcraft_samples(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    (root / "mc.yaml").write_text("""name: lmcraft_mc
data: {source: jsonl, path: test.jsonl}
fewshot: {source: jsonl, path: train.jsonl}
template: {input: "Question: {question}", answer_prefix: "Answer:", target: "{answer}", choices: choices, label: label}
strategies: [{name: multiple_choice, shots: {k: 2, selection: fixed, indices: [0, 1]}}]
metrics: [accuracy]
""")
    (root / "ppl.yaml").write_text(f"""name: lmcraft_ppl
data: {{source: jsonl, path: ppl.jsonl}}
template: {{input: "{{text}}"}}
strategies: [{{name: perplexity, stride: {CONTEXT}}}]
metrics: [perplexity]
""")
    # The torch scorer is the one compared: llama.cpp (backend auto, where llama-cpp-python is installed) keeps its
    # KV cache in f16, and its log-likelihoods differ from lm-eval's by up to ~7e-4 on this model.
    model = f"{{path: {root / 'model'}, chat: false, batch_size: 3, max_length: {CONTEXT}, backend: torch}}"
    (root / "eval.yaml").write_text(f"""model: {model}
tasks: [{{task: mc.yaml}}, {{task: ppl.yaml}}]
output_dir: {root / 'ours'}
""")
    monkeypatch.chdir(root)
    assert main(["eval", str(root / "eval.yaml")]) == 0
    results = json.loads((root / "ours" / "results.json").read_text())["results"]
    by_task = {r["task"]: r["strategies"][0] for r in results}
    samples = {task: [json.loads(line) for line in (root / "ours" / s["samples"]).read_text().splitlines()]
               for task, s in by_task.items()}
    return {task: s["metrics"] for task, s in by_task.items()}, samples


def test_multiple_choice_and_perplexity_agree_with_lm_eval(setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs, their_samples = _lm_eval_samples(setup)
    ours, our_samples = _lmcraft_samples(setup, monkeypatch)

    mc_theirs = sorted(their_samples["lmcraft_mc"], key=lambda s: s["doc_id"])
    assert len(mc_theirs) == len(our_samples["lmcraft_mc"]) == 8
    worst = 0.0
    for their, our in zip(mc_theirs, our_samples["lmcraft_mc"], strict=True):
        their_scores = [float(r[0]) for r in their["filtered_resps"]]
        our_scores = [our["extra"][f"score_{k}"] for k in range(len(ANIMALS))]
        worst = max(worst, *(abs(a - b) for a, b in zip(their_scores, our_scores, strict=True)))
        assert float(their["acc"]) == float(our["correct"])
    assert worst < TOL, f"largest per-choice log-likelihood difference {worst:.2e}"
    assert ours["lmcraft_mc"]["accuracy"] == pytest.approx(theirs["lmcraft_mc"]["acc,none"])

    ppl_theirs = sorted(their_samples["lmcraft_ppl"], key=lambda s: s["doc_id"])
    our_ppl = our_samples["lmcraft_ppl"]
    assert max(o["extra"]["tokens"] for o in our_ppl) > 2 * CONTEXT  # several windows per text
    diffs = [abs(float(t["filtered_resps"][0]) - o["extra"]["logprob"]) for t, o in zip(ppl_theirs, our_ppl,
                                                                                        strict=True)]
    assert max(diffs) < TOL, f"largest per-text log-likelihood difference {max(diffs):.2e}"
    print(f"lm-eval agreement: multiple choice max |diff| {worst:.1e}, perplexity max |diff| {max(diffs):.1e}")
    assert ours["lmcraft_ppl"]["bits_per_byte"] == pytest.approx(theirs["lmcraft_ppl"]["bits_per_byte,none"],
                                                                 abs=1e-5)

    exported = json.loads((setup / "ours" / "results_lm_eval.json").read_text())["results"]  # lm-eval's layout
    for task, keys in {"lmcraft_mc": ("acc,none", "acc_stderr,none"), "lmcraft_ppl": ("bits_per_byte,none",)}.items():
        for key in keys:
            assert exported[task][key] == pytest.approx(theirs[task][key], abs=1e-5), (task, key)
