"""Output folders are lmcraft's or refused: a marker file, one writer at a time, and a safe `--overwrite`.

Every stage that writes a folder claims it first with `claim_output(folder, stage, config, overwrite)`:

- a folder that does not exist, or is empty, is created and marked;
- a folder that holds files but no marker is refused (it is the user's: nothing in it is touched);
- a folder whose marker names another stage or another config hash is refused, unless `overwrite`, which
  then deletes only the entries the marker lists as written by lmcraft;
- a folder marked by the same stage and config is taken as it is (the stage resumes);
- while the claim is held, an advisory lock (`flock`, released by the kernel when the holder dies) keeps any
  second writer out; it fails at once naming the holder's pid and start time.

The marker `.lmcraft-run.json` records the stage, the config hash, the run's status and two lists of top-level
entries: `written` (lmcraft's) and `foreign` (what a user had added to the folder when the run started). A run
killed before it could update `written` is recognised by its "running" status: then everything but `foreign` is
lmcraft's. So what a user adds to the folder is never listed as written, and never removed. A run that fails
before writing anything leaves no marker (and removes the folder it created), so a corrected rerun is not
refused as "another config".
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcraft.errors import LmcraftError
from lmcraft.io import clean_staging, listing, read_json, write_json

__all__ = ["MARKER", "LOCK", "OutputFolderError", "RunFolder", "claim_output", "claim_output_file", "config_hash",
           "folder_lock", "prepare_stage_folder", "read_marker"]

MARKER = ".lmcraft-run.json"
LOCK = ".lmcraft.lock"
_OURS = {MARKER, LOCK}


class OutputFolderError(LmcraftError):
    """An output folder that lmcraft may not write into (the user's files, another run, a running writer)."""


_NOT_HASHED = frozenset({"progress"})  # keys that change how a run looks, not what it computes
_RESUMABLE = frozenset({"trainer"})  # top-level sections a run may change when it resumes


def _hashed(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _hashed(v) for k, v in value.items() if k not in _NOT_HASHED}
    if isinstance(value, list | tuple):
        return [_hashed(v) for v in value]
    return value


def config_hash(stage: str, config: Any, output_key: str | None = None) -> str:
    """Hash of a stage name and its config (a pydantic model or a plain mapping), stable across runs. The
    output folder's own key (`output_key`), display-only keys (`progress`) and the `trainer` section do not
    count: the same run moved to another folder, rerun with --no-progress, or resumed with other trainer
    settings (more steps, another learning rate: the trainer's checkpoints allow it) is still the same run."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    config = {k: v for k, v in config.items() if k != output_key and k not in _RESUMABLE}
    blob = json.dumps({"stage": stage, "config": _hashed(config)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class RunFolder:
    """A claimed output folder; `entries()` is what lmcraft wrote there (all but `foreign` and its own files)."""

    path: Path
    stage: str
    config_hash: str
    foreign: frozenset[str]  # entries a user added to the folder before this run started

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name not in _OURS and p.name not in self.foreign)

    def write_marker(self, status: str) -> None:
        write_json(
            self.path / MARKER,
            {"stage": self.stage, "config_hash": self.config_hash, "status": status, "written": self.entries(),
             "foreign": sorted(self.foreign), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        )


def prepare_stage_folder(folder: Path, stage: str, config: Any, output_key: str | None) -> list[str]:
    """Create and mark the folder of a stage that a pipeline or sweep runs as a child process (its config and
    log go there first): the child's claim then takes the folder as its own run's, and those files as foreign.
    Returns the child's extra flags: `["--overwrite"]` when the folder holds a run of another config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digest = config_hash(stage, config, output_key)
    marker = read_marker(folder)
    if marker is None:
        RunFolder(folder, stage, digest, frozenset(p.name for p in folder.iterdir())).write_marker("pending")
        return []
    return ["--overwrite"] if (marker["stage"], marker["config_hash"]) != (stage, digest) else []


def read_marker(folder: Path, name: str = MARKER) -> dict[str, Any] | None:
    path = Path(folder) / name
    if not path.is_file():
        return None
    marker = read_json(path, "run marker")
    if not isinstance(marker, dict) or not {"stage", "config_hash"} <= marker.keys():
        raise OutputFolderError(f"{path} is not an lmcraft run marker; move the folder aside or choose another one")
    return marker


@contextmanager
def folder_lock(folder: Path, name: str = LOCK) -> Iterator[None]:
    """Hold `folder/<name>` (an advisory `flock`) for the block; a second holder fails at once."""
    path = Path(folder) / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise OutputFolderError(
                f"{folder} is in use by {holder}: one run writes a folder at a time. Wait for it to finish, "
                "or choose another output folder."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock; the file stays (removing it would race a waiting writer)


def _check_claim(folder: Path, stage: str, digest: str, overwrite: bool) -> dict[str, Any] | None:
    """Refuse a folder that is not ours to write; return its marker (None for a new or empty folder)."""
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{folder} exists and is not a folder; choose another output path")
    if not folder.exists():
        return None
    marker = read_marker(folder)
    if marker is None:
        names = sorted(p.name for p in folder.iterdir() if p.name != LOCK)
        if names:
            raise OutputFolderError(
                f"{folder} already holds files that lmcraft did not write ({listing(names, 5)}). Nothing was "
                "changed; choose a new output folder (lmcraft creates it)."
            )
        return None
    if (marker["stage"], marker["config_hash"]) != (stage, digest) and not overwrite:
        what = "another stage's" if marker["stage"] != stage else "a run with a different config's"
        raise OutputFolderError(
            f"{folder} holds {what} output ({marker['stage']}, config {marker['config_hash']}; this is {stage}, "
            f"config {digest}). Choose a new folder, or pass --overwrite to replace the files lmcraft wrote there "
            "(other files are kept)."
        )
    return marker


def _written(folder: Path, marker: Mapping[str, Any] | None) -> set[str]:
    """lmcraft's entries in a marked folder: those listed, or for a run that died while "running", all that
    is not foreign."""
    if marker is None:
        return set()
    if marker.get("status") == "running":
        return {p.name for p in folder.iterdir()} - set(marker.get("foreign", [])) - _OURS
    return set(marker.get("written", []))


def _remove(folder: Path, names: set[str]) -> None:
    for name in names:
        if not isinstance(name, str) or "/" in name or name in ("", ".", "..") or name in _OURS:
            continue
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@contextmanager
def claim_output(folder: Path | str, stage: str, config: Any, overwrite: bool = False,
                 output_key: str | None = None) -> Iterator[RunFolder]:
    """Claim `folder` for one run of `stage` with `config` (see the module doc); yields the `RunFolder`.

    With `overwrite`, the entries earlier runs wrote are removed (other files are kept) before the block runs,
    so the stage starts afresh. On a clean exit the marker says "complete"; on an error "failed" (a rerun of
    the same config resumes), unless nothing was written, in which case the claim leaves no trace."""
    folder = Path(folder)
    digest = config_hash(stage, config, output_key)
    _check_claim(folder, stage, digest, overwrite)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        marker = _check_claim(folder, stage, digest, overwrite)  # again, now that no one else writes
        ours = _written(folder, marker)
        if overwrite:
            _remove(folder, ours)
            ours = set()
        clean_staging(folder)
        run = RunFolder(folder, stage, digest, frozenset(p.name for p in folder.iterdir()) - ours - _OURS)
        run.write_marker("running")
        try:
            yield run
        except BaseException:
            if run.entries():
                run.write_marker("failed")
            else:
                (folder / MARKER).unlink(missing_ok=True)
                if created:
                    shutil.rmtree(folder, ignore_errors=True)
            raise
        run.write_marker("complete")


@contextmanager
def claim_output_file(path: Path | str, stage: str, config: Any, overwrite: bool = False,
                      output_key: str | None = None) -> Iterator[None]:
    """`claim_output` for a stage whose output is one file: the marker sits beside it (`.<name>.lmcraft-run.json`).
    An existing file without that marker is the user's and refused; one of another run needs `overwrite`."""
    path = Path(path)
    sidecar = path.with_name(f".{path.name}{MARKER}")
    digest = config_hash(stage, config, output_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path.parent, f".{path.name}{LOCK}"):
        if path.exists():
            marker = read_marker(path.parent, sidecar.name)
            if marker is None:
                raise OutputFolderError(f"{path} exists and lmcraft did not write it. Nothing was changed; choose "
                                        "another output file.")
            if (marker["stage"], marker["config_hash"]) != (stage, digest) and not overwrite:
                raise OutputFolderError(f"{path} was written by another {marker['stage']} run (config "
                                        f"{marker['config_hash']}; this is {digest}). Choose another output file, "
                                        "or pass --overwrite to replace it.")
        yield
        write_json(sidecar, {"stage": stage, "config_hash": digest, "status": "complete",
                             "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
