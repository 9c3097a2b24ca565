"""URL filtering for the corpus pipeline (`read.url_field` + `filter.url_blocklist: FILE`): documents
from a listed domain, or any subdomain of one, are rejected with reason `url_blocklist`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from mtnlg_ray.data.columns import with_column
from mtnlg_ray.errors import InputError


def read_blocklist(path: str | Path) -> list[str]:
    """Domains, one a line (lower-cased; blank lines and '#' comments skipped); one clear line if unreadable."""
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
        domains.append(domain)
    return domains


def blocked_domain(url: str, domains: set[str]) -> str | None:
    """The listed domain `url` is on (itself or a parent domain), or None."""
    host = (urlsplit(url if "://" in url else f"//{url}").hostname or "").rstrip(".")
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
