"""Every file lmcraft writes, and the JSON/YAML it reads.

Writes are atomic: the bytes go to a temporary file in the target's folder (named `.lmcraft-tmp-*`, a prefix
no other tool uses), are flushed to disk, and are renamed over the target with `os.replace`, so a reader (or a
run killed at any moment) sees the old file or the new one, never half of one. Folders are staged the same
way (`staged_dir`). `clean_staging` removes what a killed writer left behind.

Reads raise `InputFileError` naming the file and the line/column where the text stops being valid, and YAML
alias expansion is bounded (a 1 kB "billion laughs" file cannot expand into gigabytes). `cache_root` is where
lmcraft keeps what it fetches, converts or measures once (assets, the precision measurement, compiled kernels).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml

from lmcraft.errors import InputFileError

__all__ = [
    "TMP_PREFIX",
    "cache_root",
    "OLD_PREFIX",
    "TRASH_PREFIX",
    "temp_path",
    "atomic_file",
    "write_bytes",
    "write_text",
    "write_json",
    "write_jsonl",
    "save_npz",
    "save_npy",
    "save_figure",
    "staged_dir",
    "staged_files",
    "replace_dir",
    "remove_dir",
    "clean_staging",
    "decode_text",
    "check_text",
    "read_text",
    "read_json",
    "read_yaml",
    "parse_yaml",
    "excerpt",
    "listing",
]

TMP_PREFIX = ".lmcraft-tmp-"  # a file or folder being written
OLD_PREFIX = ".lmcraft-old-"  # the previous version of a replaced folder, until the new one is in place
TRASH_PREFIX = ".lmcraft-trash-"  # a folder being deleted
MAX_YAML_NODES = 100_000  # nodes after alias expansion: far above any real config, far below a bomb


def temp_path(path: Path) -> Path:
    """A unique temporary name next to `path` (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_file(path: Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on a clean exit it is synced and renamed to `path`.

    On an exception the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as fh:
        fh.write(data)


def write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_json(path: Path, obj: Any, indent: int | None = 2, sort_keys: bool = False) -> None:
    """JSON (UTF-8, non-ASCII kept as is) with a final newline; values JSON cannot hold are written as str."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """One JSON document a line."""
    with atomic_file(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def save_npz(path: Path, arrays: dict[str, Any]) -> None:
    import numpy as np

    with atomic_file(path, "wb") as fh:
        np.savez(fh, **arrays)


def save_npy(path: Path, array: Any) -> None:
    import numpy as np

    with atomic_file(path, "wb") as fh:
        np.save(fh, array)


def save_figure(fig: Any, path: Path, dpi: int = 100, close: bool = True) -> None:
    """A matplotlib figure as PNG (the format is given, since the temporary name has no `.png`)."""
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)


@contextmanager
def _staging(path: Path) -> Iterator[Path]:
    """An empty `.lmcraft-tmp-*` folder beside `path`, deleted on the way out unless it was moved away."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = temp_path(path)
    stage.mkdir()
    try:
        yield stage
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit it replaces `path` whole (see `replace_dir`).

    On an exception the staging folder is deleted and `path` is untouched."""
    path = Path(path)
    with _staging(path) as stage:
        yield stage
        replace_dir(stage, path)


@contextmanager
def staged_files(path: Path, stale: Callable[[str], bool] = lambda name: False, last: str | None = None
                 ) -> Iterator[Path]:
    """Yield an empty staging folder whose files, on a clean exit, go into `path`: a new `path` appears by one
    rename; into an existing one each file is renamed in (each complete; `last` after the others), then entries the
    new set lacks and `stale(name)` marks are removed. Other entries of `path` stay (a run marker, a user's file)."""
    path = Path(path)
    with _staging(path) as stage:
        yield stage
        if not path.exists():
            os.replace(stage, path)
            return
        new = {p.name for p in stage.iterdir()}
        for name in sorted(new, key=lambda n: n == last):
            if (path / name).is_dir():
                remove_dir(path / name)
            os.replace(stage / name, path / name)
        for old in path.iterdir():
            if old.name not in new and stale(old.name):
                remove_dir(old) if old.is_dir() else old.unlink()


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete folder `src` to `dst`, replacing any `dst`, such that a kill at any moment leaves
    either the old `dst` or the new one: the old one is first renamed to `.lmcraft-old-<name>` (which
    `clean_staging` puts back if the new one never arrived), and deleted only once the new one is in place."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(OLD_PREFIX + dst.name)
    remove_dir(old)
    os.replace(dst, old)
    os.replace(src, dst)
    remove_dir(old)


def remove_dir(path: Path) -> None:
    """Delete a folder so that a kill midway never leaves a half-deleted folder under its own name: it is
    renamed to `.lmcraft-trash-<name>` first (which `clean_staging` finishes deleting)."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def clean_staging(folder: Path) -> list[str]:
    """Finish what a killed writer left in `folder`: delete temporary and trash entries, and put back an
    `.lmcraft-old-X` whose replacement `X` never arrived. Returns the names it handled."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    handled = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if name.startswith(OLD_PREFIX) and not (folder / name[len(OLD_PREFIX):]).exists():
            os.replace(p, folder / name[len(OLD_PREFIX):])
        elif name.startswith((TMP_PREFIX, OLD_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        else:
            continue
        handled.append(name)
    return handled


def listing(names: Iterable[str], limit: int = 10) -> str:
    """`a, b, c (and 7 more)`: a bounded list of names for a message."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return f"{shown} (and {len(names) - limit} more)" if len(names) > limit else shown


def excerpt(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters (with the count of the rest), for quoting input in an error."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def decode_text(data: bytes, source: object, encoding: str = "utf-8") -> str:
    """`data` as text; bytes that are not `encoding` raise `InputFileError` naming the source and byte offset."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        hint = " (pass the file's encoding, e.g. --encoding latin-1)" if encoding.lower() in ("utf-8", "utf8") else ""
        raise InputFileError(source, f"byte {err.start}", f"{encoding} text{hint}") from None
    except LookupError:
        raise InputFileError(source, "encoding", f"a known text encoding, not {encoding!r}") from None


def check_text(text: str, source: object) -> str:
    """`text` unchanged if it is valid Unicode; a string built from undecodable bytes (a command-line
    argument that is not UTF-8 arrives with surrogate escapes) raises `InputFileError` naming the offset."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputFileError(source, f"character {err.start}", "UTF-8 text") from None
    return text


def read_text(path: Path, what: str = "file", encoding: str = "utf-8") -> str:
    """A text file; a missing file names `what`, undecodable bytes name the byte offset."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return decode_text(path.read_bytes(), path, encoding)


def read_json(path: Path, what: str = "JSON file") -> Any:
    """Parse a JSON file; an error names the file, line and column and what the parser expected."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputFileError(path, f"line {err.lineno}, column {err.colno}", f"not valid JSON ({err.msg})") from None


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no `!!python` tags) that refuses documents whose alias expansion is too large."""

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _check_expanded_size(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a cycle counts once (safe_load builds recursive structures lazily)
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        sizes[id(node)] = total
        return total

    total = size(root)
    if total > MAX_YAML_NODES:
        raise yaml.YAMLError(f"document expands to {total:,} values through aliases (at most {MAX_YAML_NODES:,})")


def parse_yaml(text: str, source: str = "<text>") -> Any:
    """Parse YAML text safely (no tags that build Python objects, bounded alias expansion)."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "document"
        problem = getattr(err, "problem", None) or str(err)
        raise InputFileError(source, where, f"not valid YAML: {excerpt(str(problem), 200)}") from None


def read_yaml(path: Path, what: str = "YAML file") -> Any:
    """Parse a YAML file with `parse_yaml`; errors name the file, line and column."""
    return parse_yaml(read_text(path, what), str(path))


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir`, else $LMCRAFT_CACHE, else $XDG_CACHE_HOME/lmcraft, else ~/.cache/lmcraft."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LMCRAFT_CACHE"):
        return Path(os.environ["LMCRAFT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lmcraft"
