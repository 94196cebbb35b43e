"""Personal data in text: detection, counting, masked examples and redaction with typed placeholders.

Kinds and what makes a match count (precision first; every candidate is validated, not just pattern-matched):

- ``EMAIL``: ``local@domain.tld`` with a 2+ letter top-level domain.
- ``IBAN``: country code, 2 check digits, 11-30 letters/digits (optionally in groups of 4), whose ISO 13616
  mod-97 checksum is 1.
- ``CREDIT_CARD``: 13-19 digits, optionally grouped by one kind of separator (space or dash), with a
  card-network prefix (2, 3, 4, 5 or 6) and a valid Luhn checksum: a 16-digit number failing Luhn is not a card.
- ``IP``: IPv4 dotted quads with every octet 0-255, and IPv6 addresses (checked by ``ipaddress``, at least two
  non-empty groups and four hex digits, so ``::1``-style slices of code are not addresses). A dotted quad that
  reads as a version is *not* an IP: preceded by ``v``, ``==``/``>=``/``<=``/``~=``, ``@``, a letter and ``-``
  or ``_`` (``python-3.12.1.0``), a version word (version, release, ver, build) within 16 characters before it,
  or part of a longer dotted run (``1.2.3.4.5``). A bare ``1.2.3.4`` is counted: it *is* a valid address.
- ``PHONE``: international numbers (``+`` country code) or national formats with a trunk ``0``, an area code in
  parentheses, or ``NNN-NNN-NNNN`` / ``NNN.NNN.NNNN``; 7-15 digits (E.164). Dates (``2024-01-15``,
  ``15.01.2024``), times and plain digit runs are not phones.

Spans never overlap: kinds are matched in the order above and a later candidate overlapping an accepted one
is dropped (an e-mail's digits are not a phone). ``redact`` and ``scan`` use the same detector, so what the
profile counts is exactly what ``data prepare --redact-pii`` replaces.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fmforge.data.fastscan import digit_runs

KINDS = ("EMAIL", "PHONE", "IP", "CREDIT_CARD", "IBAN")
PLACEHOLDERS = {kind: f"<{kind}>" for kind in KINDS}
EXAMPLES_PER_KIND = 5

# Speed: a pattern whose first item is a character set lets the regex engine skip non-candidates in C, so
# each pattern starts with its first character and checks what precedes it with a lookbehind after it.
# E-mail addresses and IPv6 addresses are found from their anchors ("@", ":") outward.
_EMAIL_DOMAIN = re.compile(r"@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}$")
_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"\d(?<![\w.-]\d)(?:[ -]?\d){12,18}(?!\w|[.-]\d)")
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?!\w|\.\d)")
_IPV6_ANCHOR = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6_LEFT = re.compile(r"[0-9A-Fa-f:]{0,40}$")
_IPV6_RIGHT = re.compile(r"[0-9A-Fa-f:]{0,40}")
_PHONE = re.compile(
    r"[+(\d](?<![\w+.-][+(\d])(?:"
    r"(?<=\+)\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,4}){2,5}"  # +44 20 7946 0958, +1 (555) 123-4567
    r"|(?<=\()\d{2,5}\)[ ]?\d{3,4}[ .-]?\d{3,4}"  # (020) 7946 0958
    r"|(?<=\d)\d{2}([-.])\d{3}\1\d{4}"  # 555-123-4567
    r"|(?<=0)\d{1,4}[ /-]\d{3,4}[ -]?\d{2,4}"  # 030 1234567, 0171-1234567
    r")(?![\w]|[.-]\d)")
_DATE = re.compile(r"(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})")
_VERSION_BEFORE = re.compile(r"(?:v|==|>=|<=|~=|@|[A-Za-z][-_])$|\b(?:version|release|ver|build)\W{0,16}$",
                             re.IGNORECASE)


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod-10) checksum of a digit string holds."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, the number mod 97 is 1."""
    s = iban.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _card_ok(value: str) -> bool:
    seps = set(value) - set("0123456789")
    if len(seps) > 1:
        return False
    digits = value.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits)


def _ipv4_ok(text: str, start: int, value: str) -> bool:
    if any(int(octet) > 255 or (len(octet) > 1 and octet[0] == "0") for octet in value.split(".")):
        return False
    return not _VERSION_BEFORE.search(text[max(0, start - 24):start])


def _ipv6_ok(value: str) -> bool:
    groups = [g for g in value.split(":") if g]
    if len(groups) < 2 or sum(len(g) for g in groups) < 4:
        return False
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


def _phone_ok(value: str) -> bool:
    digits = sum(c.isdigit() for c in value)
    if not 7 <= digits <= 15:
        return False
    return not _DATE.fullmatch(value.strip())


def _emails(text: str):
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        local = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
        before = text[local.start() - 1:local.start()] if local is not None else ""
        if local is None or before.isalnum() or (before and before in "._%+-"):
            continue
        yield "EMAIL", local.start(), m.end()


def _ipv6s(text: str):
    last = -1
    for m in _IPV6_ANCHOR.finditer(text):
        if m.start() < last:
            continue
        a = _IPV6_LEFT.search(text, max(0, m.start() - 40), m.start()).start()
        b = _IPV6_RIGHT.match(text, m.end()).end()
        last = b
        before, after = text[a - 1:a], text[b:b + 1]
        if (before and (before.isalnum() or before in "_.:")) or (after and (after.isalnum() or after == "_")):
            continue
        if _ipv6_ok(text[a:b]):
            yield "IP", a, b


# Where to look for the digit-based kinds. A CARD, IPv4 or PHONE match is a run of characters from
# [0-9 ().+/-] that holds at least 7 of them between its first and last digit (13 card digits, 7 characters of
# a dotted quad, 7 phone digits); an IBAN starts with two capital letters and two digits. Each such place
# (``fastscan.digit_runs``) opens a window of _MARGIN characters on either side (longer than any match, so a
# window holds whole matches and their lookarounds); the kinds' own patterns then run inside the merged
# windows only. A run of fewer characters that a window cuts can only hold matches that fail validation, so
# the spans found are exactly those of a scan of the whole text (the tests compare both on real and random
# text).
_MARGIN = 64


def _digit_windows(text: str) -> list[tuple[int, int]]:
    cps = np.frombuffer(text.encode("ascii") if text.isascii() else text.encode("utf-32-le", "surrogatepass"),
                        dtype=np.uint8 if text.isascii() else np.uint32)
    windows: list[tuple[int, int]] = []
    for start, end in digit_runs(cps).tolist():
        a, b = max(0, start - _MARGIN), min(len(text), end + _MARGIN)
        if windows and a <= windows[-1][1]:
            windows[-1] = (windows[-1][0], max(b, windows[-1][1]))
        else:
            windows.append((a, b))
    return windows


def _candidates(text: str, windows: list[tuple[int, int]]):
    """(kind, start, end) of every validated candidate, kind by kind in precedence order; the digit-based kinds
    are searched inside ``windows`` only."""
    if "@" in text:
        yield from _emails(text)
    for a, b in windows:
        for m in _IBAN.finditer(text, a, b):
            if iban_ok(m.group()):
                yield "IBAN", m.start(), m.end()
    for a, b in windows:
        for m in _CARD.finditer(text, a, b):
            if _card_ok(m.group()):
                yield "CREDIT_CARD", m.start(), m.end()
    if ":" in text:
        yield from _ipv6s(text)
    for a, b in windows:
        for m in _IPV4.finditer(text, a, b):
            if _ipv4_ok(text, m.start(), m.group()):
                yield "IP", m.start(), m.end()
    for a, b in windows:
        for m in _PHONE.finditer(text, a, b):
            if _phone_ok(m.group()):
                yield "PHONE", m.start(), m.end()


def find_pii(text: str, windows: list[tuple[int, int]] | None = None) -> list[tuple[str, int, int]]:
    """Non-overlapping (kind, start, end) spans of personal data in ``text``, sorted by start. ``windows``
    (where to search for the digit-based kinds) defaults to the windows around digit runs; ``[(0, len(text))]``
    scans everything, the reference the default must equal."""
    taken: list[tuple[str, int, int]] = []
    for kind, a, b in _candidates(text, _digit_windows(text) if windows is None else windows):
        if not any(a < tb and ta < b for _, ta, tb in taken):
            taken.append((kind, a, b))
    return sorted(taken, key=lambda s: s[1])


def mask(kind: str, value: str) -> str:
    """A recognisable but unusable form of a found value: ``j***@e***.com``, ``***-***-4567``, ``10.*.*.7``."""
    if kind == "EMAIL":
        local, _, domain = value.partition("@")
        host, _, tld = domain.rpartition(".")
        return f"{local[:1]}***@{host[:1]}***.{tld}"
    if kind == "IP":
        sep = ":" if ":" in value else "."
        parts = value.split(sep)
        return sep.join([parts[0]] + ["*"] * (len(parts) - 2) + [parts[-1]])
    keep = 2 if kind == "IBAN" else 0
    tail = 4
    chars = list(value)
    alnum = [i for i, c in enumerate(chars) if c.isalnum()]
    for i in alnum[keep:len(alnum) - tail]:
        chars[i] = "*"
    return "".join(chars)


def redacted_counts(counts: Counter) -> dict[str, int]:
    """The manifest's ``pii_redacted`` entry: every kind, in a fixed order, zeros included."""
    return {kind: int(counts.get(kind, 0)) for kind in KINDS}


def redact(text: str) -> tuple[str, Counter]:
    """``text`` with every found value replaced by its placeholder (``<EMAIL>``, ...), and the counts by kind."""
    spans = find_pii(text)
    if not spans:
        return text, Counter()
    out, last, counts = [], 0, Counter()
    for kind, a, b in spans:
        out.append(text[last:a])
        out.append(PLACEHOLDERS[kind])
        counts[kind] += 1
        last = b
    out.append(text[last:])
    return "".join(out), counts


@dataclass
class PiiScan:
    """Counts by kind, the number of documents with any, and up to ``EXAMPLES_PER_KIND`` masked examples."""

    counts: Counter = field(default_factory=Counter)
    documents_with_pii: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, text: str) -> None:
        spans = find_pii(text)
        if spans:
            self.documents_with_pii += 1
        for kind, a, b in spans:
            self.counts[kind] += 1
            seen = self.examples.setdefault(kind, [])
            masked = mask(kind, text[a:b])
            if len(seen) < EXAMPLES_PER_KIND and masked not in seen:
                seen.append(masked)

    def merge(self, other: PiiScan) -> None:
        self.counts.update(other.counts)
        self.documents_with_pii += other.documents_with_pii
        for kind, values in other.examples.items():
            seen = self.examples.setdefault(kind, [])
            seen += [v for v in values if v not in seen][:EXAMPLES_PER_KIND - len(seen)]

    def to_dict(self) -> dict:
        return {"counts": {k: self.counts.get(k, 0) for k in KINDS}, "documents_with_pii": self.documents_with_pii,
                "examples": {k: self.examples[k] for k in KINDS if k in self.examples}}
