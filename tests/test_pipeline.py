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

    def __init__(self, cfg: PipelineConfig, fail: set[str] | None = None) -> None:
        super().__init__(cfg)
        self.calls: list[str] = []
        self.fail = fail or set()

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
    """A child process runs a real stage; a failing stage names its log."""
    cfg = _cfg(tmp_path, [{"name": "bad", "stage": "eval", "config": {"no_such_key": 1}}])
    with pytest.raises(LmcraftError, match="log.txt"):
        Pipeline(cfg).run()
    log = (tmp_path / "run" / "bad" / "log.txt").read_text()
    assert "no_such_key" in log
