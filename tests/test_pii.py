"""Personal-data detection: every kind found where it is, and not found where it only looks like it
(precision matters: a profile that calls every version string an IP address is noise), masking, redaction."""

import random
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from fmforge.data.pii import KINDS, PiiScan, find_pii, iban_ok, luhn_ok, mask, redact

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def found(text: str) -> list[tuple[str, str]]:
    return [(kind, text[a:b]) for kind, a, b in find_pii(text)]


@pytest.mark.parametrize("text, expected", [
    ("write to john.doe+news@mail.example.co.uk today", [("EMAIL", "john.doe+news@mail.example.co.uk")]),
    ("card 4111 1111 1111 1111.", [("CREDIT_CARD", "4111 1111 1111 1111")]),
    ("amex 3782-822463-10005 ok", [("CREDIT_CARD", "3782-822463-10005")]),
    ("visa 4012888888881881", [("CREDIT_CARD", "4012888888881881")]),
    ("iban GB82 WEST 1234 5698 7654 32 end", [("IBAN", "GB82 WEST 1234 5698 7654 32")]),
    ("IBAN: DE89370400440532013000.", [("IBAN", "DE89370400440532013000")]),
    ("the server 192.168.10.20 runs", [("IP", "192.168.10.20")]),
    ("from 192.168.1.20 and 8.8.8.8", [("IP", "192.168.1.20"), ("IP", "8.8.8.8")]),
    ("listen on 10.0.0.1:8080", [("IP", "10.0.0.1")]),
    ("v6 2001:db8::ff00:42:8329 and fe80::1ff:fe23:4567:890a", [("IP", "2001:db8::ff00:42:8329"),
                                                                ("IP", "fe80::1ff:fe23:4567:890a")]),
    ("call +44 20 7946 0958 now", [("PHONE", "+44 20 7946 0958")]),
    ("tel: +1 (555) 123-4567.", [("PHONE", "+1 (555) 123-4567")]),
    ("us 555-123-4567, uk (020) 7946 0958, de 030 1234567",
     [("PHONE", "555-123-4567"), ("PHONE", "(020) 7946 0958"), ("PHONE", "030 1234567")]),
])
def test_each_kind_is_found_exactly_where_it_is(text, expected):
    assert found(text) == expected


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1112",  # 16 digits failing Luhn: not a card
    "order 1234567812345678",  # Luhn fails
    "id 0000000000000000",  # passes Luhn, but no card network starts with 0
    "GB82 WEST 1234 5698 7654 33",  # IBAN shape, checksum wrong
    "version 1.2.3.4", "pkg==1.2.3.4", "requires >=2.0.1.3", "v1.2.3.4", "python-3.12.1.0", "release 10.0.19041.1",
    "1.2.3.4.5", "999.1.1.1", "01.02.03.04",  # a longer dotted run, an octet over 255, leading zeros
    "a[1::2] std::vector<int> ::1 12:30:45 dict[::]",  # slices, scopes, loopback, times
    "on 2024-01-15 or 15.01.2024 or 12/05/2023",  # dates are not phones
    "pi 3.14159265 and 1234567 and 123 456",  # plain numbers
    "@property decorators and user@localhost",  # no dotted domain
])
def test_lookalikes_are_not_personal_data(text):
    assert found(text) == []


def test_spans_do_not_overlap_and_an_email_is_not_also_a_phone():
    text = "mail 5551234567@example.com or 555-123-4567"
    assert found(text) == [("EMAIL", "5551234567@example.com"), ("PHONE", "555-123-4567")]


def test_checksums_match_their_definitions():
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert iban_ok("GB82WEST12345698765432") and iban_ok("FR14 2004 1010 0505 0001 3M02 606")
    assert not iban_ok("GB82WEST12345698765431") and not iban_ok("GB82")


def test_masked_examples_keep_the_shape_but_not_the_value():
    assert mask("EMAIL", "john.doe@example.com") == "j***@e***.com"
    assert mask("CREDIT_CARD", "4111 1111 1111 1234") == "**** **** **** 1234"
    assert mask("IP", "192.168.1.20") == "192.*.*.20"
    assert mask("IBAN", "GB82WEST12345698765432") == "GB****************5432"
    assert mask("PHONE", "555-123-4567") == "***-***-4567"


def test_redact_replaces_with_typed_placeholders_and_counts():
    text = ("Ann <ann@corp.io>, +49 30 1234567, card 4111-1111-1111-1111, host 10.1.2.3, "
            "IBAN DE89 3704 0044 0532 0130 00, version 1.2.3.4")
    out, counts = redact(text)
    assert out == ("Ann <<EMAIL>>, <PHONE>, card <CREDIT_CARD>, host <IP>, IBAN <IBAN>, version 1.2.3.4")
    assert counts == {"EMAIL": 1, "PHONE": 1, "CREDIT_CARD": 1, "IP": 1, "IBAN": 1}
    assert redact(out) == (out, {})  # placeholders are not personal data: redaction is idempotent


def test_scan_counts_documents_and_keeps_a_few_distinct_masked_examples():
    scan, other = PiiScan(), PiiScan()
    for i in range(8):
        scan.add(f"{chr(98 + i)}x@example.com wrote")
    scan.add("nothing here")
    other.add("a@b.org and 8.8.4.4")
    scan.merge(other)
    d = scan.to_dict()
    assert d["counts"] == {"EMAIL": 9, "PHONE": 0, "IP": 1, "CREDIT_CARD": 0, "IBAN": 0}
    assert d["documents_with_pii"] == 9
    assert len(d["examples"]["EMAIL"]) == 5 and d["examples"]["IP"] == ["8.*.*.4"]
    assert all("example" not in e for e in d["examples"]["EMAIL"])


_PIECES = ["+44 20 7946 0958", "(020) 7946 0958", "555-123-4567", "4111 1111 1111 1111",
           "GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "192.168.0.1", "v1.2.3.4", "version 10.0.0.1",
           "2001:db8::8a2e:370:7334", "john.doe@example.com", "030 1234567", "2024-01-15", "1.2.3.4.5",
           "0171-1234567"]


def test_searching_only_around_digit_runs_finds_exactly_what_a_whole_text_scan_finds():
    """The windowed search (the speed path) against the whole-text scan, on random strings built from PII,
    lookalikes and characters that make or break a match, and on real source files with many digits."""
    rng = random.Random(0)
    alphabet = "0123456789 ().+/-:@ABCDEGKXvabe\nx_=.,"
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in ("ipaddress.py", "datetime.py")]
    for _ in range(3000):
        texts.append("".join(rng.choice(_PIECES) if rng.random() < 0.4 else
                             "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 90)))
                             for _ in range(rng.randint(1, 12))))
    kinds: Counter = Counter()
    for text in texts:
        spans = find_pii(text)
        assert spans == find_pii(text, [(0, len(text))]), repr(text[:80])
        kinds.update(kind for kind, _, _ in spans)
    assert set(kinds) == set(KINDS) and min(kinds.values()) > 50, kinds  # every kind is exercised
