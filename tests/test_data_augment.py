"""Augmentation: WordNet parsing, EDA operations, determinism, back-translation hook."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lmcraft.data.augment import (
    Augment,
    back_translate,
    load_wordnet,
    random_deletion,
    random_insertion,
    random_swap,
    sentence_reorder,
    synonym_replacement,
)
from lmcraft.errors import ConfigError

# Two synsets in WordNet's data.* format (wndb(5WN)): offset, lex file, type, hex word count, words.
_DATA = {
    "noun": "  1 This software and database is being provided\n"
    "02958343 06 n 03 car 0 auto 0 automobile 0 001 @ 03791235 n 0000 | a motor vehicle\n",
    "verb": "01835496 38 v 02 travel 0 journey 0 000 | change location\n",
    "adj": "01148283 00 s 02 happy(a) 0 glad 0 000 | enjoying well-being\n",
    "adv": "00006105 02 r 01 quickly 0 000 | with speed\n",
}


@pytest.fixture()
def wordnet(tmp_path: Path) -> str:
    for pos, text in _DATA.items():
        (tmp_path / f"data.{pos}").write_text(text, encoding="latin-1")
    return str(tmp_path)


def test_load_wordnet_format(wordnet: str) -> None:
    lex = load_wordnet(wordnet)
    assert lex["car"] == ("auto", "automobile")
    assert lex["happy"] == ("glad",)  # the (a) marker is stripped
    assert lex["journey"] == ("travel",)
    assert "quickly" not in lex  # a one-word synset has no synonyms


def test_missing_wordnet_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="wordnet-base"):
        load_wordnet(str(tmp_path))


def test_eda_operations(wordnet: str) -> None:
    lex = load_wordnet(wordnet)
    rng = random.Random(0)
    words = "The Car was happy to travel.".split()
    replaced = synonym_replacement(words, lex, 3, rng)
    assert replaced[1] in ("Auto", "Automobile") and replaced[3] == "glad" and replaced[5] == "journey."
    inserted = random_insertion(words, lex, 2, rng)
    assert len(inserted) == len(words) + 2
    assert sorted(random_swap(words, 2, rng)) == sorted(words)
    assert random_swap(["one"], 3, rng) == ["one"]
    assert len(random_deletion(words, 0.5, rng)) >= 1
    assert random_deletion(words, 1.0, rng)[0] in words  # never empty
    assert random_insertion(["zzz"], lex, 2, rng) == ["zzz"]  # nothing to insert
    text = "One. Two! Three? Four."
    assert sorted(sentence_reorder(text, rng).split()) == sorted(text.split())


def test_augment_step_is_deterministic_per_document(wordnet: str) -> None:
    step = Augment(ops=["synonym", "swap", "delete", "reorder"], copies=4, lexicon=wordnet, seed=7)
    text = "The car is fast. We travel far. I am happy today."
    first = step(text, "doc-1")
    assert first[0] == ("", text) and len(first) == 5
    assert [s for s, _ in first[1:]] == ["#aug0-synonym", "#aug1-swap", "#aug2-delete", "#aug3-reorder"]
    assert step(text, "doc-1") == first
    assert step(text, "doc-2") != first
    assert Augment(ops=["swap"], copies=1, keep_original=False, lexicon=wordnet)(text, "x")[0][0] == "#aug0-swap"
    assert step("", "empty")[1][1] == ""


def test_back_translation_hook() -> None:
    calls: list[list[str]] = []

    def generate(prompts: list[str]) -> list[str]:
        calls.append(prompts)
        return [p.rsplit("\n\n", 1)[1].upper() + " " for p in prompts]

    assert back_translate(["hello there", "bye"], generate, pivot="German") == ["HELLO THERE", "BYE"]
    assert "from English to German" in calls[0][0] and "from German to English" in calls[1][0]
    with pytest.raises(ValueError, match="1 outputs for 2 prompts"):
        back_translate(["a", "b"], lambda p: ["x"])


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="Debian wordnet-base not installed")
def test_real_wordnet_from_debian() -> None:
    lex = load_wordnet()
    assert len(lex) > 50_000
    assert "automobile" in lex["car"]
