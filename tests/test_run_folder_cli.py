"""Run folders through the real CLI: one writer per folder, and resume past a corrupt newest checkpoint.

The stage runs in child processes (a tiny GPT pre-training on a generated corpus, one thread), driven by a
small script that can hold a run after a step or kill it while a checkpoint is being written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmcraft.cli import main

pytestmark = pytest.mark.slow  # three tiny pre-training runs in child processes
ROOT = Path(__file__).resolve().parents[1]
DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from lmcraft.train import checkpoint, trainer

    hold_at, go = int(os.environ.get("HOLD_AT", 0)), os.environ.get("GO_FILE", "")
    kill_saving = os.environ.get("KILL_WHILE_SAVING", "")
    step = trainer.Trainer._optimizer_step

    def held_step(self):
        out = step(self)
        if self.state.step == hold_at:
            print("holding", flush=True)
            while not Path(go).exists():
                time.sleep(0.05)
        return out

    save = checkpoint.save_model_files

    def killing_save(directory, *args, **kwargs):
        save(directory, *args, **kwargs)
        if directory.name == kill_saving:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.Trainer._optimizer_step = held_step
    checkpoint.save_model_files = killing_save
    from lmcraft.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    words = "the cat sat on the mat and the dog ran to the barn while birds sang".split()
    path.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(80)))
    return path


def _argv(out: Path, corpus: Path) -> list[str]:
    return ["pretrain", str(ROOT / "recipes" / "pretrain-gpt-tiny.yaml"), f"output_dir={out}",
            f"data.inputs=[{corpus}]", "tokenizer.train.vocab_size=300", "trainer.max_steps=8",
            "trainer.save_every=2", "trainer.keep_last=3", "trainer.eval_every=4", "samples.max_new_tokens=2",
            "--no-progress"]


def _start(argv: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, *argv], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def lone_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("lone") / "run"
    proc = _start(_argv(out, corpus))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    return out


def test_a_second_start_on_a_busy_folder_fails_at_once(tmp_path: Path, corpus: Path, lone_run: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out, go = tmp_path / "run", tmp_path / "go"
    first = _start(_argv(out, corpus), HOLD_AT="2", GO_FILE=str(go))
    try:
        assert first.stdout.readline().strip() == "holding"
        start = time.monotonic()
        assert main(_argv(out, corpus)) == 2
        assert time.monotonic() - start < 10
        assert f"is in use by pid {first.pid}" in " ".join(capsys.readouterr().err.split())
    finally:
        go.write_text("go")
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    a, b = _final(lone_run), _final(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_while_saving_then_newest_corrupted_resumes_from_the_previous(tmp_path: Path, corpus: Path,
                                                                             lone_run: Path) -> None:
    out = tmp_path / "run"
    killed = _start(_argv(out, corpus), KILL_WHILE_SAVING=".lmcraft-tmp-step-6")
    assert killed.wait(timeout=600) == -signal.SIGKILL, killed.stderr.read()[-2000:]
    assert sorted(p.name for p in out.glob("step-*")) == ["step-2", "step-4"]
    weights = out / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the newest one broke on disk
    rerun = _start(_argv(out, corpus))
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()[-2000:]
    assert "step-4 cannot be read" in rerun.stderr.read()
    a, b = _final(lone_run), _final(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.glob(".lmcraft-tmp-*"))
