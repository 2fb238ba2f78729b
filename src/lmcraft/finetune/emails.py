"""Reduce a raw RFC 822 e-mail to what a reader sees: the Subject line and the decoded text body.

Raw corpora such as SpamAssassin keep every header (Received chains, list servers, spam-filter stamps).
Those identify the collection an e-mail came from rather than what it says, so a classifier trained on
them learns the routing; `email_text` drops them. The body is the first text/plain part (else text/html
with the tags removed by lmcraft.data.clean.HtmlToText), decoded from its transfer encoding and charset,
with whitespace runs collapsed.
"""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage

from lmcraft.data.clean import HtmlToText

__all__ = ["email_text"]

_SPACE = re.compile(r"\s+")


def _part_text(part: EmailMessage) -> str:
    try:
        return str(part.get_content())
    except (LookupError, UnicodeError, AssertionError, ValueError):  # unknown charset, broken encoding
        payload = part.get_payload(decode=True)
        return payload.decode("latin-1") if isinstance(payload, bytes) else str(payload or "")


def email_text(raw: str) -> str:
    """`Subject: ...` then the body text, whitespace collapsed; a text without headers is returned collapsed."""
    message = email.message_from_string(raw, policy=email.policy.default)
    if not isinstance(message, EmailMessage) or not message.keys():
        return _SPACE.sub(" ", raw).strip()
    subject = str(message.get("Subject", "") or "")
    body = message.get_body(preferencelist=("plain", "html"))
    text = ""
    if body is not None:
        text = _part_text(body)
        if body.get_content_subtype() == "html":
            text = HtmlToText(only_if_html=False)(text)
    return _SPACE.sub(" ", f"Subject: {subject}\n{text}").strip()
