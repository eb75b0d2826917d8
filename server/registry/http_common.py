"""What the registry's HTTP routes share: RFC 7807 problems, Accept negotiation, who may write."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tinyfleet.common.device_keys import AUTH_SCHEME, SignedRequest
from tinyfleet.server.auth import (
    DeviceVerifier,
    FailedAuthLimiter,
    ReplayGuard,
    check_signed_request,
    too_many_failures,
)

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


@dataclass(frozen=True)
class Access:
    """The admin token may do anything; a device may write only its own description, with a
    request signed by its key (`Authorization: TinyFleet-Ed25519 device=..,ts=..,sig=..`, see
    tinyfleet.common.device_keys: method, path, timestamp and body hash, each signature once).
    Failed write authentications count per client address; past the limit: 429 + Retry-After."""

    admin_token: str | None = None
    verify_device: DeviceVerifier | None = None
    auth_failures: FailedAuthLimiter = field(default_factory=FailedAuthLimiter)
    replays: ReplayGuard = field(default_factory=ReplayGuard)

    def is_admin(self, request: Request) -> bool:
        token = bearer(request)
        return bool(self.admin_token and token) and hmac.compare_digest(
            token.encode(), self.admin_token.encode()
        )

    async def refuse_write(self, request: Request, thing_id: str, max_body_bytes: int) -> Response | None:
        """The problem (401, 429; 411/413 for a signed body it will not read) answering a write of
        `thing_id` its sender may not make, or None. A signed body is read to check its hash only
        when it declares a Content-Length within `max_body_bytes`; starlette keeps it for the handler."""
        peer = request.client.host if request.client else "unknown"
        wait_s = self.auth_failures.retry_after(peer)
        if wait_s > 0:
            refused = problem(429, "Too many failed attempts", too_many_failures(peer, wait_s))
            refused.headers["retry-after"] = f"{max(wait_s, 1):.0f}"
            return refused
        reason: str | None
        if bearer(request):
            reason = None if self.is_admin(request) else "wrong admin token"
        elif (signed := SignedRequest.from_authorization(request.headers.get("authorization", ""))) is None:
            reason = (
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
        self.auth_failures.failed(peer)
        log.warning("write of %s refused for %s: %s", thing_id, peer, reason)
        return problem(401, "Unauthorized", reason)

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
