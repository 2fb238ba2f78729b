"""Filters on crafted inputs: each rule fires on a document made to break it, and only then."""

from __future__ import annotations

import pytest

from lmcraft.data.filters import Blocklist, C4Quality, GopherQuality, GopherRepetition, Language, MinLength
from lmcraft.data.langid import identify, identify_batch

GOOD = (
    "The history of the city goes back to the Roman period, when a small fort was built on the hill above the "
    "river. Over the following centuries the settlement grew into a market town, and by the twelfth century it "
    "had a cathedral, a castle and a busy port. Merchants from the north brought wool and timber, and in return "
    "they took wine and salt that had been shipped up the river from the coast. The old walls still stand today."
)


def test_good_document_passes_every_filter() -> None:
    for f in (GopherQuality(), GopherRepetition(), C4Quality(), Blocklist(), Language(), MinLength()):
        assert f(GOOD) is None, f.name


@pytest.mark.parametrize(
    "text, reason",
    [
        ("the cat and the dog", "too_few_words"),
        ("a b c d e f g h i j " * 10, "short_mean_word_length"),
        ("the and of " + "incomprehensibilities " * 60, "long_mean_word_length"),
        (GOOD + " #tag" * 10, "symbol_word_ratio"),
        ("\n".join(f"- the item and {i} of the list with words" for i in range(12)), "bullet_lines"),
        (
            "\n".join(f"the story of line {i} goes on and on and on with many more words..." for i in range(12)),
            "ellipsis_lines",
        ),
        ("the and of " + "1234 5678 !!!! ???? " * 20, "few_alphabetic_words"),
        ("Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor " * 6, "few_stop_words"),
    ],
)
def test_gopher_quality_rules(text: str, reason: str) -> None:
    assert GopherQuality()(text) == reason


def test_gopher_quality_edge_cases_and_disabling() -> None:
    f = GopherQuality()
    assert f("") == "too_few_words"
    assert f("   \n ") == "too_few_words"
    assert GopherQuality(min_words=None)("") is None
    assert GopherQuality(min_words=2, max_words=3)("the one and two of") == "too_many_words"
    assert GopherQuality(min_stop_words=None)("Lorem ipsum dolor sit amet consectetur adipiscing " * 10) is None
    huge = "word " * 200_000
    assert f(huge) == "too_many_words"
    # a language written without spaces is one giant "word": routed by the language filter first
    assert f("日本語の文章です。" * 100) == "too_few_words"


def test_gopher_repetition_rules() -> None:
    f = GopherRepetition()
    para = "The river floods in spring and the farmers move their animals to the hills."
    assert f("\n\n".join([para] * 4 + [GOOD])) == "dup_paragraphs"
    lines = "\n".join(["buy now and save"] * 5 + [GOOD])
    assert f(lines) == "dup_lines"
    assert f(" ".join(["new york"] * 15) + " " + GOOD) == "top_2gram"
    assert f(" ".join(["new york city"] * 8) + " " + GOOD) == "top_3gram"
    spam = " ".join(f"the big red fox jumps {i}" for i in range(20))
    assert f(spam) == "top_2gram"
    assert GopherRepetition(top_ngram_max_fraction={})(spam) == "dup_5gram"
    assert f("") is None and f("   ") is None
    assert f("word " * 50_000) == "dup_lines" or f("word " * 50_000) == "top_2gram"
    assert f(GOOD) is None


def test_c4_rules() -> None:
    f = C4Quality()
    assert f("Lorem ipsum dolor. Sit amet. Consectetur.") == "lorem_ipsum"
    assert f("function f() { return 1; }. Two. Three.") == "curly_brace"
    assert f("Only one sentence here.") == "few_sentences"
    assert f("One. Two! Three?") is None
    assert C4Quality(min_sentences=None, remove_curly_brace=False)("{x}") is None
    assert f("") == "few_sentences"


def test_blocklist(tmp_path) -> None:
    f = Blocklist()
    assert f("Free PORN videos") == "blocked_words"
    assert f("Pornographers are not matched as a prefix: pornx") is None
    assert Blocklist(max_hits=1)("porn once") is None
    assert Blocklist(max_hits=1)("porn porn") == "blocked_words"
    lst = tmp_path / "words.txt"
    lst.write_text("# a comment\nbad phrase\n")
    g = Blocklist(words=[], words_file=str(lst))
    assert g("this has a BAD   phrase in it") == "blocked_words"
    assert g("bad things, phrase") is None
    assert Blocklist(words=[])("anything") is None


def test_language_filter_and_batch_agree() -> None:
    texts = [
        GOOD,
        "Ceci est une phrase en français, écrite pour tester la détection de la langue du document.",
        "Dies ist ein deutscher Satz, der die Spracherkennung des Dokuments prüfen soll.",
        "这是一个用于测试语言识别的中文句子。",
        "",
        "   ",
        "12345 !!!",
        "English words mixed with 日本語の文字 and Русский текст in one line of text here.",
    ]
    f = Language(languages=["en"])
    single = [f(t) for t in texts]
    assert single[:4] == [None, "lang_fr", "lang_de", "lang_zh"]
    assert single[4:7] == ["lang_und"] * 3
    assert f.batch(texts) == single
    for (l1, p1), (l2, p2) in zip(identify_batch(texts), [identify(t) for t in texts], strict=True):
        assert l1 == l2 and p1 == pytest.approx(p2, abs=1e-5)
    assert Language(languages=["en"], min_score=0.999999)(texts[-1]) in ("low_score", "lang_ja", "lang_ru")


def test_min_length() -> None:
    assert MinLength(min_chars=3)("  ab  ") == "too_short"
    assert MinLength(min_chars=3)("abc") is None
