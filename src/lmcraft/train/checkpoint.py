"""Checkpoint files: atomic directories, model weights, RNG states, keep-last-K rotation.

Layout of `output_dir`:
  step-N/model.safetensors        all weights (or the file named by `WeightsFormat`, e.g.
                                   adapter_model.safetensors with only trainable tensors)
  step-N/config.json              the model's config (`.config.to_hf()`, `.to_dict()`, a dataclass or
                                   a pydantic model), when it has one
  step-N/tokenizer.json ...       copied from the tokenizer folder, when given
  step-N/trainer_state/           state.json (step, data position, early stopping, history),
                                   optimizer.pt, scheduler.pt, rng_rank{R}.pt
  best/                           weights + config + tokenizer of the best evaluation so far
  latest                          text file naming the newest step-N folder
A checkpoint is written into a `.lmcraft-tmp-step-N.*` folder and renamed to `step-N/` only once
complete (`os.replace` is atomic), then `latest` is rewritten atomically, and rotation renames an old
`step-N` away before deleting it (`lmcraft.io.remove_dir`), so a process killed at any moment leaves
every `step-*` folder complete. Resuming picks the highest `step-N` that loads. Loading uses safetensors
and `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmcraft import io
from lmcraft.errors import LmcraftError
from lmcraft.hooks import WeightsFormat

__all__ = [
    "WeightsFormat",
    "TOKENIZER_FILES",
    "save_model_files",
    "load_weights",
    "model_config_dict",
    "capture_rng_state",
    "restore_rng_state",
    "save_torch",
    "load_torch",
    "step_dirs",
    "latest_checkpoint",
    "prune_checkpoints",
    "remove_stale",
    "tensors_in",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_STEP_RE = re.compile(r"^step-(\d+)$")



def model_config_dict(model: nn.Module) -> dict[str, Any] | None:
    """The model's `.config` as a JSON-able dict (HF layout when it offers `to_hf()`), else None."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    for method in ("to_hf", "to_dict", "model_dump"):
        if callable(getattr(cfg, method, None)):
            return getattr(cfg, method)()
    if hasattr(cfg, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(cfg)
    return dict(cfg) if isinstance(cfg, dict) else None


def _for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors; tensors sharing storage (tied weights) are cloned."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[k] = t.clone() if key in seen else t
        seen.add(key)
    return out


def save_model_files(
    directory: Path,
    model: nn.Module,
    state: dict[str, torch.Tensor],
    fmt: WeightsFormat,
    tokenizer_dir: Path | None = None,
) -> None:
    """Write weights (per `fmt`), config.json and the tokenizer files into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_for_safetensors(fmt.select(model, state)), str(directory / fmt.filename), metadata={"format": "pt"})
    cfg = model_config_dict(model)
    if cfg is not None:
        io.write_json(directory / "config.json", cfg, sort_keys=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, directory / name)
    fmt.write_extra(model, directory)


def tensors_in(tree: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) dict/list/tuple, in order (a state dict, a batch)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from tensors_in(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from tensors_in(value)


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what writing it to disk takes, about."""
    return sum(t.numel() * t.element_size() for t in tensors_in(state))


def load_weights(directory: Path, fmt: WeightsFormat) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / fmt.filename))


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states as tensors and plain values."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(obj: Any, path: Path) -> None:
    with io.atomic_file(path) as fh:
        torch.save(obj, fh)


def load_torch(path: Path) -> Any:
    """Tensors and plain values only (`weights_only=True`); a file holding other Python objects is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LmcraftError(f"{path}: holds Python objects besides tensors, which loading could run as code; "
                           "lmcraft loads tensors and plain values only") from None


def step_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints `(step, path)`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = step_dirs(output_dir)
    return dirs[-1][1] if dirs else None


def prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints; each older one is renamed away before it is deleted."""
    for _, path in step_dirs(output_dir)[:-keep_last]:
        io.remove_dir(path)


def remove_stale(output_dir: Path) -> None:
    """Finish what a killed run left: half-written `.lmcraft-tmp-*` folders and half-deleted old checkpoints
    go, a swapped-out `best/` whose replacement never arrived comes back (see `lmcraft.io.clean_staging`).
    Other names, `.tmp-*` included, are the user's and stay."""
    io.clean_staging(output_dir)
