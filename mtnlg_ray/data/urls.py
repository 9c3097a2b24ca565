"""URL filtering for the corpus pipeline (`read.url_field` + `filter.url_blocklist: FILE`): documents
from a listed domain, or any subdomain of one, are rejected with reason `url_blocklist`."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from mtnlg_ray.data.columns import with_column
from mtnlg_ray.errors import InputError


def read_blocklist(path: str | Path) -> list[str]:
    """Domains, one a line (lower-cased, internationalised ones as punycode; blank lines and '#'
    comments skipped); one clear line if unreadable."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"filter.url_blocklist: {path}: cannot be read ({err})") from None
    domains = []
    for number, line in enumerate(lines, start=1):
        domain = line.split("#", 1)[0].strip().lower().rstrip(".")
        if not domain:
            continue
        if "/" in domain or " " in domain:
            raise InputError(f"{path}:{number}: expected a domain such as example.com, got {line.strip()!r}")
        domains.append(ascii_host(domain))
    return domains


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def ascii_host(host: str) -> str:
    """A host name as DNS carries it: an internationalised one ("bücher.de") in its punycode form."""
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:  # not a valid IDN (an empty label, one too long): compare it as it is
        return host.lower()


def blocked_domain(url: str, domains: set[str]) -> str | None:
    """The listed domain `url` is on (itself or a parent domain), or None; `domains` in `ascii_host` form.

    A URL without a scheme ("evil.com/r?next=https://good.org", "//evil.com/x") is read as a host
    and path; only a scheme at its start makes it an absolute URL."""
    if not _SCHEME.match(url) and not url.startswith("//"):
        url = f"//{url}"
    host = ascii_host((urlsplit(url).hostname or "").rstrip("."))
    parts = host.split(".")
    for i in range(len(parts)):
        candidate = ".".join(parts[i:])
        if candidate in domains:
            return candidate
    return None


def url_batch(batch: pa.Table, domains: list[str]) -> pa.Table:
    """Set `reason` / `detail` for documents whose `url` is on a blocked domain."""
    listed = set(domains)
    reasons, details = [], []
    for url in batch.column("url").to_pylist():
        try:
            domain = blocked_domain(url, listed) if url else None
        except ValueError as err:  # urlsplit: "http://[::1" and the like; its domain cannot be checked
            reasons.append("bad_url")
            details.append(f"{url!r}: {err}")
            continue
        reasons.append("url_blocklist" if domain else "")
        details.append(f"{url} is on {domain}" if domain else "")
    batch = with_column(batch, "reason", pa.array(reasons, pa.string()))
    return with_column(batch, "detail", pa.array(details, pa.string()))
