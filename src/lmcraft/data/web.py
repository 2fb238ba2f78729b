"""Web input for prepare: HTML pages and WARC archives, main content extracted by trafilatura.

WARC (ISO 28500; WARC/1.0 and 1.1) is parsed here, record by record from a byte stream: a version line
(`WARC/1.1`), header lines `Name: value` up to an empty line, then exactly `Content-Length` bytes of block,
then two CRLFs. A `.warc.gz` file is a series of gzip members (one per record), which `gzip` reads as one
stream. Records used as documents:

- `response` with an HTTP message block (`Content-Type: application/http`): the HTTP status line and headers
  are skipped; a 2xx `text/html` (or XHTML) payload is a page;
- `resource` with an HTML `Content-Type`: the block is the page;
- `conversion` (WET files): the block is already plain text.

Other record types (warcinfo, request, metadata, revisit) carry no page and are passed over; a response that is
not HTML (an image, a PDF) or has no main text is counted as skipped input (`not_html`, `no_main_text`).

Main content: `trafilatura.extract` (boilerplate removal, Barbaresi 2021) on the raw bytes (it detects the
charset). Metadata per document: `url` (WARC-Target-URI, else the page's canonical link), `language`
(WARC-Identified-Content-Language's first code, else the `<html lang>` attribute's primary subtag) when known.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from typing import IO, Any

from lmcraft.errors import ConfigError

__all__ = ["WarcRecord", "extract_main_text", "html_language", "iter_warc", "read_html", "read_warc"]

_HTML_LANG = re.compile(rb"<html\b[^>]*?\blang\s*=\s*[\"']?([A-Za-z]{2,3})", re.I)
_HTML_TYPES = ("text/html", "application/xhtml+xml")


class WarcFormatError(ValueError):
    """The stream is not a well-formed WARC file at `offset`."""


class WarcRecord:
    """One WARC record: its headers (names lower-cased) and its content block."""

    __slots__ = ("headers", "block", "offset")

    def __init__(self, headers: dict[str, str], block: bytes, offset: int) -> None:
        self.headers, self.block, self.offset = headers, block, offset

    @property
    def type(self) -> str:
        return self.headers.get("warc-type", "").lower()


def iter_warc(fh: IO[bytes]) -> Iterator[WarcRecord]:
    """The records of a WARC stream; raises `WarcFormatError` naming the byte offset of a malformed record."""
    offset = 0
    while True:
        line = fh.readline()
        while line in (b"\r\n", b"\n"):  # the CRLF CRLF after a block, or blank lines between records
            offset += len(line)
            line = fh.readline()
        if not line:
            return
        start = offset
        if not line.startswith(b"WARC/"):
            raise WarcFormatError(f"a WARC version line (WARC/1.0 or WARC/1.1) at byte {start}, got "
                                  f"{line[:40]!r}")
        offset += len(line)
        headers: dict[str, str] = {}
        while True:
            line = fh.readline()
            offset += len(line)
            if not line:
                raise WarcFormatError(f"the headers of the record at byte {start} to end with an empty line")
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.decode("utf-8", "replace").partition(":")
            if not sep:
                raise WarcFormatError(f"a 'Name: value' header line in the record at byte {start}, got "
                                      f"{line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        try:
            length = int(headers["content-length"])
        except (KeyError, ValueError):
            raise WarcFormatError(f"a numeric Content-Length header in the record at byte {start}") from None
        block = fh.read(length)
        offset += len(block)
        if len(block) != length:
            raise WarcFormatError(f"{length} bytes of content in the record at byte {start}, the file ends after "
                                  f"{len(block)}")
        yield WarcRecord(headers, block, start)


def _split_http(block: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status code, headers lower-cased, body) of an HTTP response message."""
    head, sep, body = block.partition(b"\r\n\r\n")
    if not sep:
        head, _, body = block.partition(b"\n\n")
    lines = head.decode("iso-8859-1").splitlines()
    parts = lines[0].split() if lines else []
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers, body


def html_language(html: bytes) -> str | None:
    """The primary subtag of `<html lang=...>` in the first 4 KiB, lower-cased (`en-GB` -> `en`)."""
    found = _HTML_LANG.search(html, 0, 4096)
    return found.group(1).decode().lower() if found else None


def _trafilatura() -> Any:
    try:
        import trafilatura
    except ImportError as err:
        raise ConfigError(f"reading HTML/WARC input needs trafilatura ({err}): pip install 'lmcraft[web]'") from None
    return trafilatura


def extract_main_text(html: bytes | str, url: str | None = None) -> tuple[str, str | None]:
    """(main text, canonical URL) of a page by trafilatura; the text is "" when it finds no main content."""
    trafilatura = _trafilatura()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trafilatura's FutureWarnings about lxml element truth-testing
        doc = trafilatura.bare_extraction(html, url=url, with_metadata=True, include_comments=False)
    if doc is None:
        return "", url
    data = doc.as_dict() if hasattr(doc, "as_dict") else dict(doc)
    return (data.get("text") or "").strip(), data.get("url") or url


def _meta(url: str | None, language: str | None) -> dict[str, str]:
    return {k: v for k, v in (("url", url), ("language", language)) if v}


Record = tuple[str, Any]


def read_html(fh: IO[bytes], bad: Any) -> Iterator[Record]:
    """One document: the main text of the HTML file (`bad(kind, expected)` makes the skip record)."""
    raw = fh.read()
    text, url = extract_main_text(raw)
    if not text:
        yield "file", bad("no_main_text", "a page with main text (trafilatura found none)")
        return
    yield "file", (text, None, _meta(url, html_language(raw)))


def read_warc(fh: IO[bytes], bad: Any) -> Iterator[Record]:
    """Documents of a WARC stream (see the module docstring); ids are the WARC-Record-ID."""
    try:
        for number, rec in enumerate(iter_warc(fh)):
            where = f"record {number}"
            kind = rec.type
            if kind not in ("response", "resource", "conversion"):
                continue
            url = rec.headers.get("warc-target-uri")
            language = rec.headers.get("warc-identified-content-language", "").split(",")[0].strip() or None
            rec_id = rec.headers.get("warc-record-id", "").strip("<>") or None
            if kind == "conversion":
                text = rec.block.decode("utf-8", "replace").strip()
                if text:
                    yield where, (text, rec_id, _meta(url, language))
                continue
            content_type = rec.headers.get("content-type", "")
            body, page_type = rec.block, content_type
            if kind == "response" and content_type.startswith("application/http"):
                status, http, body = _split_http(rec.block)
                if not 200 <= status < 300:
                    continue  # redirects and errors carry no page
                page_type = http.get("content-type", "")
            if page_type.split(";")[0].strip().lower() not in _HTML_TYPES:
                yield where, bad("not_html", f"an HTML page, got Content-Type {page_type or 'none'!r}")
                continue
            text, canonical = extract_main_text(body, url)
            if not text:
                yield where, bad("no_main_text", "a page with main text (trafilatura found none)")
                continue
            yield where, (text, rec_id, _meta(url or canonical, language or html_language(body)))
    except WarcFormatError as err:
        yield "file", bad("invalid_warc", str(err))
