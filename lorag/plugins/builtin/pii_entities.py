"""Finding personal data and secrets in text: patterns plus the checks that make them precise.

A pattern finds candidates; a checksum or a structural rule keeps only real ones
(Luhn for card numbers, ISO 7064 mod 97 for IBANs, the GB 11643 check digit and a
real birth date for Chinese resident IDs, `ipaddress` for IPs, numbering plans for
phones), so "1234 5678 9012 3456" or an order number is left alone.

`find_entities(text, start=, final=)` serves the streaming filter: it reports
only entities that reach past `start`. The stream never applies an edit that
touches the end of a window that is not final: it holds the text back and asks
again with more. So while `final` is False the start of an e-mail address or a
JWT that runs past the end of the window is reported too, which keeps even an
entity longer than the window from leaking its beginning.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

KINDS = ("SECRET", "EMAIL", "IBAN", "CN_ID", "CARD", "PHONE", "IP")
PRIORITY = {kind: rank for rank, kind in enumerate(KINDS)}


@dataclass(frozen=True, slots=True)
class Entity:
    kind: str
    start: int
    end: int

    def value(self, text: str) -> str:
        return text[self.start:self.end]


# -- checksums -------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_ok(iban: str) -> bool:
    if IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    rotated = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rotated)) % 97 == 1


_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_CHECK = "10X98765432"


def cn_id_ok(number: str) -> bool:
    number = number.upper()
    try:
        datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _CN_WEIGHTS, strict=True))
    return _CN_CHECK[total % 11] == number[17]


# -- detectors: (start, end) spans of real entities --------------------------------

Finder = Callable[[str], Iterator[tuple[int, int]]]

EMAIL_RE = re.compile(
    r"(?<![\w.%+-])[\w.%+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9-])"
)


def find_emails(text: str) -> Iterator[tuple[int, int]]:
    if "@" not in text:
        return
    for m in EMAIL_RE.finditer(text):
        local = m.group().split("@", 1)[0]
        if not (local.startswith(".") or local.endswith(".") or ".." in local):
            yield m.span()


CARD_RE = re.compile(r"(?<![\w.,])\d(?:[ -]?\d){12,22}(?![\d])")
_GROUP_RE = re.compile(r"\d+")
_IBAN_HEAD_RE = re.compile(r"[A-Z]{2}\d{2} $")  # "DE89 " before digit groups: an IBAN, not a card


def find_cards(text: str) -> Iterator[tuple[int, int]]:
    """13-19 digits, optionally in groups; the longest Luhn-valid run of whole groups."""
    for m in CARD_RE.finditer(text):
        groups = [(g.start() + m.start(), g.end() + m.start()) for g in _GROUP_RE.finditer(m.group())]
        best: tuple[int, int] | None = None
        for i in range(len(groups)):
            digits = ""
            for j in range(i, len(groups)):
                digits += text[groups[j][0]:groups[j][1]]
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and luhn_ok(digits) and digits[0] != "0":
                    span = (groups[i][0], groups[j][1])
                    if best is None or span[1] - span[0] > best[1] - best[0]:
                        best = span
        if best is not None and not _IBAN_HEAD_RE.search(text, max(0, best[0] - 5), best[0]):
            yield best


IBAN_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")


def find_ibans(text: str) -> Iterator[tuple[int, int]]:
    for m in IBAN_RE.finditer(text):
        length = IBAN_LENGTHS.get(m.group()[:2])
        if length is None:
            continue
        chars, end = [], m.start()
        for i in range(m.start(), m.end()):
            if text[i] != " ":
                chars.append(text[i])
                if len(chars) == length:
                    end = i + 1
                    break
        if len(chars) != length or (end < len(text) and text[end].isalnum()):
            continue
        if iban_ok("".join(chars)):
            yield (m.start(), end)


CN_ID_RE = re.compile(
    r"(?<![0-9A-Za-z])[1-8]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
    r"(?![0-9A-Za-z])"
)


def find_cn_ids(text: str) -> Iterator[tuple[int, int]]:
    for m in CN_ID_RE.finditer(text):
        if cn_id_ok(m.group()):
            yield m.span()


CN_MOBILE_RE = re.compile(r"(?<![\d+])(?<!\d[ -])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
INTL_PHONE_RE = re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+|\b00)[1-9](?:[ .-]?\(?\d{1,5}\)?){2,7}(?![\d])")
NANP_RE = re.compile(r"(?<![\w+-])(?<!\d[ .])(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}(?![\w-])")


def find_phones(text: str) -> Iterator[tuple[int, int]]:
    """Chinese mobiles, E.164 with + or 00, North American; never the tail of a longer digit run."""
    yield from (m.span() for m in CN_MOBILE_RE.finditer(text))
    for m in INTL_PHONE_RE.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if m.group().startswith("00"):
            digits = digits[2:]
        if 8 <= len(digits) <= 15:
            yield m.span()
    for m in NANP_RE.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if digits[0] in "23456789" and digits[3] in "23456789":
            yield m.span()


IPV4_RE = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d]|\.\d)")
IPV6_RE = re.compile(r"(?<![0-9A-Za-z:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z:])")


def find_ips(text: str) -> Iterator[tuple[int, int]]:
    for m in IPV4_RE.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield m.span()
    if "::" in text or text.count(":") >= 7:
        for m in IPV6_RE.finditer(text):
            candidate = m.group()
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            if sum(1 for group in candidate.split(":") if group) >= 2:
                yield m.span()


# Secrets: known key formats, one alternation (one pass).
_SECRET_ALTERNATIVES = {
    "aws": r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])",
    "github": r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,}|\bgithub_pat_[A-Za-z0-9_]{22,}",
    "gitlab": r"\bglpat-[A-Za-z0-9_-]{20,}",
    "openai": r"\bsk-(?:proj-|svcacct-|admin-|ant-[a-z0-9]+-)?(?=[A-Za-z_-]*\d)(?=[\d_-]*[A-Za-z])"
                r"[A-Za-z0-9_-]{20,}",  # OpenAI, Anthropic: digits and letters, so not "sk-learn-..."
    "slack": r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    "stripe": r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}",
    "google": r"\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])",
    "jwt": r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    "pem": r"-----BEGIN [A-Z ]{0,20}PRIVATE KEY-----(?:[\s\S]*?-----END [A-Z ]{0,20}PRIVATE KEY-----|[\s\S]*\Z)",
}
SECRET_RE = re.compile("|".join(f"(?P<{name}>{body})" for name, body in _SECRET_ALTERNATIVES.items()))
_SECRET_PREFILTER = re.compile(r"AKIA|ASIA|ABIA|ACCA|gh[pousr]_|github_pat_|glpat-|sk-|xox|_live_|_test_|"
                               r"AIza|eyJ|PRIVATE KEY")
KEYED_SECRET_RE = re.compile(
    r"(?i)\b(?:api[_-]?key|secret|token|password|passwd|pwd|access[_-]?key)\b[\"']?\s*[:=]\s*[\"']?"
    r"(?P<value>[^\s\"',;]{8,})"
)


def find_secrets(text: str) -> Iterator[tuple[int, int]]:
    if _SECRET_PREFILTER.search(text):
        for m in SECRET_RE.finditer(text):
            yield m.span()
    if "=" in text or ":" in text:
        for m in KEYED_SECRET_RE.finditer(text):
            yield m.span("value")


FINDERS: dict[str, Finder] = {
    "EMAIL": find_emails,
    "IBAN": find_ibans,
    "CN_ID": find_cn_ids,
    "CARD": find_cards,
    "PHONE": find_phones,
    "IP": find_ips,
}
_HAS_DIGIT = re.compile(r"\d")


# Beginnings of entities cut off by the end of a (non-final) window.
_PARTIAL_AT_END = (
    ("EMAIL", "@", re.compile(r"(?<![\w.%+-])[\w.%+-]{1,64}@[A-Za-z0-9.-]*\Z")),
    ("SECRET", "eyJ", re.compile(r"\beyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){0,2}\Z")),
)


def find_entities(text: str, kinds: frozenset[str] | set[str] = frozenset(KINDS), *,
                  start: int = 0, final: bool = True) -> list[Entity]:
    """Non-overlapping entities ending after `start`, leftmost first, longest and most specific winning."""
    found: list[Entity] = []
    has_digit = _HAS_DIGIT.search(text) is not None
    for kind, finder in FINDERS.items():
        if kind not in kinds or (kind != "EMAIL" and not has_digit):
            continue
        found += [Entity(kind, s, e) for s, e in finder(text) if e > start]
    if "SECRET" in kinds:
        found += [Entity("SECRET", s, e) for s, e in find_secrets(text) if e > start]
    if not final:
        for kind, marker, pattern in _PARTIAL_AT_END:
            if kind in kinds and marker in text:
                m = pattern.search(text)
                if m is not None:
                    found.append(Entity(kind, m.start(), len(text)))
    found.sort(key=lambda ent: (ent.start, -(ent.end - ent.start), PRIORITY[ent.kind]))
    chosen: list[Entity] = []
    for ent in found:
        if chosen and ent.start < chosen[-1].end:
            last = chosen[-1]
            if ent.end > last.end:  # overlapping finds: cover both, so no tail is left out
                chosen[-1] = Entity(last.kind, last.start, ent.end)
            continue
        chosen.append(ent)
    return chosen
