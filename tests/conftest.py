"""Shared test fixtures: a tiny model builder, a byte-level chat tokenizer, a word-level tokenizer, a run folder, and
`served` (an `lmcraft serve` subprocess on a free local port).

`tiny_model(**fields)` builds `LanguageModel(ModelConfig(**(TINY_FIELDS | fields)), head)` right after
`torch.manual_seed(seed)`, so a test that asks for the same fields and seed gets bit-identical weights every time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# `precision: auto` resolves to bf16 on CPUs where bf16 is fast (AMX); the suite's numbers are fp32 everywhere
os.environ.setdefault("LMCRAFT_AUTO_PRECISION", "fp32")

if TYPE_CHECKING:
    from lmcraft.models import LanguageModel, ModelConfig
    from lmcraft.tokenizer.load import Tokenizer

TINY_FIELDS: dict[str, Any] = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def build_tiny_model(config: ModelConfig | None = None, head: str | None = None, seed: int | None = 0,
                     **fields: Any) -> LanguageModel:
    """A small `LanguageModel` with seeded random weights: `config` as given, else `TINY_FIELDS` updated by
    `fields`. `seed=None` leaves the global RNG as it is (for tests that seed once and build several models)."""
    import torch

    from lmcraft.models import LanguageModel, ModelConfig

    if seed is not None:
        torch.manual_seed(seed)
    return LanguageModel(config if config is not None else ModelConfig(**{**TINY_FIELDS, **fields}), head)


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., LanguageModel]:
    """`build_tiny_model` (see there): `tiny_model(vocab_size=97, num_kv_heads=2).eval()`."""
    return build_tiny_model


@pytest.fixture
def word_tokenizer(tmp_path: Path) -> Callable[..., Tokenizer]:
    """`word_tokenizer(encoder)`: the whitespace word-level tokenizer of the fine-tuning tests, saved under
    `tmp_path/tok` and loaded; with `encoder`, inputs are wrapped as [CLS] a [SEP] (b [SEP])."""
    from lmcraft.tokenizer.load import load_tokenizer
    from test_finetune_support import write_tokenizer

    def make(encoder: bool) -> Tokenizer:
        return load_tokenizer(write_tokenizer(tmp_path / "tok", encoder=encoder))

    return make


def save_chat_tokenizer(folder: Path, texts: list[str], vocab_size: int) -> int:
    """A byte-level BPE trained on `texts` with `<eos>` and the ChatML tokens, saved with the chatml template into
    `folder`; returns its vocabulary size."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmcraft.tokenizer.load import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    Tokenizer(backend, eos_token="<eos>", chat_template="chatml").save(folder)
    return backend.get_vocab_size()


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A fresh, not yet created output folder for one run (`tmp_path/run`)."""
    return tmp_path / "run"


@contextmanager
def served(model_dir: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`lmcraft serve MODEL FLAGS` on a free 127.0.0.1 port: (its URL, the process) once /metrics answers; the
    process is killed on exit if it is still running."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "lmcraft", "serve", str(model_dir), "--port", str(port), *flags],
                            env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/metrics").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
            assert proc.poll() is None, proc.stderr.read()
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
