"""PII scrubbing: e-mail addresses, credit-card-like numbers, IP addresses and phone numbers are
replaced by placeholders (`<EMAIL>`, `<CREDIT_CARD>`, `<IP_ADDRESS>`, `<PHONE>`).

Order matters and is fixed: e-mails first (they contain digits and dots), then card numbers (13-19
digits in groups, accepted only when the Luhn checksum holds, so order numbers and ISBNs survive),
then IPv4/IPv6 addresses (each IPv4 octet <= 255), then phone numbers (7-15 digits in the usual
groupings with separators or a leading +, the ITU E.164 maximum). Years, dates, prices, amounts and
plain integers are not matched: a phone needs separators or a "+" and at least 7 digits, may not
touch a comma, "$" or decimal point (parts of larger numbers), and is not a run of years.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

__all__ = ["PiiScrubber", "luhn_valid"]

Kind = Literal["email", "credit_card", "ip", "phone"]

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.]|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:])(?:(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}"
    r"|(?:[0-9a-fA-F]{1,4}:){1,7}:(?:[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{1,4}){0,5})?)(?![\w:])"
)
_PHONE = re.compile(
    r"(?<![\w+$,.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?!\w|[,.]\d)"
    r"|(?<![\w+])\+\d{7,15}(?!\w)"
)


def luhn_valid(digits: str) -> bool:
    """Luhn mod-10 checksum: double every second digit from the right, sum digits, total % 10 == 0."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "<CREDIT_CARD>" if 13 <= len(digits) <= 19 and luhn_valid(digits) else match.group()


def _phone(match: re.Match[str]) -> str:
    text = match.group()
    digits = sum(ch.isdigit() for ch in text)
    if not 7 <= digits <= 15:
        return text
    if re.fullmatch(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}", text):
        return text  # a date
    if not (text.startswith(("+", "(")) or re.search(r"\d[ .-]\d", text)):
        return text
    groups = re.findall(r"\d+", text)
    seps = set(re.findall(r"\d([ .-])\d", text))
    if "." in seps and len(seps) > 1:
        return text  # a decimal followed by another number: "35.02 1810"
    if len(groups) == 2 and " " in seps and not text.startswith(("+", "(")):
        return text  # two space-separated numbers are a table row far more often than a local phone number
    if all(len(g) == 4 and 1000 <= int(g) <= 2199 for g in groups):
        return text  # a list or range of years: "1947 1948 1949", "1943-1948"
    if sum(g == "000" for g in groups) >= 2:
        return text  # an amount with space-separated thousands: "35 000 000"
    return "<PHONE>"


@dataclass
class PiiScrubber:
    """Replace the PII kinds in `kinds` by placeholders; `placeholders` maps a kind to its text."""

    name: ClassVar[str] = "pii"
    kind: ClassVar[str] = "clean"
    kinds: list[Kind] = field(default_factory=lambda: ["email", "credit_card", "ip", "phone"])
    placeholders: dict[str, str] = field(
        default_factory=lambda: {
            "email": "<EMAIL>",
            "credit_card": "<CREDIT_CARD>",
            "ip": "<IP_ADDRESS>",
            "phone": "<PHONE>",
        }
    )
    __pydantic_config__ = {"extra": "forbid"}  # pydantic reads this: unknown keys in a config are errors

    def __call__(self, text: str) -> str:
        if not any(ch.isdigit() or ch == "@" for ch in text):
            return text
        if "email" in self.kinds and "@" in text:
            text = _EMAIL.sub(self.placeholders["email"], text)
        if "credit_card" in self.kinds:
            placeholder = self.placeholders["credit_card"]
            text = _CARD.sub(lambda m: placeholder if _card(m) != m.group() else m.group(), text)
        if "ip" in self.kinds:
            text = _IPV4.sub(self.placeholders["ip"], text)
            if "::" in text or text.count(":") >= 7:
                text = _IPV6.sub(self.placeholders["ip"], text)
        if "phone" in self.kinds:
            placeholder = self.placeholders["phone"]
            text = _PHONE.sub(lambda m: placeholder if _phone(m) != m.group() else m.group(), text)
        return text
