"""Config modules load without torch, so `--help` and config validation stay fast."""

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def test_config_modules_do_not_import_torch() -> None:
    code = (
        "import sys, lmcraft.config, lmcraft.train.config, lmcraft.finetune.config, lmcraft.scaling.config\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_train_package_still_exports_the_trainer() -> None:
    import lmcraft.train as train

    assert train.Trainer.__name__ == "Trainer"
    assert train.TrainerConfig is train.config.TrainerConfig
