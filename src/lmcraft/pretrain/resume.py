"""A pre-training folder is one run: rerunning a config in it resumes that run, so only trainer settings may
change. The data, tokenizer, model and objective sections are recorded in OUT/pretrain_config.json and compared."""

from __future__ import annotations

from pathlib import Path

from lmcraft.errors import ConfigError
from lmcraft.io import read_json, write_json
from lmcraft.pretrain.config import PretrainConfig

__all__ = ["RUN_CONFIG", "check_run_folder"]

RUN_CONFIG = "pretrain_config.json"
_FIXED = ("model", "objective", "data", "tokenizer")  # sections a rerun (resume) must keep


def check_run_folder(cfg: PretrainConfig, out: Path) -> None:
    """Record the config's fixed sections in `out`; raise `ConfigError` when `out` holds a run with other ones."""
    dumped = cfg.model_dump(mode="json", by_alias=True)
    sections = {k: dumped[k] for k in _FIXED}
    path = out / RUN_CONFIG
    if path.is_file():
        before = read_json(path)
        changed = sorted(k for k in sections if before.get(k) != sections[k])
        if changed:
            raise ConfigError(f"{out} holds a pre-training run with different {', '.join(changed)} settings (see "
                              f"{path}); a rerun resumes that run, so only trainer settings may change. Choose "
                              "another output_dir to start a new run.")
    write_json(path, sections)
