"""What the registry's HTTP routes share: RFC 7807 problems, Accept negotiation, who may write."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

PROBLEM_JSON = "application/problem+json"

#: (device id, presented token) -> True when the token is that device's credential.
DeviceVerifier = Callable[[str, str], bool]


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


@dataclass(frozen=True)
class Access:
    """The admin token may do anything; a device credential may write only its own description."""

    admin_token: str | None = None
    verify_device: DeviceVerifier | None = None

    def is_admin(self, request: Request) -> bool:
        token = bearer(request)
        return bool(self.admin_token and token) and hmac.compare_digest(
            token.encode(), self.admin_token.encode()
        )

    def may_write(self, request: Request, thing_id: str) -> bool:
        if self.is_admin(request):
            return True
        token = bearer(request)
        return bool(token and self.verify_device and self.verify_device(thing_id, token))


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
