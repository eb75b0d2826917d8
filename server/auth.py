"""Server-side authentication: the admin token, enrollment tokens, device-signed requests,
and the per-peer limit on failed attempts.

Devices prove themselves with Ed25519 signatures (tinyfleet.common.device_keys); the
coordinator keeps only their public keys, so a leaked database lets nobody act as a
device. Enrollment tokens are 32 random bytes stored as their sha256: with that much
entropy a slow password hash adds nothing. Token comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from tinyfleet.common.device_keys import REQUEST_WINDOW_S, SignedRequest

ENROLLMENT_PREFIX = "tfe_"
#: Failed authentications a peer may make within the window before it is refused outright.
MAX_FAILURES = 10
FAILURE_WINDOW_S = 60.0
#: Peers remembered at most; the least recently failing are forgotten first.
MAX_TRACKED = 10_000
#: Request signatures remembered at most (about 100 bytes each). When that many are still within
#: their window, further signed requests are refused until some expire: never accepted unchecked.
MAX_SIGNATURES = 1_000_000

#: (device id, signed message, signature) -> True when that device exists, is not revoked, and
#: its current key made the signature.
DeviceVerifier = Callable[[str, bytes, bytes], bool]


def new_node_id() -> int:
    """A random 63-bit node id; 0 and 1 are reserved (Flower's coordinator node is 0)."""
    while True:
        node_id = secrets.randbits(63)
        if node_id > 1:
            return node_id


def new_enrollment_token() -> str:
    return ENROLLMENT_PREFIX + secrets.token_urlsafe(32)


def new_enrollment_id() -> str:
    """The public name of an enrollment (listed, revoked by it); not a secret."""
    return secrets.token_hex(6)


def hash_enrollment_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer(authorization: str) -> str:
    """The token of an `Authorization: Bearer T` value (an HTTP header or gRPC metadata), or ''."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of an `authorization: Bearer T` gRPC metadata entry, or ''."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return bearer(value.decode() if isinstance(value, bytes) else value)
    return ""


def is_admin_token(presented: str, configured: str | None) -> bool:
    """Whether a caller presenting `presented` is the admin, on every door the admin token guards:
    the Admin gRPC service, admin registration and artifact downloads on Fleet, /api/*, SPARQL
    Update, directory writes and imports.

    `configured` None means the coordinator runs without an admin token (`server start
    --no-admin-token`, a lab setting): then everyone is the admin and whatever they present is
    accepted, on all of those doors alike (an open admin API could issue enrollment tokens or
    revoke devices anyway, so closing only some doors would protect nothing). Otherwise only
    that token, compared in constant time."""
    if configured is None:
        return True
    return bool(presented) and hmac.compare_digest(presented.encode(), configured.encode())


def peer_key(address: str) -> str:
    """The one key a client's address counts under, whichever transport it came by: canonical
    IP text ("::1", an IPv4-mapped "::ffff:10.0.0.5" -> "10.0.0.5"); other text as given."""
    host = address.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)


def admin_guesses(peer: str) -> str:
    """The key a peer's admin-token failures count under, apart from its other failures: only
    those stop the peer's admin tokens from being compared, so forged device proofs from an
    address never lock its operator out (wrong admin tokens from it do; that is the point)."""
    return f"{peer} (admin token)"


def peer_host(peer: str) -> str:
    """The `peer_key` of a gRPC peer ("ipv4:10.0.0.5:41000" -> "10.0.0.5"). grpc percent-encodes
    IPv6 peers ("ipv6:%5B::1%5D:50326"), so the text is unquoted first."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return peer_key(rest.rpartition(":")[0] or rest)
    return peer


class FailedAuthLimiter:
    """After MAX_FAILURES failed authentications from one peer within the window, that peer is
    refused without being checked until the oldest of those failures leaves the window.

    Only failures count, so a good client is never slowed; refusals made while blocked do
    not count either, so a peer that stops failing is let in again after one window.
    """

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = FAILURE_WINDOW_S) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, peer: str, now: float | None = None) -> float:
        """Seconds until `peer` may try again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            failures = self._failures.get(peer)
            if failures is None:
                return 0.0
            while failures and failures[0] <= now - self.window_s:
                failures.popleft()
            if not failures:
                del self._failures[peer]
                return 0.0
            if len(failures) < self.max_failures:
                return 0.0
            return failures[-self.max_failures] + self.window_s - now

    def failed(self, peer: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            failures = self._failures.pop(peer, None) or deque(maxlen=self.max_failures)
            failures.append(now)
            self._failures[peer] = failures  # most recent last: the oldest peer is evicted first
            while len(self._failures) > MAX_TRACKED:
                self._failures.popitem(last=False)


def too_many_failures(peer: str, wait_s: float) -> str:
    return f"too many failed authentication attempts from {peer}; try again in {max(wait_s, 1):.0f} s"


class ReplayGuard:
    """Request signatures accepted within the clock window, so each one is accepted once.

    A signature is kept until its timestamp leaves the window (at most two windows after it
    was used); after that its timestamp alone refuses it."""

    def __init__(self, window_s: float = REQUEST_WINDOW_S, max_signatures: int = MAX_SIGNATURES) -> None:
        self.window_s = window_s
        self.max_signatures = max_signatures
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # first 16 bytes -> forget after
        self._lock = threading.Lock()

    def refusal(self, signature: bytes, timestamp: int, now: float) -> str | None:
        """Why this signature may not be used now (a replay, or too many to track), or None."""
        key = signature[:16]
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            if key in self._seen:
                return "this request signature was already used (a replay); sign each request afresh"
            if len(self._seen) >= self.max_signatures:
                return "the coordinator is tracking too many signed requests; try again in a minute"
            # Insertion order is expiry order to within the window, so purging from the front
            # may keep an entry a little longer, never forget one early.
            self._seen[key] = timestamp + self.window_s
            return None


def check_signed_request(
    signed: SignedRequest,
    method: str,
    target: str,
    body: bytes,
    verify_device: DeviceVerifier,
    replays: ReplayGuard,
    now: float | None = None,
) -> str | None:
    """Why a device-signed request is refused, or None when it is good: its time is within the
    window, the device's current key signed it, and the signature was not used before."""
    now = time.time() if now is None else now
    if abs(now - signed.timestamp) > replays.window_s:
        return (
            f"the request's timestamp {signed.timestamp} is more than {replays.window_s:g} s from the "
            f"coordinator's clock ({now:.0f}); sign with the time the coordinator sent in Welcome"
        )
    if not verify_device(signed.device_id, signed.message(method, target, body), signed.signature):
        return f"device {signed.device_id!r} is unknown, revoked, or did not sign this request with its key"
    return replays.refusal(signed.signature, signed.timestamp, now)
