"""Token ids -> text while generating: incremental UTF-8-safe decoding, stop strings, text streamers.

Decoding one token at a time is wrong in two ways: a byte-level token may hold half of a UTF-8
character (decodes to U+FFFD), and SentencePiece-style decoders drop the leading space of the first
token they see. The tokenizer's `StreamDecoder` handles the first (it decodes a short window and hands
out text only once it no longer ends in U+FFFD); seeding it with the last prompt tokens handles the second.

`TextTracker` adds stop strings: it emits text as soon as it is safe, holding back any tail that could
still grow into a stop string, and reports the position of the first stop string found (the emitted
text never contains it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from lmcraft.tokenizer.load import StreamDecoder


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text` for a `tokenizers.Tokenizer` (Encoding.ids) or any tokenizer returning a list."""
    encoded = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return list(getattr(encoded, "ids", encoded))


def decode_ids(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def decode_continuation(
    tokenizer: Any, context: Sequence[int], ids: Sequence[int], skip_special_tokens: bool = True
) -> str:
    """Text of `ids` as it reads after `context`: decode(context + ids) minus decode(context)."""
    head = decode_ids(tokenizer, context, skip_special_tokens)
    full = decode_ids(tokenizer, [*context, *ids], skip_special_tokens)
    return full[len(head):] if full.startswith(head) else decode_ids(tokenizer, ids, skip_special_tokens)


def _stop_prefix_length(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TextTracker:
    """One row's generated text: incremental decoding plus stop-string detection and hold-back."""

    def __init__(
        self,
        tokenizer: Any,
        stop_strings: Sequence[str] = (),
        context: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        if context:
            self.decoder.push(list(context)[-5:])  # decoding context only; its text is not ours
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.longest_stop = max((len(s) for s in self.stop_strings), default=0)
        self.text = ""
        self.emitted = 0
        self.stop_at: int | None = None  # index in `text` where the first stop string starts

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    @property
    def final_text(self) -> str:
        """The text so far, cut before the stop string if one was found."""
        return self.text if self.stop_at is None else self.text[: self.stop_at]

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to show."""
        if self.stop_at is not None:
            return ""
        delta = self.decoder.push(token_id)
        if not delta:
            return ""
        search_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += delta
        hits = [i for s in self.stop_strings if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.stop_at = min(hits)
            return self._emit(self.stop_at)
        return self._emit(len(self.text) - _stop_prefix_length(self.text, self.stop_strings))

    def finish(self) -> str:
        """The held-back rest at the end of generation (nothing after a stop string)."""
        if self.stop_at is None:
            self.text += self.decoder.flush()
            return self._emit(len(self.text))
        return ""

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out


class Streamer(Protocol):
    """Receives each decoding step: one entry per row, the new token id or None for rows already done."""

    def put(self, tokens: list[int | None]) -> None: ...

    def end(self) -> None: ...


class TextStreamer:
    """Writes one row's text as it is generated (UTF-8 safe, stop strings never shown).

    `write` defaults to stdout (flushed after each piece); pass any `str -> None` callable to collect text.
    """

    def __init__(
        self,
        tokenizer: Any,
        write: Callable[[str], object] | None = None,
        stop_strings: Sequence[str] = (),
        row: int = 0,
        context: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tracker = TextTracker(tokenizer, stop_strings, context, skip_special_tokens)
        self.write = write or _write_stdout
        self.row = row

    def put(self, tokens: list[int | None]) -> None:
        token = tokens[self.row]
        if token is not None:
            piece = self.tracker.push(token)
            if piece:
                self.write(piece)

    def end(self) -> None:
        piece = self.tracker.finish()
        if piece:
            self.write(piece)

    @property
    def text(self) -> str:
        return self.tracker.final_text


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
