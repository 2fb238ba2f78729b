"""`precision: auto`: the measured choice, its per-machine cache, and a resume keeping the resolved precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmcraft import precision
from lmcraft.objectives.base import LossOutput
from lmcraft.train.config import TrainerConfig
from lmcraft.train.trainer import Trainer


@pytest.fixture(autouse=True)
def measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests exercise the measurement, which conftest's fixed choice would bypass."""
    monkeypatch.delenv("LMCRAFT_AUTO_PRECISION", raising=False)


def test_environment_fixes_the_auto_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCRAFT_AUTO_PRECISION", "bf16")
    monkeypatch.setattr(precision, "measure_cpu_matmul", lambda: pytest.fail("measured despite the override"))
    choice = precision.resolve_precision("auto", torch.device("cpu"))
    assert (choice.precision, choice.reason) == ("bf16", "LMCRAFT_AUTO_PRECISION")


def _fake(times: dict[str, float], calls: list[int]):
    def measure() -> dict[str, float]:
        calls.append(1)
        return dict(times)
    return measure


@pytest.mark.parametrize(("times", "want"), [({"fp32": 1.0, "bf16": 2.0}, "fp32"),
                                             ({"fp32": 1.0, "bf16": 0.5}, "bf16"),
                                             ({"fp32": 1.0, "bf16": 0.95}, "fp32")])  # within the margin
def test_auto_follows_measurement_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             times: dict[str, float], want: str) -> None:
    calls: list[int] = []
    monkeypatch.setattr(precision, "measure_cpu_matmul", _fake(times, calls))
    first = precision.resolve_precision("auto", torch.device("cpu"), tmp_path)
    assert first.precision == want and "fp32 1000.00 ms" in first.reason
    again = precision.resolve_precision("auto", torch.device("cpu"), tmp_path)
    assert again.precision == want and "cached" in again.reason
    assert len(calls) == 1  # the second call read the cache
    assert list((tmp_path / "precision").glob("*.json")) == [tmp_path / "precision" / f"{precision.cpu_key()}.json"]
    assert precision.resolve_precision("fp32", torch.device("cpu"), tmp_path).precision == "fp32"


def test_decode_workload_measures_the_matrix_vector_product(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(precision, "measure_cpu_matmul", lambda: pytest.fail("decode measured the training matmul"))
    monkeypatch.setattr(precision, "measure_cpu_matvec", _fake({"fp32": 2.0, "bf16": 1.0}, calls))
    dtype, choice = precision.weights_dtype("auto", torch.device("cpu"), cache_dir=tmp_path)
    assert dtype == torch.bfloat16 and "matrix-vector" in choice.reason
    assert precision.weights_dtype("auto", torch.device("cpu"), cache_dir=tmp_path)[0] == torch.bfloat16
    assert len(calls) == 1
    assert (tmp_path / "precision" / f"{precision.cpu_key()}-decode.json").is_file()
    assert precision.weights_dtype("fp32", torch.device("cpu"), cache_dir=tmp_path)[0] == torch.float32
    with pytest.raises(ValueError, match="workload"):
        precision.resolve_precision("auto", torch.device("cpu"), tmp_path, workload="serve")


def test_real_measurement_is_sane() -> None:
    times = precision.measure_cpu_matmul()
    assert set(times) == {"fp32", "bf16"} and all(0 < t < 1 for t in times.values())


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    logits = model(batch["input_ids"])
    return LossOutput(F.cross_entropy(logits.float().reshape(-1, 16), batch["labels"].reshape(-1), reduction="sum"),
                      batch["labels"].numel())


def test_resume_keeps_resolved_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCRAFT_CACHE", str(tmp_path / "cache"))
    data = [{"input_ids": torch.randint(0, 16, (6,)), "labels": torch.randint(0, 16, (6,))} for _ in range(8)]

    def trainer(steps: int) -> Trainer:
        cfg = TrainerConfig(max_steps=steps, micro_batch_size=2, save_every=2, progress=False, tensorboard=False,
                            plot=False, device="cpu")
        assert cfg.precision == "auto"
        return Trainer(Tiny(), _loss, data, None, cfg, tmp_path / "run")

    calls: list[int] = []
    monkeypatch.setattr(precision, "measure_cpu_matmul", _fake({"fp32": 1.0, "bf16": 0.1}, calls))
    first = trainer(2)
    first.train()
    assert first.state.precision == "bf16"
    # the machine now measures fp32 as faster (and its cache is gone): the resumed run still trains in bf16
    for f in (tmp_path / "cache" / "precision").iterdir():
        f.unlink()
    monkeypatch.setattr(precision, "measure_cpu_matmul", _fake({"fp32": 1.0, "bf16": 9.0}, calls))
    second = trainer(4)
    second.train()
    assert second.state.step == 4 and second.state.precision == "bf16" and len(calls) == 1
    fresh = trainer(4)
    assert fresh.precision == "fp32"  # a new run measures again
