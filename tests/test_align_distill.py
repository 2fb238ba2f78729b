"""Distillation: the divergences against hand-computed values and TRL's GKD loss, the chunked loss against the
unchunked one (values and gradients), the teacher cache, on-policy sampling, and the stage end to end on the toy task
(a 2-layer teacher into a 1-layer student), with exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lmcraft.align.distill_loss import DistillLoss, TeacherRows, chunked_distillation_loss, divergence

S = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
T = torch.tensor([[0.0, 1.0, 0.5], [2.0, -1.0, 0.0]])


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    e = [math.exp(x / temperature) for x in row]
    return [x / sum(e) for x in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _hand(loss: str, beta: float, temperature: float) -> list[float]:
    out = []
    for s, t in zip(S.tolist(), T.tolist(), strict=True):
        ps, pt = _softmax(s, temperature), _softmax(t, temperature)
        if loss == "forward_kl":
            out.append(_kl(pt, ps))
        elif loss == "reverse_kl":
            out.append(_kl(ps, pt))
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps, strict=True)]
            out.append(beta * _kl(pt, m) + (1 - beta) * _kl(ps, m))
    return out


@pytest.mark.parametrize("loss, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("gkd", 0.5), ("gkd", 0.2)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergences_equal_hand_computed_values(loss: str, beta: float, temperature: float) -> None:
    got = divergence(S, T, loss, beta, temperature)  # type: ignore[arg-type]
    assert got.tolist() == pytest.approx(_hand(loss, beta, temperature), rel=1e-5)


def test_gkd_ends_are_forward_and_reverse_kl() -> None:
    """JSD_beta -> 0 at beta in {0, 1}; lmcraft (like TRL) takes beta = 0 as KL(p_T || p_S) and 1 as KL(p_S || p_T)."""
    assert divergence(S, T, "gkd", 0.0).tolist() == pytest.approx(_hand("forward_kl", 0, 1), rel=1e-5)
    assert divergence(S, T, "gkd", 1.0).tolist() == pytest.approx(_hand("reverse_kl", 0, 1), rel=1e-5)
    assert max(_hand("gkd", 1e-6, 1.0)) < 1e-4  # the formula itself vanishes there


def test_top_k_renormalises_both_distributions_on_the_teachers_set() -> None:
    """Top-2 of the teacher: both distributions renormalised on those 2 ids, the tail dropped; k = V is the full
    divergence."""
    values, idx = T.topk(2, -1)
    got = divergence(S.gather(1, idx), values, "forward_kl")
    for r in range(2):
        pt = _softmax([T[r, i].item() for i in idx[r]])
        ps = _softmax([S[r, i].item() for i in idx[r]])
        assert got[r].item() == pytest.approx(_kl(pt, ps), rel=1e-5)
    values, idx = T.topk(3, -1)
    assert torch.allclose(divergence(S.gather(1, idx), values), divergence(S, T))


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "gkd"])
def test_chunked_loss_equals_unchunked_values_and_gradients(loss: str) -> None:
    torch.manual_seed(0)
    n, hid, vocab = 11, 8, 20
    head_s, head_t = torch.nn.Linear(hid, vocab, bias=False), torch.nn.Linear(hid, vocab, bias=False)
    h, ht, y = torch.randn(n, hid, requires_grad=True), torch.randn(n, hid), torch.randint(vocab, (n,))
    spec = DistillLoss(loss, 0.3, 1.5, 0.25)  # type: ignore[arg-type]
    teacher = TeacherRows(hidden=ht, head=head_t)
    got = chunked_distillation_loss(h, head_s, y, teacher, spec, rows=4)
    grads = torch.autograd.grad(got[0], (h, head_s.weight))
    z = head_s(h)
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    kd = divergence(z, head_t(ht).detach(), loss, 0.3, 1.5)  # type: ignore[arg-type]
    want = (0.25 * ce + 0.75 * kd).sum()
    assert torch.allclose(got, torch.stack([want, ce.sum(), kd.sum()]).detach(), atol=1e-5)
    for g, w in zip(grads, torch.autograd.grad(want, (h, head_s.weight)), strict=True):
        assert torch.allclose(g, w, atol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_equals_trl_generalized_jsd_loss(beta: float) -> None:
    """TRL 1.16 `GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta, temperature, reduction="sum")`: the sum
    over labelled positions of the per-token divergence (TRL masks by labels != -100 with no shift; so do we here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "importing from trl.experimental"
        from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(1)
    student, teacher = torch.randn(2, 5, 17) * 3, torch.randn(2, 5, 17) * 3
    labels = torch.tensor([[-100, 3, 4, -100, 1], [2, -100, 5, 6, 7]])
    want = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=0.7, reduction="sum")
    keep = labels != -100
    got = divergence(student[keep], teacher[keep], "gkd", beta, 0.7).sum()
    assert abs(got.item() - want.item()) < 1e-6 * max(1.0, abs(want.item())), (got, want)


# ---- the stage on the toy task ------------------------------------------------------------------------------------
QUIET = {"progress": False, "tensorboard": False, "plot": False}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmcraft.align import toy

    return toy.build(tmp_path_factory.mktemp("toy"), num_sft=96, num_prompts=8, num_eval=4, hidden_size=32)


def config(task: Path, out: Path, **distill: Any) -> dict[str, Any]:
    return {"model": {"from": str(task / "base")}, "teacher": {"from": str(task / "base")},
            "data": {"train": [str(task / "sft.jsonl")], "val_size": 8, "max_length": 48},
            "distill": {"student_layers": 1, **distill},
            "trainer": {"lr": 1e-2, "max_steps": 4, "micro_batch_size": 4, "eval_every": 2, "log_every": 1, "seed": 3,
                        **QUIET},
            "output_dir": str(out)}


def run_stage(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    from lmcraft.cli import main

    path.write_text(yaml.safe_dump(cfg))
    assert main(["distill", str(path), "--no-progress"]) == 0
    return json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())


def metrics(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_teacher_cache_round_trip_and_fingerprint(task: Path, tmp_path: Path) -> None:
    from lmcraft.align.distill import TeacherCache
    from lmcraft.align.instruct import ChatFormatter
    from lmcraft.align.modeling import load_stage_tokenizer, load_start_model
    from lmcraft.align.sft import build_sft_data, load_sft_conversations
    from lmcraft.stages.distill import DistillData

    model, folder = load_start_model(task / "base")
    tok = load_stage_tokenizer(folder)
    convs, _ = load_sft_conversations(DistillData(train=[str(task / "sft.jsonl")], limit=6))
    examples = build_sft_data(convs, ChatFormatter(tok), 48).examples
    cache = TeacherCache.build(model, examples, 5, tok.pad_token_id, batch_size=4)
    key = TeacherCache.fingerprint("base", 5, examples)
    cache.save(tmp_path, key, "base", 5)
    back = TeacherCache.load(tmp_path, key)
    assert back is not None and (back.values == cache.values).all() and (back.indices == cache.indices).all()
    assert TeacherCache.load(tmp_path, TeacherCache.fingerprint("base", 6, examples)) is None
    # the rows of example 2 are the teacher's top-5 logits at its labelled positions
    ex = examples[2]
    logits = model(torch.tensor([ex.input_ids])).logits[0, :-1][torch.tensor(ex.trained[1:])]
    values, idx = cache.rows(2)
    top = logits.topk(5, -1)
    assert torch.equal(torch.from_numpy(idx).long(), top.indices)
    assert torch.allclose(torch.from_numpy(values).float(), top.values, atol=2e-3)


def test_on_policy_sample_keeps_prompts_and_labels_only_completions(task: Path) -> None:
    from lmcraft.align.distill import DistillData as Data
    from lmcraft.align.distill import DistillLossFn
    from lmcraft.align.instruct import ChatFormatter
    from lmcraft.align.modeling import load_stage_tokenizer, load_start_model
    from lmcraft.align.sft import build_sft_data, load_sft_conversations
    from lmcraft.generate import GenerationConfig
    from lmcraft.stages.distill import DistillData

    model, folder = load_start_model(task / "base")
    tok = load_stage_tokenizer(folder)
    convs, _ = load_sft_conversations(DistillData(train=[str(task / "sft.jsonl")], limit=3))
    data = Data(build_sft_data(convs, ChatFormatter(tok), 48).examples, tok.pad_token_id)
    fn = DistillLossFn(DistillLoss(), model, 1.0, GenerationConfig(max_new_tokens=5, do_sample=True,
                                                                    eos_token_ids=tok.eos_token_ids,
                                                                    pad_token_id=tok.pad_token_id))
    batch = fn.sample(model, data.collate([0, 1, 2]))
    for row, ex in enumerate(data.examples):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        prompt = ex.input_ids[:ex.prompt_length()]
        assert ids[:len(prompt)] == prompt and 1 <= len(ids) - len(prompt) <= 5
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == ids[len(prompt):]


def test_different_vocabularies_are_refused(task: Path, tmp_path: Path) -> None:
    from conftest import save_chat_tokenizer
    from lmcraft.align.distill import check_same_vocabulary
    from lmcraft.errors import ConfigError
    from lmcraft.tokenizer.load import load_tokenizer

    save_chat_tokenizer(tmp_path, ["some other words entirely"], 300)
    with pytest.raises(ConfigError, match="tokenizers differ"):
        check_same_vocabulary(load_tokenizer(task / "base"), load_tokenizer(tmp_path), 512, 512)
    with pytest.raises(ConfigError, match="one vocabulary"):
        check_same_vocabulary(load_tokenizer(task / "base"), load_tokenizer(task / "base"), 512, 300)


@pytest.mark.slow
def test_stage_live_teacher_on_policy_and_cached_teacher(task: Path, tmp_path: Path) -> None:
    """2-layer teacher -> 1-layer student: GKD with on-policy batches; then forward KL from a cache of all V logits
    equals the live teacher's forward KL (up to the cache's fp16 rounding; k above V keeps all V)."""
    summary = run_stage(config(task, tmp_path / "gkd", loss="gkd", beta=0.5, temperature=2.0, alpha=0.1,
                               on_policy={"fraction": 1.0, "max_new_tokens": 6}), tmp_path / "gkd.yaml")
    assert json.loads((tmp_path / "gkd" / "final" / "config.json").read_text())["num_hidden_layers"] == 1
    train = [r for r in metrics(tmp_path / "gkd") if r["split"] == "train"]
    assert len(train) == 4 and all(r["kd"] >= 0 and r["ce"] > 0 for r in train)
    assert summary["eval_ppl"] is not None and summary["start_eval_ppl"] is not None
    live = run_stage(config(task, tmp_path / "live"), tmp_path / "live.yaml")
    cached = run_stage(config(task, tmp_path / "cached", teacher_cache=str(tmp_path / "cache"), top_k=10**6),
                       tmp_path / "cached.yaml")
    assert (tmp_path / "cache" / "teacher_topk.npz").is_file()
    a, b = metrics(tmp_path / "live"), metrics(tmp_path / "cached")
    assert a[0]["kd"] == pytest.approx(b[0]["kd"], rel=2e-2, abs=1e-4)
    assert live["eval_ppl"] == pytest.approx(cached["eval_ppl"], rel=1e-2)


KILLER = """
import os, signal, sys
from lmcraft.train import trainer
step = trainer.Trainer._optimizer_step
def killing_step(self):
    out = step(self)
    if self.state.step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
trainer.Trainer._optimizer_step = killing_step
from lmcraft.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_distill_resumes_exactly_after_sigkill(task: Path, tmp_path: Path) -> None:
    """On-policy GKD with a LoRA student (coin flips and samples from the trainer's RNG) killed after step 3, resumed
    from step-2: the same adapter and metrics as the uninterrupted run."""
    from safetensors.torch import load_file

    from lmcraft.cli import main

    def cfg(out: Path) -> dict[str, Any]:
        c = config(task, out, loss="gkd", beta=0.5, on_policy={"fraction": 0.5, "max_new_tokens": 4})
        c["trainer"].update(save_every=2)
        c["distill"].pop("student_layers")
        c["peft"] = {"method": "lora", "r": 2}
        return c

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child: the same reductions, bit for bit
    try:
        run_stage(cfg(tmp_path / "full"), tmp_path / "full.yaml")
        path = tmp_path / "killed.yaml"
        path.write_text(yaml.safe_dump(cfg(tmp_path / "killed")))
        proc = subprocess.run([sys.executable, "-c", KILLER, "distill", str(path), "--no-progress"],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert main(["distill", str(path), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)
    a, b = (load_file(tmp_path / d / "step-4" / "adapter_model.safetensors") for d in ("full", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(tmp_path / "full") == metrics(tmp_path / "killed")


def test_text_examples_are_windows_of_every_token(task: Path) -> None:
    from lmcraft.align.distill import text_examples
    from lmcraft.tokenizer.load import load_tokenizer

    tok = load_tokenizer(task / "base")
    text = "red blue green apple pear cat dog " * 5
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    examples = text_examples([("doc", text)], tok, 8)
    joined = [i for ex in examples for i in ex.input_ids]
    assert joined in (ids, ids[:-1]) and joined[-1] == ids[len(joined) - 1]  # a last 1-token window predicts nothing
    assert [len(ex.input_ids) for ex in examples[:-1]] == [8] * (len(examples) - 1)
    assert all(all(ex.trained) for ex in examples) and examples[-1].input_ids[-1] in (tok.eos_token_id, ids[-2])


def test_recipe_validates_and_inconsistent_settings_are_refused(tmp_path: Path) -> None:
    from lmcraft.config import load_config
    from lmcraft.errors import LmcraftError
    from lmcraft.stages.distill import DistillConfig

    recipe = Path(__file__).parents[1] / "recipes" / "distill-smollm2.yaml"
    cfg = load_config(DistillConfig, recipe, [])
    assert cfg.distill.student_layers == 4 and cfg.data.format == "text"
    for overrides, message in ((["distill.on_policy.fraction=0.5"], "teacher_cache"),
                               (["distill.beta=0.3"], "gkd only"),
                               (["distill.teacher_cache=null", "distill.on_policy.fraction=0.5"], "chat data"),
                               (["peft={method: lora}"], "student_layers with peft")):
        with pytest.raises(LmcraftError, match=message):
            load_config(DistillConfig, recipe, overrides)
