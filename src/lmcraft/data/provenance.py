"""A model folder's record of its training data (`lmcraft_training_data.json`), written by pre-training.

    {"train": [PACKED_FOLDER, "train"], "licences": {...}, "decontamination": [...]}

`licences` and `decontamination` are copied from the packed index of `lmcraft prepare`, so the model folder keeps
them when the data moves; `lmcraft eval` reads them to warn about evaluation tasks that overlap the training data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmcraft.io import read_json, write_json

__all__ = ["PROVENANCE_FILE", "read_provenance", "write_provenance"]

PROVENANCE_FILE = "lmcraft_training_data.json"


def write_provenance(model_dir: Path, packed: Path, split: str) -> Path:
    """Record the packed training data (`packed/index.json`'s licences and decontamination) in `model_dir`."""
    index = read_json(Path(packed) / "index.json", "packed index")
    record: dict[str, Any] = {"train": [str(Path(packed).resolve()), split]}
    record.update({k: index[k] for k in ("licences", "decontamination") if k in index})
    path = Path(model_dir) / PROVENANCE_FILE
    write_json(path, record)
    return path


def read_provenance(model_dir: Path) -> dict[str, Any] | None:
    """The training-data record of a model folder, or None when it has none (a model from elsewhere)."""
    path = Path(model_dir) / PROVENANCE_FILE
    return read_json(path, "training-data record") if path.is_file() else None
