"""PII redaction for the corpus pipeline (`pii.redact: true`): e-mail addresses, phone numbers, IP
addresses and payment card numbers become `<EMAIL>`, `<PHONE>`, `<IP>` and `<CARD>`.

Patterns are strict where look-alikes are common: an IPv4 address needs four octets of at most 255, a
card number must pass the Luhn check in a card's grouping, a phone number needs a phone's shape (a
leading `+` country code, or North America's 3-3-4 digits), so dates, seasons ("+15 2023-24"), version
numbers and ISBNs stay.
Runs after the language filter and before cleaning; the manifest counts replacements by kind.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

import pyarrow as pa

from mtnlg_ray.data.clean import OTHER_SPACES
from mtnlg_ray.data.columns import with_column

# The local part in any script, as mail servers take it (_john@..., josé@...).
EMAIL = re.compile(r"(?<![\w.+-])\w[\w.%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# 16 digits in fours, Amex's 4-6-5, or an unbroken 15 or 16; separators one space or dash.
CARD = re.compile(r"(?<![\d-])(?:\d{4}([ -]?)\d{4}\1\d{4}\1\d{4}|\d{4}([ -]?)\d{6}\2\d{5})(?![\d-])")
# Not inside a longer dotted number or a word ("v1.2.3.4"); a full stop may end the sentence after it.
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
# A four-part number right after one of these words (whole words: "server 10.0.0.1" is an address),
# or after a camel-cased ...Version (AssemblyVersion("1.0.0.0")), is a version, not an address.
VERSION_WORDS = re.compile(r"(?:\b(?i:version|versions|release|ver|v|build|update|python|firmware)"
                           r"|(?<=[a-z])Version)[\s\"'(<>=:.]*$")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"  # +44 20 7946 0958, +33 1 23 45 67 89
    r"|(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[.-]\d{4}"  # (415) 555-0134, 415-555-0134, 415.555.0134, 415 555-0134
    r"|(?:\(\d{3}\)|\d{3}) \d{3} \d{4}"  # 415 555 0134, (415) 555 0134
    r")(?!\w)"
)
KINDS = ("email", "phone", "ip", "card")
_ODD_SPACES = re.compile(f"[{OTHER_SPACES}]")  # what cleaning makes plain spaces, but one by one


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def redact(text: str) -> tuple[str, Counter[str]]:
    """`text` with every e-mail, card number, IP address and phone number replaced; counts by kind.

    Runs before cleaning, so the spaces cleaning makes plain are made plain here first: a phone or card
    number written with no-break spaces (French typography does) became one the patterns match only
    after it had passed them."""
    counts: Counter[str] = Counter()
    text = _ODD_SPACES.sub(" ", text)

    def replace(kind: str, placeholder: str, valid=None):
        def substitute(match: re.Match) -> str:
            if valid is not None and not valid(match):
                return match.group(0)
            counts[kind] += 1
            return placeholder

        return substitute

    text = EMAIL.sub(replace("email", "<EMAIL>"), text)
    text = CARD.sub(replace("card", "<CARD>", lambda m: luhn_valid(re.sub(r"\D", "", m.group(0)))), text)
    text = IPV4.sub(replace("ip", "<IP>", _ipv4), text)
    text = IPV6.sub(replace("ip", "<IP>", _ipv6), text)
    text = PHONE.sub(replace("phone", "<PHONE>", _phone), text)
    return text, counts


# What follows a signed number in sports and finance: a season or fiscal year ("+15 2023-24").
_SEASON = re.compile(r"\+\d{1,3} (?:19|20)\d\d[-/]\d\d")


def _phone(match: re.Match) -> bool:
    """7 to 15 digits, and not signed decimals ("+1.25 120.50", "+123.45") or a signed number and a
    season ("+15 2023-24"), which the `+` form matches."""
    number = match.group(0)
    return (7 <= len(re.sub(r"\D", "", number)) <= 15 and not re.search(r"\d\.\d{2}(?!\d)", number)
            and not _SEASON.fullmatch(number))


def _ipv4(match: re.Match) -> bool:
    if VERSION_WORDS.search(match.string, max(0, match.start() - 24), match.start()):
        return False
    return all(int(part) <= 255 and (part == "0" or not part.startswith("0")) for part in match.group(0).split("."))


def _ipv6(match: re.Match) -> bool:
    candidate = match.group(0)
    # At least one hex letter or a '::', so times like 12:30:45 stay; and at least three groups, so
    # code stays: slices (x[::2], x[1::2]) and Haskell's `f :: Int`.
    if "::" not in candidate and not re.search(r"[A-Fa-f]", candidate):
        return False
    if sum(1 for group in candidate.split(":") if group) < 3:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def redact_batch(batch: pa.Table) -> pa.Table:
    """Redact `text`; add one column per kind with the replacements made in each document (and empty
    `reason` / `detail`: redaction rejects nothing)."""
    texts, counts = [], {kind: [] for kind in KINDS}
    for text in batch.column("text").to_pylist():
        clean, found = redact(text)
        texts.append(clean)
        for kind in KINDS:
            counts[kind].append(found[kind])
    batch = with_column(batch, "text", pa.array(texts, pa.string()))
    for kind in KINDS:
        batch = with_column(batch, f"pii_{kind}", pa.array(counts[kind], pa.int64()))
    nothing = pa.array([""] * batch.num_rows, pa.string())
    return with_column(with_column(batch, "reason", nothing), "detail", nothing)
