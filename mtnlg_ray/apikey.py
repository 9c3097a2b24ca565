"""API keys as the server holds them: a key's SHA-256, never the key. A leaf: `submit` and the server
both use it, and `submit` need not import Ray Serve to ship a serve job its key's digest."""

from __future__ import annotations

import hashlib
import os


def api_key_digest(key: str) -> str:
    """The SHA-256 of an API key, hex: what a server compares a bearer token's digest with."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# A blank key would let a blank bearer token in: `serve` and `submit serve` refuse it alike.
BLANK_KEY = "expected a non-empty key (leave it unset to serve without one)"


def is_blank(key: str) -> bool:
    return not key.strip()


# The variables `serve` reads a key (or its digest) from.
KEY_VARIABLES = ("MTNLG_API_KEY", "MTNLG_API_KEY_SHA256")


def blank_variable(variable: str, given: str | None) -> str | None:
    """The error for a key variable set to nothing, or None. Click reads an empty variable as unset, so
    `MTNLG_API_KEY= mtnlg-ray serve` (a key from an empty shell variable) would serve with no key at all."""
    if given is None and variable in os.environ and is_blank(os.environ[variable]):
        what = "the key's SHA-256" if variable.endswith("_SHA256") else "the key"
        return f"{variable} is set but empty; set it to {what} (or unset it to serve without a key)"
    return None
