"""Real processes: a run SIGKILLed mid-training (and mid-checkpoint) resumes bit for bit; torchrun with
2 CPU ranks (gloo) under DDP and FSDP2 matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("dist_train_script.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=120)


def _weights(run: Path, step: int = 10) -> dict[str, torch.Tensor]:
    return load_file(run / f"step-{step}" / "model.safetensors")


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] if r["split"] == "train" else r["eval_loss"] for r in records]


def test_sigkill_then_resume_is_bit_exact(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _run(full).returncode == 0
    # killed after step 5 (last checkpoint: step-3), then while writing step-9 (last: step-6)
    first = _run(killed, "--kill-after-step", 5)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert [p.name for p in sorted(killed.glob("step-*"))] == ["step-3"]
    second = _run(killed, "--kill-while-saving", 9)
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert (killed / ".lmcraft-tmp-step-9" / "model.safetensors").exists()
    assert (killed / "latest").read_text() == "step-6\n"
    assert _run(killed).returncode == 0
    assert not list(killed.glob(".lmcraft-tmp-*"))
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(full) == _losses(killed) and len(_losses(full)) == 10 + 3  # 10 train + evals at 4, 8, 10


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, micro-batch 4 (= 2 ranks x 2), no dropout."""
    out = tmp_path_factory.mktemp("one")
    assert _run(out, "--dropout", 0, "--micro-batch", 4).returncode == 0
    return out


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path: Path, one_process_run: Path, strategy: str) -> None:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    one = one_process_run
    two = tmp_path / strategy
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", SCRIPT, two, "--dropout", "0",
                           "--micro-batch", "2", "--strategy", strategy], env=ENV, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (two / "step-10" / "trainer_state").glob("rng_rank*.pt")) == [
        "rng_rank0.pt", "rng_rank1.pt"]
    torch.testing.assert_close(_losses(two), _losses(one), rtol=1e-5, atol=1e-6)
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
