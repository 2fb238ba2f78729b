"""Shared test fixtures: a tiny model builder, a word-level tokenizer and a run folder.

`tiny_model(**fields)` builds `LanguageModel(ModelConfig(**(TINY_FIELDS | fields)), head)` right after
`torch.manual_seed(seed)`, so a test that asks for the same fields and seed gets bit-identical weights every time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

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


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A fresh, not yet created output folder for one run (`tmp_path/run`)."""
    return tmp_path / "run"
