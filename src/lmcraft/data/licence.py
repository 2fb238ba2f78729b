"""Copyright and licence boilerplate: a cleaner that removes it, and an annotate step for notice-dominated text.

`licence` (clean) removes, in this order:
- the Project Gutenberg header (everything up to and including the `*** START OF THE/THIS PROJECT GUTENBERG
  EBOOK ... ***` line) and footer (from the `*** END OF THE/THIS PROJECT GUTENBERG EBOOK ... ***` line, or an
  `End of (the) Project Gutenberg...` line before it, to the end, which holds the licence);
- a licence header atop source code: the first comment block (after a `#!` line), in `/* ... */`, `<!-- -->`,
  `\"\"\"`/`'''` or line-comment form (`#`, `//`, `--`, `;`, `%`), when it names a licence (`Licensed under`,
  `Permission is hereby granted`, `SPDX-License-Identifier`, a GNU/Mozilla/BSD licence, `Copyright`,
  `All rights reserved`);
- standalone notice lines: `Copyright (c) 2024 Name`, `© 2024 Name. All rights reserved.`, `All rights
  reserved.` (a line under 200 characters that starts, after comment marks, with the notice).

`copyright` (annotate) measures r = (characters of segments that read as copyright/licence text) / (characters of
all non-blank segments), a segment being a line cut further at sentence ends (so a document written as one long
line is not all or nothing); a document with r > `max_ratio` is removed (`action: drop`, reason `dominated`) or kept
with `copyright_notice: true` and `copyright_ratio` in its metadata (`action: flag`). Every r goes into the
step's histogram.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from lmcraft.data.annotation import Annotation, share_edges

__all__ = ["CopyrightNotices", "LicenceBoilerplate", "licence_ratio"]

_CONFIG = {"extra": "forbid"}

_PG_START = re.compile(r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)
_PG_END = re.compile(r"^\s*\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)
_PG_END_LINE = re.compile(r"^\s*End of (?:the )?Project Gutenberg.*$", re.I | re.M)
_HEADER_WORDS = re.compile(
    r"licensed under|permission is hereby granted|spdx-license-identifier|general public license|"
    r"mozilla public license|bsd license|apache license|mit license|all rights reserved|copyright|\(c\)\s*\d{4}|©",
    re.I)
_NOTICE_LINE = re.compile(
    r"^[\s#/*;%-]*(?:copyright\b|©|\(c\)\s*\d{4}|all rights reserved\b)[^\n]{0,200}(?:\n|$)", re.I | re.M)
_LICENCE_TEXT = re.compile(
    r"copyright|©|\(c\)\s*\d{4}|all rights reserved|licen[cs]e|permission is hereby granted|warrant|liabilit|"
    r"redistribut|spdx-license-identifier|merchantability|fitness for a particular purpose|project gutenberg",
    re.I)
_LINE_COMMENTS = ("#", "//", "--", ";", "%")
_BLOCK_COMMENTS = (("/*", "*/"), ("<!--", "-->"), ('"""', '"""'), ("'''", "'''"))


def _strip_gutenberg(text: str) -> str:
    start = _PG_START.search(text)
    if start:
        text = text[start.end():]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
        last = max(_PG_END_LINE.finditer(text), key=lambda m: m.start(), default=None)
        if last is not None and len(text) - last.start() < 500:  # the "End of the Project Gutenberg EBook" line
            text = text[: last.start()]
    return text


def _first_comment_block(text: str) -> tuple[int, int] | None:
    """(start, end) character offsets of the first comment block (after a shebang and blank lines), or None."""
    pos = 0
    if text.startswith("#!"):
        pos = text.find("\n") + 1 or len(text)
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    for opener, closer in _BLOCK_COMMENTS:
        if text.startswith(opener, pos):
            end = text.find(closer, pos + len(opener))
            return (pos, len(text) if end < 0 else end + len(closer))
    marker = next((m for m in _LINE_COMMENTS if text.startswith(m, pos)), None)
    if marker is None:
        return None
    end = pos
    while end < len(text):
        line_end = text.find("\n", end)
        line_end = len(text) if line_end < 0 else line_end + 1
        if not text[end:line_end].lstrip().startswith(marker):
            break
        end = line_end
    return pos, end


_SEGMENT_END = re.compile(r"\n|(?<=[.!?])\s+")


def licence_ratio(text: str) -> float:
    """The share of characters of non-blank segments (lines cut at sentence ends) that read as copyright/licence
    text (0 for an empty text)."""
    total = hits = 0
    for segment in _SEGMENT_END.split(text):
        n = len(segment.strip())
        total += n
        if n and _LICENCE_TEXT.search(segment):
            hits += n
    return hits / total if total else 0.0


@dataclass
class LicenceBoilerplate:
    """Remove Project Gutenberg headers/footers, licence headers atop source files and copyright notice lines."""

    name: ClassVar[str] = "licence"
    kind: ClassVar[str] = "clean"
    gutenberg: bool = True
    source_headers: bool = True
    notice_lines: bool = True
    __pydantic_config__ = _CONFIG

    def __call__(self, text: str) -> str:
        original = text
        if self.gutenberg:
            text = _strip_gutenberg(text)
        if self.source_headers:
            block = _first_comment_block(text)
            if block is not None and _HEADER_WORDS.search(text, block[0], block[1]):
                text = text[: block[0]] + text[block[1]:].lstrip("\r\n")
        if self.notice_lines:
            text = _NOTICE_LINE.sub("", text)
        return text if text == original else text.strip("\r\n")


@dataclass
class CopyrightNotices:
    """Drop or flag documents whose text is mostly copyright/licence notices (ratio > `max_ratio`)."""

    name: ClassVar[str] = "copyright"
    kind: ClassVar[str] = "annotate"
    max_ratio: float = 0.5
    action: Literal["drop", "flag"] = "drop"
    edges: list[float] = field(default_factory=share_edges)
    __pydantic_config__ = _CONFIG

    def annotate(self, texts: list[str]) -> list[Annotation]:
        out = []
        for text in texts:
            r = licence_ratio(text)
            if r <= self.max_ratio:
                out.append(Annotation(score=r))
            elif self.action == "drop":
                out.append(Annotation("dominated", score=r))
            else:
                out.append(Annotation(meta={"copyright_notice": True, "copyright_ratio": round(r, 4)}, score=r))
        return out
