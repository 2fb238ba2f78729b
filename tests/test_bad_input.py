"""The bad-input corpus: hostile and careless input, each run through the CLI as a user would.

Every case must end with exit code 2 and one message that names the place (file, line, key, byte or
flag): never "internal error", never a traceback. Cases that need a model use a tiny random model folder.
"""

from __future__ import annotations

import io
import json
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import save_chat_tokenizer
from lmcraft.cli import main
from lmcraft.hub import save_model

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
Case = Callable[[Path, Path], tuple[list[str], bytes | None]]  # (tmp, model folder) -> (argv, stdin bytes)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:  # noqa: ANN001 - conftest builder
    root = tmp_path_factory.mktemp("bad-input")
    vocab_size = save_chat_tokenizer(root / "tok", ["hello there, how are you?"] * 5, 300)
    model = tiny_model(vocab_size=vocab_size, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                       max_position_embeddings=1024, eos_token_id=0)
    return save_model(model, root / "model", tokenizer_dir=root / "tok")


def _copy_model(model_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in model_dir.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def _edit_config(model_dir: Path, tmp: Path, **changes: object) -> Path:
    folder = _copy_model(model_dir, tmp / "edited")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
    return folder


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _gen(folder: Path, *extra: str) -> list[str]:
    return ["generate", str(folder), *extra]


_BOMB = "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9 if p else ['x'] * 9)}]\n"
                for p, c in zip(["", "a", "b", "c", "d", "e"], "abcdef", strict=True))
_NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def _data_config(tmp: Path, name: str, data: str | bytes, extra: str = "steps: []\n") -> str:
    """A data-stage config reading one input file into tmp/out."""
    return str(_write(tmp / "stage.yaml", f"inputs: [{_write(tmp / name, data)}]\noutput: {tmp / 'out'}\n{extra}"))


def _gguf_header(tensors: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, 0) + b"\0" * 64


def _sharded(model_dir: Path, tmp: Path, target: str) -> Path:
    folder = _copy_model(model_dir, tmp / "sharded")
    (folder / "model.safetensors").rename(tmp / "elsewhere.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": target}}))
    return folder


def _pickles(model_dir: Path, tmp: Path) -> Path:
    folder = _copy_model(model_dir, tmp / "pickled")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    return folder


def _truncated(model_dir: Path, tmp: Path) -> Path:
    folder = _copy_model(model_dir, tmp / "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


CASES: dict[str, tuple[Case, str]] = {
    # configs
    "yaml alias bomb": (lambda t, m: (["tokenizer", str(_write(t / "c.yaml", _BOMB))], None),
                        r"c\.yaml.*expands to [\d,]+ values through aliases"),
    "yaml python tag": (lambda t, m: (["tokenizer", str(_write(t / "c.yaml", "x: !!python/object/apply:os.system "
                                                                "['true']\n"))], None),
                        r"c\.yaml, line 1, column 4: not valid YAML.*python/object"),
    "python tag in an override": (lambda t, m: (["tokenizer", str(_write(t / "c.yaml", "{}\n")),
                                                 "inputs=!!python/object/apply:os.system ['true']"], None),
                                  r"override inputs=.*not valid YAML"),
    "yaml syntax error": (lambda t, m: (["tokenizer", str(_write(t / "c.yaml", "a: [1, 2\n"))], None),
                          r"c\.yaml, line \d+, column \d+: not valid YAML"),
    "infinite learning rate": (lambda t, m: (["pretrain", str(RECIPES / "pretrain-gpt-tiny.yaml"), "trainer.lr=.inf",
                                              f"output_dir={t / 'run'}"], None),
                               r"key 'trainer\.lr': Input should be a finite number \(given: inf\)"),
    "NaN learning rate": (lambda t, m: (["pretrain", str(RECIPES / "pretrain-gpt-tiny.yaml"), "trainer.lr=.nan",
                                         f"output_dir={t / 'run'}"], None),
                          r"key 'trainer\.lr': Input should be a finite number"),
    # data stages that would read nothing usable
    "prepare on a Latin-1 file": (lambda t, m: (["prepare", _data_config(t, "l.txt", b"caf\xe9 au lait")], None),
                                  r"l\.txt, every record: at least one usable document"),
    "unknown encoding of an input": (lambda t, m: (["prepare", str(_write(t / "stage.yaml", (
        f"inputs: [{{path: {_write(t / 'l.txt', 'hi')}, encoding: klingon}}]\noutput: {t / 'out'}\nsteps: []\n")))],
        None), r"key 'inputs'.*'klingon' is not a known text encoding"),
    "prepare on a CSV without its text column": (lambda t, m: (["prepare", _data_config(t, "d.csv", "title,x\na,b\n")],
                                                               None),
                                                 r"d\.csv, every record: at least one usable document"),
    "tokenizer on zero documents": (lambda t, m: (["tokenizer", _data_config(t, "b.txt", bytes(range(256)),
                                                                             "vocab_size: 300\n")], None),
                                    r"b\.txt, every record: at least one training document"),
    "tokenizer whose only document is held out": (lambda t, m: (["tokenizer", _data_config(
        t, "one.txt", "words " * 40, "vocab_size: 300\nheld_out_fraction: 0.999999\n")], None),
                                                  r"one\.txt.*1 usable document\(s\) all fell in the held-out split"),
    "tokenizer with a chat template that does not compile": (lambda t, m: (["tokenizer", _data_config(
        t, "c.txt", "words " * 40, "vocab_size: 300\nchat_template: '{% for m in messages %}'\n")], None),
                                                             r"chat template does not compile"),
    # prompts and input text
    "non-UTF-8 --prompt": (lambda t, m: (_gen(m, "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")), None),
                           r"--prompt, character 3: UTF-8 text"),
    "Latin-1 batch file": (lambda t, m: (_gen(m, "--batch-file", str(_write(t / "p.txt", b"caf\xe9\n"))), None),
                           r"p\.txt, byte 3: utf-8 text \(pass the file's encoding"),
    "binary batch file": (lambda t, m: (_gen(m, "--batch-file", str(_write(t / "p.bin", b"\x89PNG\r\n\x1a\n\xff"))),
                                        None),
                          r"p\.bin, byte 0: utf-8 text"),
    "unknown --encoding": (lambda t, m: (_gen(m, "--encoding", "klingon", "--batch-file",
                                              str(_write(t / "p.txt", "hi\n"))), None),
                           r"p\.txt, encoding: a known text encoding"),
    "binary input to chat": (lambda t, m: (["chat", str(m)], b"hello\n\xff\xfe\x00binary\n"),
                             r"standard input, line 2, byte 0: utf-8 text"),
    "max-new-tokens past the context": (lambda t, m: (_gen(m, "--prompt", "hi", "--max-new-tokens", "1000000000"),
                                                      None),
                                        r"--max-new-tokens 1000000000: expected 1 to 1,024"),
    # chat templates (untrusted code)
    "template with nested loops": (lambda t, m: (_gen(m, "--chat", "--template", str(_write(t / "t.jinja",
                                                                                            _NESTED_LOOPS)),
                                                      "--prompt", "hi"), None),
                                   r"chat template ran longer than its .* budget"),
    "template building a huge string": (lambda t, m: (_gen(m, "--chat", "--template",
                                                           str(_write(t / "t.jinja", "{{ 'x' * 10**12 }}")),
                                                           "--prompt", "hi"), None),
                                        r"chat template builds a string or list of 1,000,000,000,000 items"),
    "template escape": (lambda t, m: (_gen(m, "--chat", "--template", str(_write(
        t / "t.jinja", "{{ ''.__class__.__mro__[1].__subclasses__() }}")), "--prompt", "hi"), None),
                        r"chat template failed: .*unsafe"),
    "tojson with a bad argument": (lambda t, m: (_gen(m, "--chat", "--template", str(_write(
        t / "t.jinja", "{{ messages | tojson(separators=5) }}")), "--prompt", "hi"), None),
                                   r"chat template failed: TypeError"),
    # model folders
    "config value of the wrong type": (lambda t, m: (_gen(_edit_config(m, t, rms_norm_eps="abc"), "--prompt", "hi"),
                                                     None),
                                       r"config\.json: key 'rms_norm_eps' = 'abc': Input should be a valid number"),
    "negative vocab size": (lambda t, m: (_gen(_edit_config(m, t, vocab_size=-1), "--prompt", "hi"), None),
                            r"config\.json: key 'vocab_size' = -1: expected a number above 0"),
    "shard index pointing outside the folder": (lambda t, m: (_gen(_sharded(m, t, "../elsewhere.safetensors"),
                                                                   "--prompt", "hi"), None),
                                                r"index\.json: weight_map names file\(s\) outside the model folder"),
    "truncated weights": (lambda t, m: (_gen(_truncated(m, t), "--prompt", "hi"), None),
                          r"model\.safetensors: corrupt or truncated safetensors file"),
    "pickle weights only": (lambda t, m: (_gen(_pickles(m, t), "--prompt", "hi"), None), r"holds only pickle weights"),
    "GGUF header declaring 2^40 tensors": (lambda t, m: (["convert", str(_write(t / "m.gguf", _gguf_header(2**40))),
                                                          str(t / "out")], None),
                                           r"m\.gguf, byte 8: the header declares 1,099,511,627,776 tensors"),
    "GGUF of an unknown version": (lambda t, m: (["convert", str(_write(t / "m.gguf", b"GGUF" + struct.pack(
        "<IQQ", 99, 0, 0))), str(t / "out")], None), r"m\.gguf, byte 4: GGUF version 99 is not supported"),
    "GGUF export over the user's own file": (lambda t, m: (["export", str(m), str(_write(t / "mine.gguf", b"mine")),
                                                            "--quiet"], None),
                                             r"mine\.gguf exists and lmcraft did not write it"),
    "verify-export of a GGUF cut inside its metadata": (lambda t, m: (["verify-export", str(_write(
        t / "m.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 40) + b"general")),
        "--against", str(m)], None),
        r"m\.gguf, byte 32: expected the key of metadata entry 0 \(40 bytes\) but the file ends at byte 39"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_clear_error(name: str, tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    make, needle = CASES[name]
    monkeypatch.setattr("lmcraft.tokenizer.chat.MAX_RENDER_SECONDS", 0.5)  # the looping template fails sooner
    argv, stdin = make(tmp_path, model_dir)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err
    assert re.search(needle, " ".join(err.split())), err
    assert len(err) < 2000  # one bounded message, whatever the input's size


# ---- output folders: a folder of the user's files is refused by every writing stage, byte for byte intact ----------
RECIPE_STAGES = {  # stage -> (recipe, the config key of its output folder)
    "pretrain": ("pretrain-gpt-tiny.yaml", "output_dir"), "finetune": ("finetune-minilm-spam.yaml", "output_dir"),
    "compare": ("compare-minilm-spam.yaml", "output_dir"), "sft": ("sft-toy.yaml", "output_dir"),
    "reward": ("reward-toy.yaml", "output_dir"), "dpo": ("dpo-toy.yaml", "output_dir"),
    "ppo": ("ppo-toy.yaml", "output_dir"), "eval": ("eval-smollm2-quick.yaml", "output_dir"),
    "scaling": ("scaling-shakespeare.yaml", "output_dir"), "pipeline": ("demo.yaml", "run_dir"),
    "tokenizer": ("tokenizer-shakespeare.yaml", "output"), "distill": ("distill-smollm2.yaml", "output_dir"),
}


def _project_folder(root: Path) -> Path:
    """What a user's project folder looks like: code, a git folder, notes, names that look temporary."""
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "final").mkdir()
    (root / "final" / "model-old.safetensors").write_bytes(b"\0weights")
    (root / ".tmp-important-notes.txt").write_text("notes")
    (root / ".trash-photos").mkdir()
    (root / ".trash-photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    (root / "train.py").write_text("print('mine')\n")
    return root


def _folder_argv(stage: str, folder: Path, tmp: Path, model_dir: Path) -> list[str]:
    if stage in RECIPE_STAGES:
        recipe, key = RECIPE_STAGES[stage]
        return [stage, str(RECIPES / recipe), f"{key}={folder}"]
    corpus = _write(tmp / "corpus.txt", "some words of text\n" * 20)
    if stage == "prepare":
        return ["prepare", str(_write(tmp / "p.yaml", f"inputs: [{corpus}]\noutput: {folder}\nsteps: []\n"))]
    if stage == "merge":
        return ["merge", str(model_dir), "--out", str(folder)]
    return ["convert", str(_write(tmp / "m.gguf", _gguf_header(0))), str(folder)]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "--overwrite"])
@pytest.mark.parametrize("stage", [*RECIPE_STAGES, "prepare", "merge", "convert"])
def test_a_folder_of_user_files_is_refused_by_every_writing_stage(
        stage: str, overwrite: bool, tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _project_folder(tmp_path / "project")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    code = main(_folder_argv(stage, folder, tmp_path, model_dir) + (["--overwrite"] if overwrite else []))
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "already holds files that lmcraft did not write" in err, err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in folder.iterdir()) == [".git", ".tmp-important-notes.txt", ".trash-photos", "final",
                                                        "train.py"]


def test_prepare_output_dot_overwrite_in_a_project_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = _project_folder(tmp_path / "project")
    config = _write(folder / "cfg.yaml", f"inputs: [{_write(tmp_path / 'c.txt', 'words ' * 50)}]\nsteps: []\n")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    monkeypatch.chdir(folder)
    assert main(["prepare", "cfg.yaml", "output=.", "--overwrite"]) == 2
    assert "already holds files that lmcraft did not write" in " ".join(capsys.readouterr().err.split())
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before and config.is_file()


def test_a_full_disk_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import lmcraft.io

    def full(path: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lmcraft.io, "atomic_file", full)
    argv = ["tokenizer", _data_config(tmp_path, "c.txt", "words " * 40, "vocab_size: 300\n")]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: the disk is full while writing" in err and "Files already written are intact" in err
    assert "internal error" not in err
