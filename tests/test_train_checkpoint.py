"""Checkpoint files: weights formats, tied tensors, RNG round trip, atomic folders and rotation."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmcraft.io import replace_dir, write_json
from lmcraft.train import checkpoint as ckpt


@dataclass
class Cfg:
    hidden: int = 4


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = Cfg()
        self.emb = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight
        self.adapter = nn.Linear(4, 4)
        self.emb.requires_grad_(False)


def test_full_and_trainable_weights(tmp_path: Path) -> None:
    model = Tied()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    ckpt.save_model_files(tmp_path / "full", model, model.state_dict(), ckpt.WeightsFormat(), tok)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["config.json", "model.safetensors",
                                                                      "tokenizer.json"]
    assert (tmp_path / "full" / "config.json").read_text().count('"hidden": 4') == 1
    loaded = ckpt.load_weights(tmp_path / "full", ckpt.WeightsFormat())
    assert torch.equal(loaded["head.weight"], model.emb.weight)  # tied tensors are both stored
    other = Tied()
    other.load_state_dict(loaded)
    assert torch.equal(other.emb.weight, model.emb.weight)

    adapter = ckpt.WeightsFormat("adapter_model.safetensors", trainable_only=True)
    ckpt.save_model_files(tmp_path / "ad", model, model.state_dict(), adapter)
    assert sorted(ckpt.load_weights(tmp_path / "ad", adapter)) == ["adapter.bias", "adapter.weight"]
    assert not adapter.strict


def test_model_config_dict_variants() -> None:
    class HF:
        def to_hf(self) -> dict:
            return {"model_type": "llama"}

    holder = nn.Module()
    assert ckpt.model_config_dict(holder) is None
    holder.config = HF()
    assert ckpt.model_config_dict(holder) == {"model_type": "llama"}
    holder.config = Cfg(7)
    assert ckpt.model_config_dict(holder) == {"hidden": 7}


def test_rng_round_trip(tmp_path: Path) -> None:
    ckpt.save_torch(ckpt.capture_rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng_state(ckpt.load_torch(tmp_path / "rng.pt"))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_folders_rotation_and_stale_cleanup(tmp_path: Path) -> None:
    for step in (3, 10, 6):
        (tmp_path / f"step-{step}").mkdir()
    (tmp_path / ".lmcraft-tmp-step-12").mkdir()
    (tmp_path / ".lmcraft-trash-step-1.1234").mkdir()  # a rotation killed while deleting
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-10"
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in ckpt.step_dirs(tmp_path)] == [6, 10]

    # a run killed while swapping best/: the previous best waits in .lmcraft-old-best and comes back
    (tmp_path / ".lmcraft-old-best").mkdir()
    (tmp_path / ".lmcraft-old-best" / "x").write_text("old")
    # names that merely look temporary are the user's: never touched
    (tmp_path / ".tmp-notes.txt").write_text("mine")
    (tmp_path / ".trash-photos").mkdir()
    ckpt.remove_stale(tmp_path)
    assert not (tmp_path / ".lmcraft-tmp-step-12").exists() and (tmp_path / "best" / "x").read_text() == "old"
    assert (tmp_path / ".tmp-notes.txt").read_text() == "mine" and (tmp_path / ".trash-photos").is_dir()
    (tmp_path / ".tmp-notes.txt").unlink()
    (tmp_path / ".trash-photos").rmdir()

    new = tmp_path / ".lmcraft-tmp-best"
    new.mkdir()
    (new / "x").write_text("new")
    replace_dir(new, tmp_path / "best")
    assert (tmp_path / "best" / "x").read_text() == "new" and not new.exists()
    assert not (tmp_path / ".lmcraft-old-best").exists()

    write_json(tmp_path / "latest.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "latest.json", "step-10", "step-6"]
