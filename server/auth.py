"""Device credentials and the admin token.

A device credential is 32 random bytes (urlsafe base64), shown to the agent once
and stored only as its sha256: with that much entropy a slow password hash adds
nothing, and a leaked database does not let anyone connect as a device.
Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_SCHEME = "sha256$"


def new_credential() -> str:
    return secrets.token_urlsafe(32)


def hash_credential(credential: str) -> str:
    return _SCHEME + hashlib.sha256(credential.encode("utf-8")).hexdigest()


def verify_credential(credential: str, stored_hash: str) -> bool:
    if not credential or not stored_hash.startswith(_SCHEME):
        return False
    return hmac.compare_digest(hash_credential(credential), stored_hash)


def new_node_id() -> int:
    """A random 63-bit node id; 0 and 1 are reserved (Flower's coordinator node is 0)."""
    while True:
        node_id = secrets.randbits(63)
        if node_id > 1:
            return node_id


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    """The token of an `authorization: Bearer T` gRPC metadata entry, or ''."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def metadata_value(metadata: tuple[tuple[str, str | bytes], ...] | None, name: str) -> str:
    for key, value in metadata or ():
        if key.lower() == name:
            return value.decode() if isinstance(value, bytes) else value
    return ""


def token_matches(given: str, expected: str | None) -> bool:
    """True when no admin token is configured, or `given` equals it."""
    if not expected:
        return True
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())
