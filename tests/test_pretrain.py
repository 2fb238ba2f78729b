"""`lmcraft pretrain` end to end on a tiny generated corpus and tiny models: every objective through the stage,
the saved folders load back, config errors are caught before work, and a SIGKILLed run resumes bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmcraft.cli import main
from lmcraft.config import load_config
from lmcraft.errors import ConfigError
from lmcraft.hub import load_model
from lmcraft.stages.pretrain import config_class, pretrain
from lmcraft.tokenizer.load import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GPT, BERT = ROOT / "recipes" / "pretrain-gpt-tiny.yaml", ROOT / "recipes" / "pretrain-bert-tiny.yaml"
FAST = ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.save_every=3", "trainer.log_every=3",
        "trainer.progress=false", "trainer.plot=false"]

ANIMALS = ["cat", "dog", "fox", "owl", "hen", "bee", "elk", "ram"]
COLOURS = ["red", "blue", "green", "grey", "white", "black"]
PLACES = ["the barn", "the field", "the wood", "the river", "the hill", "the town"]
VERBS = ["walks to", "runs to", "looks at", "sleeps in", "sings near", "waits by"]


def write_corpus(folder: Path, files: int = 3, paragraphs: int = 60, seed: int = 0) -> list[str]:
    """Plain-text files of paragraphs made of simple, learnable sentences; returns the file paths."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        paras = []
        for _ in range(paragraphs):
            sentences = [f"The {rng.choice(COLOURS)} {rng.choice(ANIMALS)} {rng.choice(VERBS)} {rng.choice(PLACES)}."
                         for _ in range(rng.randint(2, 6))]
            paras.append(" ".join(sentences))
        path = folder / f"part{f}.txt"
        path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
        paths.append(str(path))
    return paths


def config(recipe: Path, out: Path, *overrides: str):  # noqa: ANN201 - the stage's config class
    return load_config(config_class(), recipe, [f"output_dir={out}", *FAST, *overrides])


def inputs_override(files: list[str]) -> str:
    return "data.inputs=[" + ", ".join(files) + "]"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpt")
    summary = pretrain(config(GPT, out, inputs_override(corpus)), progress=False)
    return out, summary


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bert")
    summary = pretrain(config(BERT, out, inputs_override(corpus)), progress=False)
    return out, summary


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_clm_run_writes_a_loadable_model_samples_and_curves(gpt_run: tuple[Path, dict]) -> None:
    out, summary = gpt_run
    assert summary["objective"] == "clm" and summary["steps"] == 6
    assert {p.name for p in out.glob("step-*")} == {"step-3", "step-6"}
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "data" / "packed" / "index.json").is_file()
    records = _records(out)
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train) == 2 and train[1] < train[0]
    assert [r["step"] for r in records if r["split"] == "eval"] == [3, 6]
    assert summary["eval"]["eval_ppl"] == pytest.approx(torch.tensor(summary["eval"]["eval_loss"]).exp().item())
    # final/ is an HF folder with the tokenizer; the model loads and predicts like the last checkpoint
    model, tok = load_model(out / "final"), load_tokenizer(out / "final")
    assert model.head_kind == "lm" and model.config.vocab_size == tok.vocab_size
    assert model.config.eos_token_id == tok.eos_token_id is not None
    step = load_file(out / "step-6" / "model.safetensors")
    ids = torch.tensor([tok.encode("The red cat walks to the barn.")])
    with torch.no_grad():
        logits = model(ids).logits
        model.load_state_dict(step)
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)
    assert len(summary["samples"]) == 1 and summary["samples"][0]["prompt"] == "HAMLET."
    assert json.loads((out / "summary.json").read_text())["samples"] == summary["samples"]
    # the model records what it was trained on, for `lmcraft eval`'s overlap warning
    record = json.loads((out / "final" / "lmcraft_training_data.json").read_text())
    assert record["train"] == [str((out / "data" / "packed").resolve()), "train"]


def test_mlm_run_reports_masked_accuracy(bert_run: tuple[Path, dict]) -> None:
    out, summary = bert_run
    accuracy = summary["eval"]["eval_masked_accuracy"]
    assert 0.0 <= accuracy <= 1.0 and "samples" not in summary
    evals = [r for r in _records(out) if r["split"] == "eval"]
    assert all("eval_masked_accuracy" in r for r in evals)
    model = load_model(out / "final")
    assert model.head_kind == "mlm" and model.config.arch == "encoder"
    assert json.loads((out / "final" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]


@pytest.mark.parametrize(("name", "head", "metric"), [("nsp", "mlm", "eval_nsp_accuracy"),
                                                      ("sop", "mlm", "eval_sop_accuracy"),
                                                      ("rtd", "rtd", "eval_disc_accuracy")])
def test_encoder_objectives_through_the_stage(tmp_path: Path, bert_run: tuple[Path, dict], name: str, head: str,
                                              metric: str) -> None:
    packed = bert_run[0] / "data"
    overrides = ["data.inputs=null", f"data.packed={packed}", "tokenizer.train=null", f"objective.name={name}",
                 "trainer.max_steps=3"]
    summary = pretrain(config(BERT, tmp_path, *overrides), progress=False)
    assert summary["steps"] == 3 and metric in summary["eval"]
    assert load_model(tmp_path / "final").head_kind == head


def test_plm_through_the_stage_keeps_a_decoder(tmp_path: Path, gpt_run: tuple[Path, dict]) -> None:
    overrides = ["data.inputs=null", f"data.packed={gpt_run[0] / 'data' / 'packed'}", "tokenizer.train=null",
                 "objective.name=plm", "trainer.max_steps=3", "samples.max_new_tokens=4"]
    summary = pretrain(config(GPT, tmp_path, *overrides), progress=False)
    assert summary["objective"] == "plm" and len(summary["samples"]) == 1
    assert load_model(tmp_path / "final").head_kind == "lm"


def test_continued_pretraining_starts_from_the_saved_weights(tmp_path: Path, gpt_run: tuple[Path, dict]) -> None:
    src = gpt_run[0]
    overrides = ["model.preset=null", f"model.from={src / 'final'}", "model.overrides={}", "tokenizer.train=null",
                 "data.inputs=null", f"data.packed={src / 'data'}", "trainer.max_steps=1", "trainer.lr=1e-9",
                 "trainer.warmup_steps=0"]
    summary = pretrain(config(GPT, tmp_path, *overrides), progress=False)
    before, after = load_file(src / "final" / "model.safetensors"), load_file(tmp_path / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    for k in before:  # one step at lr 1e-9 moves the weights by ~1e-9 at most
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6)
    assert summary["eval"]["eval_loss"] == pytest.approx(gpt_run[1]["eval"]["eval_loss"], abs=1e-3)


def test_eval_inputs_are_held_out_files(tmp_path: Path, corpus: list[str]) -> None:
    overrides = [inputs_override(corpus), f"data.eval_inputs=[{corpus[1]}]", "trainer.max_steps=1",
                 "samples.max_new_tokens=2"]
    summary = pretrain(config(GPT, tmp_path, *overrides), progress=False)
    train = json.loads((tmp_path / "data" / "stats.json").read_text())
    held = json.loads((tmp_path / "data-eval" / "stats.json").read_text())
    assert train["files"] == 2 and held["files"] == 1 and list(held["packed"]["splits"]) == ["train"]
    assert summary["eval"]["eval_loss"] > 0


def test_cli_runs_the_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str], gpt_run: tuple[Path, dict]) -> None:
    args = ["pretrain", str(GPT), f"output_dir={tmp_path}", *FAST, "data.inputs=null",
            f"data.packed={gpt_run[0] / 'data'}", "tokenizer.train=null", "trainer.max_steps=2",
            "samples.max_new_tokens=4", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pre-training (clm) done: 2 steps" in printed and "--- sample 1 ---" in printed


# ------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.lrr=1"], "unknown key 'trainer.lrr'. Did you mean 'lr'?"),
    (["model.from=somewhere"], "exactly one of model.preset"),
    (["model.preset=gpt-huge"], "unknown preset 'gpt-huge'"),
    (["model.overrides.hidden=3"], "unknown model.overrides keys ['hidden']"),
    (["objective.name=gpt"], "unknown pre-training objective 'gpt'"),
    (["objective.masking.probability=1.5"], "masking probability must be in (0, 1)"),
    (["data.packed=x"], "exactly one of data.packed"),
    (["tokenizer.path=gpt2-bpe"], "tokenizer.path or tokenizer.train, not both"),
])
def test_config_errors_name_the_problem(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(BERT, tmp_path, *overrides)
    assert message in str(err.value)


def test_runtime_errors_are_explained(tmp_path: Path, corpus: list[str], gpt_run: tuple[Path, dict]) -> None:
    packed = f"data.packed={gpt_run[0] / 'data'}"
    # a byte-level BPE has no [MASK]: MLM cannot run on it
    with pytest.raises(ConfigError, match="needs a mask token"):
        pretrain(config(BERT, tmp_path / "a", "data.inputs=null", packed, "tokenizer.train=null"), progress=False)
    with pytest.raises(ConfigError, match="smaller than the tokenizer's vocabulary"):
        pretrain(config(GPT, tmp_path / "b", "data.inputs=null", packed, "tokenizer.train=null",
                        "model.overrides.vocab_size=100"), progress=False)
    # a rerun in the same folder must keep the data/model/objective/tokenizer settings (it resumes)
    with pytest.raises(ConfigError, match="different data settings"):
        pretrain(config(GPT, gpt_run[0], inputs_override(corpus), "data.seq_len=32"), progress=False)


# ---------------------------------------------------------------------------------------------- resume

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from lmcraft.config import load_config
    from lmcraft.stages.pretrain import config_class, pretrain
    from lmcraft.train import Callback

    class Kill(Callback):
        def on_step_end(self, trainer, metrics):
            if trainer.state.step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = load_config(config_class(), sys.argv[1], sys.argv[3:])
    pretrain(cfg, progress=False, callbacks=[Kill()] if int(sys.argv[2]) else [])
""")


def _stage_process(recipe: Path, kill_after: int, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(recipe), str(kill_after), *overrides], env=env,
                          capture_output=True, text=True, timeout=300)


def test_sigkilled_mlm_run_resumes_bit_for_bit(tmp_path: Path, bert_run: tuple[Path, dict]) -> None:
    """Dynamic masks come from the checkpointed RNG: the resumed run equals the uninterrupted one exactly."""
    common = [*FAST, "data.inputs=null", f"data.packed={bert_run[0] / 'data'}", "tokenizer.train=null",
              "trainer.max_steps=8", "trainer.eval_every=4", "trainer.save_every=3", "trainer.log_every=1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = _stage_process(BERT, 0, f"output_dir={full}", *common)
    assert done.returncode == 0, done.stderr[-2000:]
    first = _stage_process(BERT, 5, f"output_dir={killed}", *common)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert [p.name for p in killed.glob("step-*")] == ["step-3"] and not (killed / "final").exists()
    second = _stage_process(BERT, 0, f"output_dir={killed}", *common)
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = load_file(full / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _curve(full) == _curve(killed) and len(_curve(full)) == 8 + 2  # every step logged, evals at 4 and 8


def _curve(out: Path) -> list[tuple]:
    """The logged losses and accuracies (timings left out: they differ between runs)."""
    return [(r["split"], r["step"], r.get("loss"), r.get("eval_loss"), r.get("eval_masked_accuracy"))
            for r in _records(out)]


# ------------------------------------------------------------------------------------------ torchrun, HF


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="no torchrun")
def test_torchrun_ddp_matches_one_process(tmp_path: Path, gpt_run: tuple[Path, dict]) -> None:
    """clm has no randomness: 2 ranks x micro-batch 4 (DDP) give the losses of 1 process x micro-batch 8."""
    common = [*FAST, "data.inputs=null", f"data.packed={gpt_run[0] / 'data'}", "tokenizer.train=null",
              "trainer.max_steps=4", "trainer.log_every=1", "samples.max_new_tokens=2"]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "lmcraft", "pretrain", str(GPT),
                           f"output_dir={tmp_path / 'ddp'}", *common, "trainer.strategy=ddp",
                           "trainer.micro_batch_size=4", "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("pre-training (clm) done") == 1  # rank 0 reports
    one = _stage_process(GPT, 0, f"output_dir={tmp_path / 'one'}", *common, "trainer.micro_batch_size=8")
    assert one.returncode == 0, one.stderr[-2000:]
    ddp, single = _curve(tmp_path / "ddp"), _curve(tmp_path / "one")
    assert [r[:2] for r in ddp] == [r[:2] for r in single]
    torch.testing.assert_close([r[2] or r[3] for r in ddp], [r[2] or r[3] for r in single], rtol=1e-5, atol=1e-6)
    assert load_model(tmp_path / "ddp" / "final").head_kind == "lm"


@pytest.mark.parity
def test_final_folders_open_in_transformers(gpt_run: tuple[Path, dict], bert_run: tuple[Path, dict]) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    text = "The grey owl sings near the river."
    for (out, _), auto in ((gpt_run, AutoModelForCausalLM), (bert_run, AutoModelForMaskedLM)):
        ours, tok = load_model(out / "final"), load_tokenizer(out / "final")
        theirs = auto.from_pretrained(out / "final").eval()
        hf_tok = AutoTokenizer.from_pretrained(out / "final")
        ids = tok.encode(text, add_special_tokens=False)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
        batch = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(theirs(batch).logits, ours(batch).logits, rtol=1e-4, atol=1e-4)
