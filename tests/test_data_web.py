"""HTML and WARC input: a hand-made WARC (gzip members, several record types), an HTML page, bad WARC input."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest

from lmcraft.data.readers import ErrorLog, InputSpec, read_file
from lmcraft.data.web import WarcFormatError, iter_warc

ARTICLE = ("The river ran through the city for many years and the people walked along it every day.",
           "The market stood near the castle, and the garden behind it was larger than the square.")
PAGE = ('<html lang="en-GB"><head><title>River</title><link rel="canonical" href="https://example.org/river">'
        '</head><body><nav>Home | About | Contact</nav><article><h1>The river</h1>'
        f'<p>{ARTICLE[0]}</p><p>{ARTICLE[1]}</p></article><footer>Cookie settings</footer></body></html>').encode()


def _record(headers: dict[str, str], block: bytes) -> bytes:
    head = "WARC/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + f"Content-Length: {len(block)}\r\n\r\n").encode() + block + b"\r\n\r\n"


def _warc() -> list[bytes]:
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + PAGE
    return [
        _record({"WARC-Type": "warcinfo", "WARC-Record-ID": "<urn:uuid:info>"}, b"software: hand-made\r\n"),
        _record({"WARC-Type": "request", "WARC-Target-URI": "https://example.org/river"},
                b"GET /river HTTP/1.1\r\n\r\n"),
        _record({"WARC-Type": "response", "WARC-Target-URI": "https://example.org/river",
                 "WARC-Record-ID": "<urn:uuid:page>", "WARC-Identified-Content-Language": "eng",
                 "Content-Type": "application/http; msgtype=response"}, http),
        _record({"WARC-Type": "response", "WARC-Target-URI": "https://example.org/old",
                 "Content-Type": "application/http; msgtype=response"},
                b"HTTP/1.1 301 Moved Permanently\r\nLocation: /river\r\n\r\n"),
        _record({"WARC-Type": "response", "WARC-Target-URI": "https://example.org/logo.png",
                 "Content-Type": "application/http; msgtype=response"},
                b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n"),
        _record({"WARC-Type": "conversion", "WARC-Target-URI": "https://example.org/wet",
                 "WARC-Record-ID": "<urn:uuid:wet>"}, b"Plain text of a WET record."),
    ]


@pytest.fixture
def trafilatura() -> None:
    pytest.importorskip("trafilatura", reason="HTML/WARC extraction needs trafilatura (pip install 'lmcraft[web]')",
                        exc_type=ImportError)


@pytest.mark.parametrize("name", ["crawl.warc", "crawl.warc.gz"])
def test_warc_reader_gives_main_text_url_and_language(tmp_path: Path, name: str, trafilatura: None) -> None:
    path = tmp_path / name
    records = _warc()
    # .warc.gz: one gzip member per record, as crawlers write them
    path.write_bytes(b"".join(gzip.compress(r) for r in records) if name.endswith(".gz") else b"".join(records))
    log = ErrorLog()
    docs = list(read_file(path, InputSpec(path=str(path), licence="CC0-1.0"), log))
    assert [d.id for d in docs] == ["urn:uuid:page", "urn:uuid:wet"]
    page, wet = docs
    assert ARTICLE[0] in page.text and ARTICLE[1] in page.text
    assert "Home | About" not in page.text and "Cookie" not in page.text
    assert page.meta == {"source": str(path), "url": "https://example.org/river", "language": "eng",
                         "licence": "CC0-1.0"}
    assert wet.text == "Plain text of a WET record." and wet.meta["url"] == "https://example.org/wet"
    assert log.counts == {"not_html": 1}  # the image; the redirect and the request are not pages


def test_html_reader_and_language_from_the_page(tmp_path: Path, trafilatura: None) -> None:
    path = tmp_path / "page.html"
    path.write_bytes(PAGE)
    (doc,) = read_file(path, InputSpec(path=str(path), format="html"))
    assert ARTICLE[1] in doc.text and "Home" not in doc.text
    assert doc.meta == {"source": str(path), "url": "https://example.org/river", "language": "en"}


def test_malformed_warc_is_reported_with_its_offset(tmp_path: Path) -> None:
    good = _record({"WARC-Type": "warcinfo"}, b"x")
    with pytest.raises(WarcFormatError, match=f"at byte {len(good)}"):
        list(iter_warc(io.BytesIO(good + b"HTTP/1.1 200 OK\r\n")))
    with pytest.raises(WarcFormatError, match="Content-Length"):
        list(iter_warc(io.BytesIO(b"WARC/1.0\r\nWARC-Type: response\r\n\r\nabc")))
    with pytest.raises(WarcFormatError, match="ends after 3"):
        list(iter_warc(io.BytesIO(b"WARC/1.0\r\nContent-Length: 10\r\n\r\nabc")))
    path = tmp_path / "bad.warc"
    path.write_bytes(good + b"garbage\r\n")
    log = ErrorLog()
    assert list(read_file(path, errors=log)) == [] and log.counts == {"invalid_warc": 1}
