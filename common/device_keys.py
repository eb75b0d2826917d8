"""Device keys: the Ed25519 key pair an agent makes for itself, and every message it signs.

Agent and coordinator both import this module, so the signed bytes cannot drift apart.
Each message starts with a label naming its purpose (domain separation: a Connect proof
never passes for a Register or a request signature), then length-prefixed fields (no two
field lists encode to the same bytes). Bodies enter as their SHA-256.

Freshness, per message:
- Register carries a sequence number the agent keeps in its state dir and raises before
  every registration, to max(last + 1, wall-clock milliseconds). The coordinator stores
  the highest it accepted per device and refuses any that is not above it, so a captured
  Register cannot be replayed, and no clock is needed: a device without a real-time clock
  counts up from its stored value (a good clock only helps a restored state dir).
- Connect signs a nonce the coordinator draws afresh for every stream.
- Requests (GetArtifact, the device's HTTP writes of its own description) sign a
  timestamp within REQUEST_WINDOW_S of the coordinator's clock and a random nonce (so
  two identical requests in one second differ), and the coordinator accepts each
  signature once. Welcome.server_time tells a device its offset from the coordinator's
  clock; the agent warns when its own is off by more than half the window. (The agent
  itself makes no signed requests yet: they serve tools and scripts acting as a device.)
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import stat
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tinyfleet.common.atomic_files import write_atomically

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 32
KEY_FILE_MODE = 0o600
#: How far a signed request's timestamp may be from the coordinator's clock.
REQUEST_WINDOW_S = 300

_REGISTER = b"tinyfleet/v1 register"
_CONNECT = b"tinyfleet/v1 connect"
_REQUEST = b"tinyfleet/v1 request"

#: HTTP: `Authorization: TinyFleet-Ed25519 device=<percent-encoded id>,ts=<epoch s>,nonce=<random>,
#: sig=<base64url>`.
AUTH_SCHEME = "TinyFleet-Ed25519"
#: gRPC metadata of a signed request.
METADATA_DEVICE = "x-device-id"
METADATA_TIME = "x-device-time"
METADATA_NONCE = "x-device-nonce"
METADATA_SIGNATURE = "x-device-signature"


class DeviceKeyError(ValueError):
    """A key file that cannot be used (unreadable, not an Ed25519 key, readable by others)."""


def _fields(label: bytes, *parts: bytes) -> bytes:
    out = [label, b"\x00"]
    for part in parts:
        out.append(len(part).to_bytes(4, "big"))
        out.append(part)
    return b"".join(out)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def register_message(
    public_key: bytes, description: bytes, media_type: str, sequence: int, enrollment_token: str
) -> bytes:
    """What a Register signs: the key itself, the description, and its sequence number."""
    return _fields(
        _REGISTER, public_key, _sha256(description), media_type.encode(),
        sequence.to_bytes(8, "big"), _sha256(enrollment_token.encode()),
    )


def connect_message(nonce: bytes, device_id: str) -> bytes:
    """What a Hello signs: the coordinator's nonce for this stream and the device it speaks for."""
    return _fields(_CONNECT, nonce, device_id.encode())


def request_message(
    device_id: str, method: str, target: str, timestamp: int, nonce: str, body: bytes
) -> bytes:
    """What a signed request signs: who, what (method, path or artifact), when, and the body."""
    return _fields(
        _REQUEST, device_id.encode(), method.upper().encode(), target.encode(),
        str(timestamp).encode(), nonce.encode(), _sha256(body),
    )


def next_sequence(last: int, now: float) -> int:
    """The sequence number of the next registration: above `last`, and the clock if it is ahead."""
    return max(last + 1, int(now * 1000))


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def fingerprint(public_key: bytes) -> str:
    """A short, printable name for a public key (operators compare these)."""
    return "sha256:" + hashlib.sha256(public_key).hexdigest()[:16]


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when `signature` is `public_key`'s Ed25519 signature of `message`; never raises."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class DeviceKey:
    """A device's private key. On disk: PKCS#8 PEM, mode 0600, written atomically."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> DeviceKey:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            data = path.read_bytes()
        except OSError as exc:
            raise DeviceKeyError(f"{path}: cannot read the device key: {exc.strerror}") from exc
        if mode & 0o077:
            raise DeviceKeyError(
                f"{path}: the device key is readable by others (mode {mode:o}); run chmod 600 on it"
            )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise DeviceKeyError(f"{path}: not a PEM private key without a passphrase") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise DeviceKeyError(f"{path}: not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> DeviceKey:
        """The key stored at `path`, or a new one saved there (the device's first start)."""
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        key.save(path)
        return key

    def save(self, path: Path) -> None:
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomically(path, pem, mode=KEY_FILE_MODE)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def sign_register(
        self, description: bytes, media_type: str, sequence: int, enrollment_token: str = ""
    ) -> bytes:
        message = register_message(self.public_key, description, media_type, sequence, enrollment_token)
        return self.sign(message)

    def sign_connect(self, nonce: bytes, device_id: str) -> bytes:
        return self.sign(connect_message(nonce, device_id))

    def sign_request(
        self, device_id: str, method: str, target: str, body: bytes = b"", timestamp: int | None = None
    ) -> SignedRequest:
        """A request signature; `timestamp` defaults to this machine's clock (pass clock + offset)."""
        when = int(timestamp if timestamp is not None else time.time())
        nonce = secrets.token_urlsafe(12)
        signature = self.sign(request_message(device_id, method, target, when, nonce, body))
        return SignedRequest(device_id, when, nonce, signature)


@dataclass(frozen=True)
class SignedRequest:
    """Who signed a request, when, and the signature, as they travel in a header or metadata."""

    device_id: str
    timestamp: int
    nonce: str
    signature: bytes

    def message(self, method: str, target: str, body: bytes) -> bytes:
        """The bytes this signature must cover for that request."""
        return request_message(self.device_id, method, target, self.timestamp, self.nonce, body)

    def authorization(self) -> str:
        """The HTTP `Authorization` header value."""
        device = urllib.parse.quote(self.device_id, safe="")
        return (f"{AUTH_SCHEME} device={device},ts={self.timestamp},nonce={self.nonce},"
                f"sig={_b64(self.signature)}")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata entries (GetArtifact)."""
        return (
            (METADATA_DEVICE, self.device_id),
            (METADATA_TIME, str(self.timestamp)),
            (METADATA_NONCE, self.nonce),
            (METADATA_SIGNATURE, _b64(self.signature)),
        )

    @classmethod
    def from_authorization(cls, header: str) -> SignedRequest | None:
        """Parse an `Authorization` header; None when it is not this scheme or malformed."""
        scheme, _, params = header.strip().partition(" ")
        if scheme.lower() != AUTH_SCHEME.lower():
            return None
        values: dict[str, str] = {}
        for part in params.split(","):
            name, sep, value = part.strip().partition("=")
            if sep:
                values[name.strip().lower()] = value.strip().strip('"')
        return cls._parse(urllib.parse.unquote(values.get("device", "")), values.get("ts", ""),
                          values.get("nonce", ""), values.get("sig", ""))

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> SignedRequest | None:
        values: dict[str, str] = {}
        for key, value in metadata or ():
            values[key.lower()] = value.decode() if isinstance(value, bytes) else value
        return cls._parse(values.get(METADATA_DEVICE, ""), values.get(METADATA_TIME, ""),
                          values.get(METADATA_NONCE, ""), values.get(METADATA_SIGNATURE, ""))

    @classmethod
    def _parse(cls, device_id: str, timestamp: str, nonce: str, signature: str) -> SignedRequest | None:
        if not device_id or not timestamp.isdigit() or not nonce:
            return None
        try:
            raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        except ValueError:
            return None
        if len(raw) != SIGNATURE_BYTES:
            return None
        return cls(device_id, int(timestamp), nonce, raw)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

