"""`lmcraft generate` and `lmcraft chat` on a tiny model folder (random weights, trained byte-level BPE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_chat_tokenizer
from lmcraft.cli import main
from lmcraft.generate import GenerationConfig, generate_text
from lmcraft.hub import load_model, save_model
from lmcraft.tokenizer.load import load_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("gen-cli")
    vocab_size = save_chat_tokenizer(root / "tok", ["hello there, how are you today? fine thanks"] * 10, 320)
    model = tiny_model(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=64, tie_word_embeddings=False, initializer_range=0.2,
                       eos_token_id=0)
    return save_model(model, root / "model", tokenizer_dir=root / "tok")


def expected_text(folder: Path, prompt: str, n: int, chat: bool = False) -> str:
    model, tok = load_model(folder), load_tokenizer(folder)
    return generate_text(model, tok, prompt, GenerationConfig(max_new_tokens=n), chat=chat).texts[0]


def test_generate_streams_one_prompt(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(model_dir), "--prompt", "hello there", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out == expected_text(model_dir, "hello there", 12) + "\n"
    assert "tok/s" in err


def test_generate_batch_file_jsonl(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batch = tmp_path / "prompts.jsonl"
    batch.write_text('{"prompt": "hello"}\n\n{"prompt": "how are you today?"}\n{"prompt": "fine"}\n')
    code = main(["generate", str(model_dir), "--batch-file", str(batch), "--chat", "--max-new-tokens", "6",
                 "--batch-size", "2"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "how are you today?", "fine"]
    assert rows[1]["text"] == expected_text(model_dir, "how are you today?", 6, chat=True)


def test_generate_reports_user_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert main(["generate", str(model_dir), "--batch-file", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--prompt", "x", "--greedy", "--temperature", "0.7"]) == 2
    assert "--greedy" in capsys.readouterr().err


def test_seeded_sampling_from_the_cli_is_reproducible(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", str(model_dir), "--prompt", "hello", "--max-new-tokens", "10", "--temperature", "1.3",
            "--top-k", "50", "--seed", "5"]
    outs = []
    for _ in range(2):
        assert main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_chat_reads_piped_stdin(model_dir: Path) -> None:
    turns = "hello there\n/reset\nhow are you today?\n/exit\nnever read\n"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "lmcraft", "chat", str(model_dir), "--max-new-tokens", "8",
                           "--system", "be nice"], input=turns, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    config = GenerationConfig(max_new_tokens=8)
    # after /reset the second question is answered without the first turn in the context
    replies = [generate_text(model, tok, q, config, chat=True, system="be nice").texts[0]
               for q in ("hello there", "how are you today?")]
    assert proc.stdout == "".join(r + "\n" for r in replies)
    assert "conversation cleared" in proc.stderr
