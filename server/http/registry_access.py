"""What the registry's HTTP routes share: who may write (Access), Accept negotiation; RFC 7807
problems and the failed-auth answers come from tinyfleet.server.http.auth, shared with /api."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
from starlette.requests import Request
from starlette.responses import Response

from tinyfleet.common.device_keys import AUTH_SCHEME, SignedRequest
from tinyfleet.server.auth import (
    DeviceVerifier,
    FailedAuthLimiter,
    ReplayGuard,
    admin_guesses,
    check_signed_request,
    is_admin_token,
)
from tinyfleet.server.http.auth import (
    client_peer,
    presented_token,
    problem,
    refuse_unless_admin,
    too_many_attempts,
    unauthorized,
)


@dataclass(frozen=True)
class Access:
    """The admin may do anything; a device may write only its own description, with a request
    signed by its key (`Authorization: TinyFleet-Ed25519 device=..,ts=..,sig=..`, see
    tinyfleet.common.device_keys: method, path, timestamp and body hash, each signature once).
    Failed authentications count per client address in `auth_failures` (the coordinator passes
    its one limiter); past the limit: 429 + Retry-After.

    Who the admin is: auth.is_admin_token. `admin_token=None` is the coordinator's
    `--no-admin-token` (everyone is the admin); left out, the token is a random one nobody
    knows, so a registry built without thought has no admin rather than an open one."""

    admin_token: str | None = field(default_factory=lambda: secrets.token_urlsafe(32))
    verify_device: DeviceVerifier | None = None
    auth_failures: FailedAuthLimiter = field(default_factory=FailedAuthLimiter)
    replays: ReplayGuard = field(default_factory=ReplayGuard)

    def refuse_admin(self, request: Request, action: str) -> Response | None:
        """The 401/429 answering a request for an admin-only `action` that is not the admin's, or None."""
        return refuse_unless_admin(request, self.admin_token, self.auth_failures, action)

    async def refuse_write(self, request: Request, thing_id: str, max_body_bytes: int) -> Response | None:
        """The problem (401, 429; 411/413 for a signed body it will not read) answering a write of
        `thing_id` its sender may not make, or None. A bearer token is checked as the admin's; a
        device signature is checked even when everyone is the admin (credentials a request carries
        are never ignored); a request with neither is the admin's only without an admin token.
        A signed body is read to check its hash only when it declares a Content-Length within
        `max_body_bytes`; starlette keeps it for the handler."""
        peer = client_peer(request)
        reason: str | None
        presented = True
        signed = SignedRequest.from_authorization(request.headers.get("authorization", ""))
        if signed is None:
            token = presented_token(request)
            if token:  # an admin token is a guess, counted apart (auth.admin_guesses)
                peer = admin_guesses(peer)
                if (blocked := too_many_attempts(self.auth_failures, peer)) is not None:
                    return blocked  # admin tokens may be weak: no guessing past the limit
            if is_admin_token(token, self.admin_token):
                return None
            presented = bool(token)
            reason = "wrong admin token" if token else (
                f"writing {thing_id!r} needs the admin token (Authorization: Bearer TOKEN) or a request "
                f"signed by that device's key "
                f"(Authorization: {AUTH_SCHEME} device=ID,ts=EPOCH_S,nonce=N,sig=SIG)"
            )
        elif signed.device_id != thing_id:
            reason = (f"a device writes only its own description; this request is signed by "
                      f"{signed.device_id!r}")
        else:
            declared = request.headers.get("content-length", "0" if "transfer-encoding" not in
                                           request.headers else "")  # no length, no chunks: no body
            if not declared.isdigit():
                return problem(411, "Length required",
                               "a signed device write must declare its Content-Length")
            if int(declared) > max_body_bytes:
                return problem(413, "Request too large",
                               f"the body is {declared} bytes; the limit is {max_body_bytes} bytes")
            body = await request.body() if int(declared) else b""
            reason = await self._signature_refusal(signed, request.method, request.url.path, body)
        if reason is None:
            return None
        return unauthorized(self.auth_failures, peer, reason, presented=presented)

    async def _signature_refusal(
        self, signed: SignedRequest, method: str, path: str, body: bytes
    ) -> str | None:
        verify_device = self.verify_device
        if verify_device is None:  # a registry without devices (standalone): nobody signs
            return f"this registry does not know device {signed.device_id!r}"
        return await anyio.to_thread.run_sync(
            lambda: check_signed_request(signed, method, path, body, verify_device, self.replays)
        )


def negotiate(accept: str | None, offered: Sequence[str], default: str) -> str | None:
    """The offered media type the Accept header prefers (q-values, type/* and */*), or None."""
    if not accept or not accept.strip():
        return default
    ranges: list[tuple[float, int, str]] = []
    for position, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        quality = 1.0
        for param in fields[1:]:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media:
            ranges.append((quality, position, media))
    ranges.sort(key=lambda r: (-r[0], r[1]))
    for quality, _, media in ranges:
        if quality <= 0:
            continue
        if media == "*/*":
            return default
        for candidate in offered:
            if media == candidate or (media.endswith("/*") and candidate.startswith(media[:-1])):
                return candidate
    return None
