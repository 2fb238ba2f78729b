"""Output folders are lmcraft's or refused: markers, locks, --overwrite that removes only lmcraft's files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmcraft.io import clean_staging, remove_dir, replace_dir, staged_dir, write_json
from lmcraft.run_folder import MARKER, OutputFolderError, claim_output


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "model-old.safetensors").write_bytes(b"weights")
    (folder / ".tmp-important-notes.txt").write_text("notes")
    (folder / ".trash-photos").mkdir()
    (folder / ".trash-photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    return folder


def test_a_folder_of_user_files_is_refused_and_left_byte_identical(tmp_path: Path) -> None:
    folder = _user_folder(tmp_path)
    before = _snapshot(folder)
    for overwrite in (False, True):
        with pytest.raises(OutputFolderError, match="already holds files that lmcraft did not write"):
            with claim_output(folder, "pretrain", {"lr": 1}, overwrite=overwrite):
                pass
    assert _snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == [
        ".tmp-important-notes.txt", ".trash-photos", "final"]


def test_same_config_resumes_other_config_needs_overwrite_which_keeps_user_files(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with claim_output(folder, "pretrain", {"lr": 1}):
        (folder / "step-1").mkdir()
        (folder / "metrics.jsonl").write_text("{}\n")
    marker = json.loads((folder / MARKER).read_text())
    assert marker["status"] == "complete" and marker["written"] == ["metrics.jsonl", "step-1"]
    (folder / "my-notes.txt").write_text("added by the user later")

    with claim_output(folder, "pretrain", {"lr": 1}):  # same stage and config: resumes, nothing removed
        assert (folder / "step-1").is_dir()
    assert json.loads((folder / MARKER).read_text())["foreign"] == ["my-notes.txt"]

    for stage, config in (("pretrain", {"lr": 2}), ("finetune", {"lr": 1})):
        with pytest.raises(OutputFolderError, match="pass --overwrite"):
            with claim_output(folder, stage, config):
                pass
    with claim_output(folder, "pretrain", {"lr": 2}, overwrite=True):
        assert sorted(p.name for p in folder.iterdir() if p.name[0] != ".") == ["my-notes.txt"]
        (folder / "step-9").mkdir()
    assert (folder / "my-notes.txt").read_text() == "added by the user later"
    assert json.loads((folder / MARKER).read_text())["written"] == ["step-9"]


def test_a_killed_run_leaves_its_files_known_as_lmcraft_s(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with claim_output(folder, "sft", {"a": 1}):
        (folder / "keep.txt").write_text("written")
    (folder / "user.txt").write_text("user")
    with claim_output(folder, "sft", {"a": 1}):
        (folder / "step-4").mkdir()
        marker = json.loads((folder / MARKER).read_text())  # what a SIGKILL here would leave on disk
    write_json(folder / MARKER, marker)
    with claim_output(folder, "sft", {"a": 2}, overwrite=True):
        assert sorted(p.name for p in folder.iterdir() if p.name[0] != ".") == ["user.txt"]


def test_a_run_failing_before_it_writes_leaves_no_trace(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    with pytest.raises(ValueError):
        with claim_output(folder, "pretrain", {"data": "typo.txt"}):
            raise ValueError("input file not found")
    assert not folder.exists()
    with claim_output(folder, "pretrain", {"data": "right.txt"}):  # the corrected rerun is not refused
        (folder / "out").write_text("x")
    with pytest.raises(KeyError):
        with claim_output(folder, "pretrain", {"data": "right.txt"}):
            (folder / "more").write_text("y")
            raise KeyError("late failure")
    assert json.loads((folder / MARKER).read_text())["status"] == "failed"


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lmcraft.run_folder import claim_output\n"
         f"with claim_output({str(folder)!r}, 'pretrain', {{}}):\n    print('held', flush=True)\n    time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(OutputFolderError, match=rf"in use by pid {holder.pid} \(started"):
            with claim_output(folder, "pretrain", {}):
                pass
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()
    with claim_output(folder, "pretrain", {}):  # the lock of a dead process is free again
        pass


def test_kill_safe_folder_swaps_and_staging_cleanup(tmp_path: Path) -> None:
    with staged_dir(tmp_path / "best") as stage:
        (stage / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_dir(tmp_path / "best") as stage:
            (stage / "a").write_text("2")
            raise RuntimeError("killed while staging")
    assert (tmp_path / "best" / "a").read_text() == "1"
    # a kill between "old renamed away" and "new renamed in": cleanup puts the old one back
    (tmp_path / "best").rename(tmp_path / ".lmcraft-old-best")
    (tmp_path / ".lmcraft-tmp-best.1.x").mkdir()
    (tmp_path / ".lmcraft-trash-step-1.y").mkdir()
    (tmp_path / ".tmp-user").write_text("kept")
    handled = clean_staging(tmp_path)
    assert sorted(handled) == [".lmcraft-old-best", ".lmcraft-tmp-best.1.x", ".lmcraft-trash-step-1.y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-user", "best"]
    new = tmp_path / "new"
    new.mkdir()
    replace_dir(new, tmp_path / "best")
    remove_dir(tmp_path / "best")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-user"]
