"""Gettext catalogues (`.po`) as parallel text: each translated message is one record; translation records.

A `.po` file pairs a source message (`msgid`, by gettext convention written in English) with its translation
(`msgstr`) into the catalogue's language (the header's `Language:` field). One record per message:

    {"source": msgid, "target": msgstr, "source_lang": "en", "target_lang": <Language>, "context": msgctxt}

Left out, because they are not one sentence and its translation: the header (empty msgid), untranslated
messages (empty msgstr), messages marked `#, fuzzy` (a guess waiting for review), plural messages (`msgid_plural`:
several target forms for one source) and obsolete ones (`#~`). Strings may span lines ("..." continuation lines)
and use C escapes (\\n, \\t, \\", \\\\). A line that fits none of this raises `InputFileError` naming the line.

`translation_records` turns messages into the instruction (alpaca) format that `lmcraft sft` trains on (loss on
the target only) and the built-in `translation_*` eval tasks score (chrF, BLEU): instruction "Translate from
English to French.", input = the source text, output = the translation. `held_out(text)` is the test split: a
SHA-256 of the source text below `fraction`, so the split depends on nothing but the text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmcraft.errors import InputFileError

__all__ = ["LANGUAGE_NAMES", "TRANSLATION_INSTRUCTION", "held_out", "po_messages", "translation_records"]

# English names of the commonest catalogue languages (a code not listed is written as itself).
# the instruction of a translation record (and of the prepare stage's back_translate prompts)
TRANSLATION_INSTRUCTION = "Translate from {source} to {target}."

LANGUAGE_NAMES = {
    "ar": "Arabic", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "fa": "Persian", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi",
    "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch",
    "pl": "Polish", "pt": "Portuguese", "pt_BR": "Brazilian Portuguese", "ro": "Romanian", "ru": "Russian",
    "sv": "Swedish", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "zh_Hans": "Simplified Chinese",
    "zh_Hant": "Traditional Chinese",
}

_KEYWORD = re.compile(r'^(msgctxt|msgid|msgid_plural|msgstr(?:\[\d+\])?)\s+"(.*)"\s*$')
_CONTINUATION = re.compile(r'^"(.*)"\s*$')
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "r": "\r"}
_ESCAPE = re.compile(r"\\(.)")


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), text)


@dataclass
class _Entry:
    line: int
    fuzzy: bool = False
    fields: dict[str, str] = field(default_factory=dict)


def _entries(lines: list[str], path: Path) -> Iterator[_Entry]:
    entry: _Entry | None = None
    last = ""
    fuzzy = False
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#~"):
            continue
        if line.startswith("#"):
            if entry is not None and "msgstr" in entry.fields:
                yield entry
                entry = None
            fuzzy = fuzzy or (line.startswith("#,") and "fuzzy" in line)
            continue
        keyword = _KEYWORD.match(line)
        if keyword:
            name = keyword.group(1)
            if name in ("msgctxt", "msgid") and entry is not None and "msgstr" in entry.fields:
                yield entry
                entry = None
            if entry is None:
                entry, fuzzy = _Entry(number, fuzzy), False
            last = "msgstr" if name == "msgstr[0]" else name
            entry.fields[last] = entry.fields.get(last, "") + _unescape(keyword.group(2))
            continue
        more = _CONTINUATION.match(line)
        if more and entry is not None:
            entry.fields[last] += _unescape(more.group(1))
            continue
        raise InputFileError(path, f"line {number}", 'expected a gettext keyword (msgid, msgstr, ...) followed by a '
                                                     f'"quoted string", a "continuation", or a # comment; got {line!r}')
    if entry is not None:
        yield entry


def po_messages(text: str, path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line of the msgid, record) for each translated message of a `.po` file's text (see the module docstring)."""
    language = ""
    for entry in _entries(text.splitlines(), path):
        f = entry.fields
        if "msgid" not in f or "msgstr" not in f:
            raise InputFileError(path, f"line {entry.line}", "expected a msgid and a msgstr in every entry")
        if not f["msgid"]:
            found = re.search(r"^Language:\s*(\S+)", f["msgstr"], re.MULTILINE)
            language = found.group(1) if found else language
            continue
        if entry.fuzzy or "msgid_plural" in f or not f["msgstr"]:
            continue
        record = {"source": f["msgid"], "target": f["msgstr"], "source_lang": "en", "target_lang": language}
        if "msgctxt" in f:
            record["context"] = f["msgctxt"]
        yield entry.line, record


def held_out(text: str, fraction: float = 0.15) -> bool:
    """Whether `text` belongs to the test split: the first 8 bytes of its SHA-256, as a number in [0, 1), < fraction."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64 < fraction


def translation_records(messages: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """Messages (`po_messages` records) as instruction-format records, in their order."""
    rows = []
    for m in messages:
        names = [LANGUAGE_NAMES.get(m[k], m[k]) for k in ("source_lang", "target_lang")]
        rows.append({"instruction": TRANSLATION_INSTRUCTION.format(source=names[0], target=names[1]),
                     "input": m["source"], "output": m["target"], "source_lang": m["source_lang"],
                     "target_lang": m["target_lang"]})
    return rows
