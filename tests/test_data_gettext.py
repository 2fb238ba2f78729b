"""Gettext catalogues as parallel text: the .po reader, the translation records and their hash split, and the
django-locale converter that writes LANG/train.jsonl and LANG/test.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcraft import assets
from lmcraft.data.gettext import held_out, translation_records
from lmcraft.data.records import read_records
from lmcraft.errors import InputFileError

CATALOGUE = r'''# French translation.
#, fuzzy
msgid ""
msgstr ""
"Project-Id-Version: demo\n"
"Language: fr\n"

msgid "Delete"
msgstr "Supprimer"

#, python-format
msgid ""
"Please correct the duplicate data for %(field)s, which must be "
"unique."
msgstr ""
"Corrigez les données en double dans %(field)s qui doit contenir des valeurs "
"uniques."

msgctxt "month name"
msgid "May"
msgstr "Mai"

#, fuzzy
msgid "Guess"
msgstr "Devinette"

msgid "Untranslated"
msgstr ""

msgid "%(num)d form"
msgid_plural "%(num)d forms"
msgstr[0] "%(num)d formulaire"
msgstr[1] "%(num)d formulaires"

msgid "Say \"hi\"\n"
msgstr "Dites « salut »\n"

#~ msgid "Obsolete"
#~ msgstr "Obsolète"
'''


def test_po_records_are_the_translated_messages(tmp_path: Path) -> None:
    (tmp_path / "django.po").write_text(CATALOGUE, encoding="utf-8")
    got = [(r.where, r.fields) for r in read_records(str(tmp_path / "django.po"))]
    base = {"source_lang": "en", "target_lang": "fr"}
    assert got == [
        ("line 8", {"source": "Delete", "target": "Supprimer", **base}),
        ("line 12", {"source": "Please correct the duplicate data for %(field)s, which must be unique.",
                     "target": "Corrigez les données en double dans %(field)s qui doit contenir des valeurs uniques.",
                     **base}),
        ("line 19", {"source": "May", "target": "Mai", **base, "context": "month name"}),
        ("line 35", {"source": 'Say "hi"\n', "target": "Dites « salut »\n", **base}),
    ]


def test_bad_po_line_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "bad.po").write_text('msgid "a"\nmsgstr "b"\nnonsense here\n', encoding="utf-8")
    with pytest.raises(InputFileError, match=r"bad.po, line 3: expected a gettext keyword"):
        list(read_records(str(tmp_path / "bad.po")))


def test_translation_records_and_split() -> None:
    rows = translation_records([{"source": "Delete", "target": "Supprimer", "source_lang": "en",
                                 "target_lang": "fr"}])
    assert rows == [{"instruction": "Translate from English to French.", "input": "Delete", "output": "Supprimer",
                     "source_lang": "en", "target_lang": "fr"}]
    texts = [f"message number {i}" for i in range(2000)]
    share = sum(map(held_out, texts)) / len(texts)
    assert 0.12 < share < 0.18  # a hash split near the 15% asked for
    assert [held_out(t) for t in texts[:50]] == [held_out(t) for t in texts[:50]]  # nothing but the text decides


def test_django_locale_converter_splits_without_overlap(tmp_path: Path) -> None:
    core = tmp_path / "po" / "core" / "fr" / "LC_MESSAGES"
    app = tmp_path / "po" / "contrib" / "admin" / "locale" / "fr" / "LC_MESSAGES"
    core.mkdir(parents=True)
    app.mkdir(parents=True)
    messages = [f"Message {i}" for i in range(200)]
    header = 'msgid ""\nmsgstr ""\n"Language: fr\\n"\n\n'
    (core / "django.po").write_text(header + "".join(f'msgid "{m}"\nmsgstr "{m} (fr)"\n\n' for m in messages))
    (app / "django.po").write_text(header + 'msgid "Message 3"\nmsgstr "autre"\n\nmsgid "Admin"\nmsgstr "Admin"\n')
    assets.CONVERTERS[assets.get_asset("django-locale").convert](tmp_path, False)
    split = {name: [json.loads(line) for line in (tmp_path / "fr" / f"{name}.jsonl").read_text().splitlines()]
             for name in ("train", "test")}
    sources = {name: [r["input"] for r in rows] for name, rows in split.items()}
    assert sorted(sources["train"] + sources["test"]) == sorted([*messages, "Admin"])  # deduplicated, all kept
    assert not set(sources["train"]) & set(sources["test"]) and split["test"]
    assert all(held_out(s) for s in sources["test"]) and not any(held_out(s) for s in sources["train"])
    by_source = {r["input"]: r["output"] for rows in split.values() for r in rows}
    assert by_source["Message 3"] == "autre"  # the first translation in path order (po/contrib before po/core)
