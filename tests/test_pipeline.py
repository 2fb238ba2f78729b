"""Pipeline engine: references, skipping complete stages, rerun after a failure, report, dry run.

Most tests replace the child process by an in-process fake stage; the last one runs a real child process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcraft.config import validate_config
from lmcraft.errors import ConfigError, LmcraftError
from lmcraft.pipeline import DONE_FILE, Pipeline, PipelineConfig, stage_config


def _cfg(tmp_path: Path, stages: list[dict]) -> PipelineConfig:
    return validate_config(PipelineConfig, {"run_dir": str(tmp_path / "run"), "stages": stages})


def test_references_and_output_dir(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [
        {"name": "a", "stage": "tokenizer", "config": {}},
        {"name": "b", "stage": "pretrain", "config": {"tokenizer": "${a}/tok", "data": {"x": ["${run_dir}/d"]}}},
    ])
    pipe = Pipeline(cfg)
    conf = stage_config(cfg.stages[1], pipe.folders["b"], pipe.folders)
    assert conf["tokenizer"] == str(tmp_path / "run" / "a" / "tok")
    assert conf["data"]["x"] == [str(tmp_path / "run" / "d")]
    assert conf["output_dir"] == str(tmp_path / "run" / "b")


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown stage 'pretrian'"):
        _cfg(tmp_path, [{"name": "a", "stage": "pretrian"}])
    with pytest.raises(ConfigError, match="not an earlier stage"):
        _cfg(tmp_path, [{"name": "a", "stage": "tokenizer", "config": {"x": "${b}"}}, {"name": "b", "stage": "eval"}])
    with pytest.raises(ConfigError, match="unique"):
        _cfg(tmp_path, [{"name": "a", "stage": "eval"}, {"name": "a", "stage": "eval"}])


class FakeStages(Pipeline):
    """Runs stages in-process by writing a marker file (or failing on demand), recording the calls."""

    def __init__(self, cfg: PipelineConfig, fail: set[str] | None = None, check: bool = False) -> None:
        super().__init__(cfg)
        self.calls: list[str] = []
        self.fail = fail or set()
        self.checked = check

    def check(self) -> None:
        if self.checked:
            super().check()

    def _run_stage(self, spec, folder, config, stream):  # noqa: ANN001, ANN202
        self.calls.append(spec.name)
        if spec.name in self.fail:
            raise LmcraftError(f"stage {spec.name!r} failed")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps({"metrics": {"value": len(self.calls)},
                                                        "samples": [{"prompt": "p", "after": "a"}]}))
        return 0.5


def test_rerun_skips_complete_stages_and_resumes_the_failed_one(tmp_path: Path) -> None:
    stages = [{"name": n, "stage": "eval", "config": {"k": n}} for n in ("one", "two", "three")]
    cfg = _cfg(tmp_path, stages)
    first = FakeStages(cfg, fail={"two"})
    with pytest.raises(LmcraftError):
        first.run()
    assert first.calls == ["one", "two"]
    assert (tmp_path / "run" / "one" / DONE_FILE).exists() and not (tmp_path / "run" / "two" / DONE_FILE).exists()
    second = FakeStages(cfg)
    html = second.run()
    assert second.calls == ["two", "three"]
    assert [row["status"] for row in second.plan()] == ["done", "done", "done"]
    text = html.read_text()
    assert "three (eval)" in text and "<table" in text
    # a changed config makes that stage (only) pending again
    cfg.stages[2].config["k"] = "changed"
    third = FakeStages(cfg)
    third.run()
    assert third.calls == ["three"]


def test_dry_run_shows_estimates(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [{"name": "a", "stage": "eval", "estimate_minutes": 2.5}, {"name": "b", "stage": "eval"}])
    text = Pipeline(cfg).describe()
    assert "2.5" in text and "pending" in text and "no estimate" in text


def test_real_subprocess_stage_and_failure_message(tmp_path: Path) -> None:
    """A real stage runs in a child process; when it fails, the error names its log, which holds the reason."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"line {i} of a tiny corpus with some words" for i in range(200)))
    cfg = _cfg(tmp_path, [
        {"name": "tok", "stage": "tokenizer", "output_key": "output",
         "config": {"inputs": [{"path": str(corpus), "text_mode": "paragraph"}], "vocab_size": 300,
                        "held_out_fraction": 0.1}},
        {"name": "bad", "stage": "tokenizer", "output_key": "output",
         "config": {"inputs": [{"path": "${tok}/no-such-file.txt"}], "vocab_size": 300}},
    ])
    with pytest.raises(LmcraftError, match="log.txt"):
        Pipeline(cfg).run()
    assert (tmp_path / "run" / "tok" / "tokenizer.json").exists()
    assert "no-such-file.txt" in (tmp_path / "run" / "bad" / "log.txt").read_text()
    done = json.loads((tmp_path / "run" / "tok" / DONE_FILE).read_text())
    assert 0 < done["cpu_seconds"]  # the child's user + system time, recorded beside its wall time


def test_stage_configs_are_checked_before_any_work(tmp_path: Path) -> None:
    """A typo in the last stage fails at once; a path that an earlier stage will write is accepted."""
    stages = [
        {"name": "ok", "stage": "tokenizer", "output_key": "output",
         "config": {"inputs": [{"path": str(tmp_path)}], "vocab_size": 300}},
        {"name": "typo", "stage": "tokenizer", "output_key": "output",
         "config": {"inputs": [{"path": "${ok}/corpus.txt"}], "vocab_sise": 300}},
    ]
    pipe = FakeStages(_cfg(tmp_path, stages), check=True)
    with pytest.raises(ConfigError, match="vocab_sise"):
        pipe.run()
    assert pipe.calls == []
    stages[1]["config"]["vocab_size"] = stages[1]["config"].pop("vocab_sise")
    FakeStages(_cfg(tmp_path, stages), check=True).check()


def test_report_reads_stage_summaries(tmp_path: Path) -> None:
    """Scalars (also one level down), parallel-list samples from samples.json, and PNGs reach the report."""
    from lmcraft.pipeline import _metric_rows, _sample_rows, read_summary

    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"eval": {"eval_loss": 1.5}, "steps": 3, "long": "x" * 99}))
    (folder / "results.json").write_text(json.dumps({"metric_value": 0.9}))
    (folder / "samples.json").write_text(json.dumps({"prompts": ["p1", "p2"], "before": ["b1", "b2"],
                                                     "after": ["a1", "a2"]}))
    summary = read_summary(folder)
    assert _metric_rows(summary) == [["metric_value", 0.9], ["eval.eval_loss", 1.5], ["steps", 3]]
    assert _sample_rows(summary["samples"]) == (["prompt", "before", "after"], [["p1", "b1", "a1"], ["p2", "b2", "a2"]])


def test_headlines_before_after_with_intervals(tmp_path: Path) -> None:
    """The report's headline table reads each stage's files: losses before -> after, GRPO's paired accuracy change,
    DPO's and eval's rates with Wilson intervals (checked against scipy), and only significant strategy pairs."""
    from scipy.stats import binomtest

    from lmcraft.headlines import headline_rows

    sft = {"start_eval_loss": 1.55, "eval_loss": 1.51}
    assert headline_rows("sft", sft, tmp_path) == [["held-out answer loss", 1.55, 1.51, ""]]
    grpo = {"accuracy_before": 0.2, "accuracy_after": 0.5, "held_out": 100, "accuracy_before_ci_low": 0.1,
            "accuracy_before_ci_high": 0.3, "accuracy_after_ci_low": 0.4, "accuracy_after_ci_high": 0.6,
            "right_before_only": 3, "right_after_only": 33, "mcnemar_p": 1e-7}
    [row] = headline_rows("grpo", grpo, tmp_path)
    assert row[:3] == ["held-out accuracy (100 problems)", 0.2, 0.5] and "3 / 33, McNemar p = 1e-07" in row[3]
    ci = binomtest(10, 16).proportion_ci(0.95, method="wilson")
    [_, reward] = headline_rows("dpo", {"start_eval_loss": 0.693, "eval_loss": 0.68, "eval_reward_accuracy": 0.625,
                                        "eval_count": 16}, tmp_path)
    assert reward[1:] == ["ties", 0.625, f"10/16, [{ci.low:.3f}, {ci.high:.3f}]"]
    results = {"results": [{"task": "t", "strategies": [
        {"strategy": "a", "metrics": {"n": 48.0, "accuracy": 0.5, "accuracy_ci_low": 0.36, "accuracy_ci_high": 0.64}}],
        "comparisons": [{"a": "a", "b": "b", "only_a": 1, "only_b": 9, "p_value": 0.02, "significant": True},
                        {"a": "a", "b": "c", "only_a": 4, "only_b": 5, "p_value": 1.0, "significant": False}]}]}
    rows = headline_rows("eval", results, tmp_path)
    assert rows == [["t: a accuracy", "", 0.5, "24/48, [0.360, 0.640]"],
                    ["t: a vs b", "", "", "right only A / only B 1 / 9, McNemar p = 0.02"]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps({"split": "train", "step": s, "loss": v})
                                                      for s, v in ((10, 8.0), (20, 6.0), (30, 5.0))))
    assert headline_rows("pretrain", {}, tmp_path) == [["train loss (step 10 -> 30)", 8.0, 5.0, ""]]
    assert headline_rows("dpo", {"eval_loss": "not a number layout"}, tmp_path) == []
