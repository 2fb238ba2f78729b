"""CLI and config validation: errors name the key, no traceback, fast --help."""

from __future__ import annotations

import subprocess
import sys
from typing import Literal

import pytest

from lmcraft.cli import main
from lmcraft.config import ExistingFile, Section, StageConfig, load_config, parse_overrides
from lmcraft.errors import ConfigError


class Trainer(Section):
    lr: float = 1e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"


class Demo(StageConfig):
    data: ExistingFile | None = None
    trainer: Trainer = Trainer()


def test_overrides_are_yaml_typed() -> None:
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=x"]) == {"a.b": 3, "c": [1, 2], "d": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["oops"])


def test_typo_names_key_and_suggests(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Demo, cfg)
    msg = str(err.value)
    assert "trainer.lrr" in msg and "Did you mean 'lr'" in msg and "schedule" in msg


def test_bad_value_lists_allowed(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Demo, None, ["trainer.schedule=cosin"])
    assert "trainer.schedule" in str(err.value) and "'cosine'" in str(err.value)


def test_missing_file_rejected(tmp_path) -> None:
    with pytest.raises(ConfigError, match="data.*does not exist"):
        load_config(Demo, None, [f"data={tmp_path / 'nope.txt'}"])


def test_bad_yaml_reports_line(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(Demo, cfg)


def test_help_lists_stages(capsys) -> None:
    assert main([]) == 0
    assert "generate" in capsys.readouterr().out


def test_help_imports_no_torch() -> None:
    """`lmcraft --help` stays fast because no stage (and so no torch) is imported for it."""
    code = "import sys; from lmcraft.cli import main; main(['--help'])"
    code = f"try:\n    {code}\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_stage_help_lists_config_keys(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    out = capsys.readouterr().out
    assert "config keys:" in out and "run_dir: Path = runs/pipeline" in out and "stages: list of" in out


def test_overrides_may_follow_flags(tmp_path, capsys) -> None:
    recipe = tmp_path / "p.yaml"
    recipe.write_text("run_dir: somewhere\nstages:\n  - {name: a, stage: eval, config: {model: {path: m},"
                      " tasks: [{task: spam}]}}\n")
    assert main(["pipeline", str(recipe), "--dry-run", f"run_dir={tmp_path / 'elsewhere'}"]) == 0
    assert str(tmp_path / "elsewhere") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pipeline", str(recipe), "--dry-run", "--no-such-flag"])
