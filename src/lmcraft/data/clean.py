"""Cleaners: text -> text transforms applied to every document before filtering.

- `HtmlToText`: HTML to plain text with the Lexbor parser (selectolax); scripts, styles and
  boilerplate elements (nav, header, footer, aside, forms, cookie banners) are dropped, block
  elements become line breaks and inline whitespace collapses as a browser would render it.
- `Normalize`: mojibake repair with ftfy (`fix_text`: wrong-codec round trips such as "cafÃ©" ->
  "café", HTML entities, C1 controls, ligatures, full-width forms) and Unicode normalisation
  (NFC by default, NFKC on request).
- `Whitespace`: control and invisible characters removed (zero-width, BOM, soft hyphen), exotic
  spaces mapped to " ", CRLF/CR to LF, runs of spaces collapsed, trailing spaces stripped and at
  most one blank line kept between paragraphs.
- `BoilerplateLines`: line-level removal of lines that match boilerplate patterns ("cookie",
  "javascript", "all rights reserved", ...) and, optionally, of short lines repeated many times in
  the same document (running headers and footers of paginated text).

A cleaner may return "" (everything was boilerplate); the pipeline then removes the document with
the reason `<step>:empty`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from lmcraft.data.pickling import RebuiltOnUnpickle

__all__ = ["BoilerplateLines", "HtmlToText", "Normalize", "Whitespace", "looks_like_html"]

_CONFIG = {"extra": "forbid"}

_HTML_HINT = re.compile(r"<\s*(?:!doctype|html|head|body|div|p|br|span|a\s|script|style|table|li)\b", re.I)


def looks_like_html(text: str) -> bool:
    """True when the first 4 KiB hold an HTML tag (cheap test used by `HtmlToText(only_if_html=True)`)."""
    return _HTML_HINT.search(text, 0, 4096) is not None


_PARAGRAPH_TAGS = frozenset("article blockquote dl figure h1 h2 h3 h4 h5 h6 hr main ol p section table ul".split())
_LINE_TAGS = frozenset("address caption dd details dialog div dt fieldset figcaption li summary td th tr".split())
_DEFAULT_DROP_TAGS = (
    "script style noscript template svg canvas iframe object embed head nav header footer aside form button "
    "select option input textarea menu"
).split()
_DEFAULT_DROP_SELECTORS = (
    '[class*="cookie"]',
    '[id*="cookie"]',
    '[class*="banner"]',
    '[class*="advert"]',
    '[id*="advert"]',
    '[aria-hidden="true"]',
    "[hidden]",
)
_WS = re.compile(r"\s+")


@dataclass
class HtmlToText:
    """HTML -> text: drop `drop_tags` and nodes matching `drop_selectors`, break lines at block elements."""

    name: ClassVar[str] = "html"
    kind: ClassVar[str] = "clean"
    only_if_html: bool = True
    drop_tags: list[str] = field(default_factory=lambda: list(_DEFAULT_DROP_TAGS))
    drop_selectors: list[str] = field(default_factory=lambda: list(_DEFAULT_DROP_SELECTORS))
    __pydantic_config__ = _CONFIG

    def __call__(self, text: str) -> str:
        if not text or (self.only_if_html and not looks_like_html(text)):
            return text
        from selectolax.lexbor import LexborHTMLParser

        tree = LexborHTMLParser(text)
        for selector in self.drop_selectors:
            for node in tree.css(selector):
                node.decompose()
        root = tree.body or tree.root
        if root is None:
            return ""
        drop = set(self.drop_tags)
        pieces: list[str | int] = []  # text, or a line break of 1 or 2 newlines (adjacent breaks merge)

        def brk(n: int) -> None:
            if pieces and isinstance(pieces[-1], int):
                pieces[-1] = max(pieces[-1], n)
            elif n:
                pieces.append(n)

        stack: list = [root]  # nodes, or ints: the break to emit after a block's children
        while stack:
            node = stack.pop()
            if isinstance(node, int):
                brk(node)
                continue
            tag = node.tag
            if tag == "-text":
                txt = _WS.sub(" ", node.text_content or "")
                if txt.strip() or not (pieces and isinstance(pieces[-1], int)):
                    pieces.append(txt)
            elif tag == "br":
                pieces.append(1)
            elif tag == "pre":  # keep its spacing: spaces travel as NUL (the parser never yields NUL)
                brk(2)
                pieces.append((node.text(deep=True) or "").replace(" ", "\0"))
                brk(2)
            elif tag not in drop and not tag.startswith("-"):
                n = 2 if tag in _PARAGRAPH_TAGS else 1 if tag in _LINE_TAGS else 0
                brk(n)
                stack.append(n)
                stack.extend(reversed(list(node.iter(include_text=True))))
        text = "".join("\n" * p if isinstance(p, int) else p for p in pieces)
        return "\n".join(line.strip(" ").replace("\0", " ") for line in text.split("\n")).strip()


@dataclass
class Normalize:
    """ftfy mojibake repair (optional) then Unicode normalisation `form`; curly quotes are kept.

    Pure-ASCII text is returned unchanged without calling ftfy (HTML entities are decoded by `HtmlToText`).
    """

    name: ClassVar[str] = "normalize"
    kind: ClassVar[str] = "clean"
    form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFC"
    fix_mojibake: bool = True
    __pydantic_config__ = _CONFIG

    def __call__(self, text: str) -> str:
        if text.isascii():  # ASCII holds no mojibake and is invariant under every normal form
            return text
        if self.fix_mojibake:
            import ftfy

            return ftfy.fix_text(text, normalization=self.form, uncurl_quotes=False, unescape_html="auto")
        return unicodedata.normalize(self.form, text)


def _whitespace_table() -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    for cp in range(0x20):
        if chr(cp) not in "\t\n":
            table[cp] = None
    table[0x0D] = "\n"  # lone CR becomes a line break (CRLF is folded first)
    table[0x0B] = table[0x0C] = "\n"
    for cp in range(0x7F, 0xA0):
        table[cp] = None
    for cp in (0x00AD, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x180E):
        table[cp] = None  # invisible: soft hyphen, zero-width (non-)joiners, word joiner, BOM
    for cp in (0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000):
        table[cp] = " "
    table[0x2028] = table[0x2029] = table[0x85] = "\n"
    return table


_WS_TABLE = _whitespace_table()
_INNER_SPACES = re.compile(r"(?<=\S)(?:[ \t]{2,}|\t)")
_TRAILING = re.compile(r"[ \t]+(?=\n|$)")
_BLANKS = re.compile(r"\n{3,}")
_BLANK_LINES = re.compile(r"\n[ \t]+(?=\n)")


@dataclass
class Whitespace:
    """Remove control/invisible characters, unify line breaks and spaces, keep at most one blank line.

    Runs of spaces/tabs inside a line become one space; leading indentation is kept (code, verse).
    """

    name: ClassVar[str] = "whitespace"
    kind: ClassVar[str] = "clean"
    __pydantic_config__ = _CONFIG

    def __call__(self, text: str) -> str:
        text = text.replace("\r\n", "\n").translate(_WS_TABLE)
        text = _INNER_SPACES.sub(" ", text)
        text = _TRAILING.sub("", text)
        text = _BLANK_LINES.sub("\n", text)
        text = _BLANKS.sub("\n\n", text)
        return text.strip("\n").rstrip() if text[:1] in (" ", "\t") else text.strip()


_DEFAULT_PATTERNS = [
    r"\bcookies?\b",
    r"\bjavascript\b",
    r"\ball rights reserved\b",
    r"\bterms of (?:use|service)\b",
    r"\bprivacy policy\b",
    r"\bclick here\b",
    r"\bsubscribe to (?:our|the) newsletter\b",
    r"\b(?:log|sign) ?in to (?:continue|comment)\b",
    r"\bskip to (?:main )?content\b",
]


@dataclass
class BoilerplateLines(RebuiltOnUnpickle):
    """Drop lines matching any of `patterns` (case-insensitive regexes) when they have at most
    `max_words` words, and lines of at most `repeated_max_words` words that occur `repeated_min` or
    more times in the document (running headers/footers); `repeated_min: null` turns that off."""

    name: ClassVar[str] = "boilerplate"
    kind: ClassVar[str] = "clean"
    patterns: list[str] = field(default_factory=lambda: list(_DEFAULT_PATTERNS))
    max_words: int | None = 40
    repeated_min: int | None = None
    repeated_max_words: int = 12
    __pydantic_config__ = _CONFIG

    def __post_init__(self) -> None:
        self._regex = re.compile("|".join(f"(?:{p})" for p in self.patterns), re.I) if self.patterns else None

    def __call__(self, text: str) -> str:
        lines = text.split("\n")
        repeated: set[str] = set()
        if self.repeated_min:
            counts = Counter(s for s in (ln.strip() for ln in lines) if s)
            repeated = {
                s for s, c in counts.items() if c >= self.repeated_min and len(s.split()) <= self.repeated_max_words
            }
        kept = []
        for line in lines:
            stripped = line.strip()
            if stripped and stripped in repeated:
                continue
            if (
                self._regex is not None
                and (self.max_words is None or len(stripped.split()) <= self.max_words)
                and self._regex.search(stripped)
            ):
                continue
            kept.append(line)
        return "\n".join(kept).strip() if len(kept) != len(lines) else text
