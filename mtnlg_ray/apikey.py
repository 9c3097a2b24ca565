"""API keys as the server holds them: a key's SHA-256, never the key. A leaf: `submit` and the server
both use it, and `submit` need not import Ray Serve to ship a serve job its key's digest."""

from __future__ import annotations

import hashlib


def api_key_digest(key: str) -> str:
    """The SHA-256 of an API key, hex: what a server compares a bearer token's digest with."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# A blank key would let a blank bearer token in: `serve` and `submit serve` refuse it alike.
BLANK_KEY = "expected a non-empty key (leave it unset to serve without one)"


def is_blank(key: str) -> bool:
    return not key.strip()
