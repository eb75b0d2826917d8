"""What every HTTP route that checks credentials shares: RFC 7807 problems, the client's peer
key, and the failed-auth limit (429 + Retry-After) with its 401s.

The limit (auth.FailedAuthLimiter) counts failures of credentials a request presented. Admin
tokens may be weak (the operator chooses them), so a peer past its limit of wrong admin tokens
(counted apart: auth.admin_guesses) is refused before its token is compared. Device keys and
enrollment tokens cannot be guessed, so a credential of those kinds that verifies is served even
from a blocked peer: token-less or forged requests from an address do not lock out the devices
and operators that share it.

/api/* (http.api) and the registry's writes (http.registry_access: SPARQL Update, /things,
imports) answer the same way because they call the same functions here, and they count
failures in the coordinator's one FailedAuthLimiter, keyed as gRPC keys them (auth.peer_key),
so one client's HTTP and gRPC failures add up.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from tinyfleet.server.auth import (
    FailedAuthLimiter,
    admin_guesses,
    bearer,
    is_admin_token,
    peer_key,
    too_many_failures,
)

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def client_peer(request: Request) -> str:
    return peer_key(request.client.host) if request.client else "unknown"


def presented_token(request: Request) -> str:
    """The bearer token the request carries, or ''."""
    return bearer(request.headers.get("authorization", ""))


def too_many_attempts(limiter: FailedAuthLimiter, peer: str) -> JSONResponse | None:
    """429 + Retry-After for a peer past its failed-auth limit, or None."""
    wait_s = limiter.retry_after(peer)
    if wait_s <= 0:
        return None
    refused = problem(429, "Too many failed attempts", too_many_failures(peer, wait_s))
    refused.headers["retry-after"] = f"{max(wait_s, 1):.0f}"
    return refused


def unauthorized(
    limiter: FailedAuthLimiter, peer: str, detail: str, *, presented: bool = True
) -> JSONResponse:
    """401 for a failed authentication; one that presented a credential counts against `peer`,
    and once the peer is past its limit its failures are answered 429 instead."""
    if presented:
        blocked = too_many_attempts(limiter, peer)
        limiter.failed(peer)
        if blocked is not None:
            return blocked
    log.warning("authentication refused for %s: %s", peer, detail)
    refused = problem(401, "Unauthorized", detail)
    refused.headers["www-authenticate"] = 'Bearer realm="tinyfleet"'
    return refused


def refuse_unless_admin(
    request: Request, admin_token: str | None, limiter: FailedAuthLimiter, action: str
) -> JSONResponse | None:
    """None when the request is the admin's (auth.is_admin_token); else 401 naming `action`
    ("SPARQL Update", "listing jobs"). A presented token is a guess: a peer past its limit gets
    429 before its token is even compared (the operator may have chosen a weak one), so guessing
    stops there; a request without a token guesses nothing and neither counts nor is blocked."""
    peer = admin_guesses(client_peer(request))
    token = presented_token(request)
    if token and (blocked := too_many_attempts(limiter, peer)) is not None:
        return blocked
    if is_admin_token(token, admin_token):
        return None
    return unauthorized(
        limiter, peer,
        f"{action} needs the admin token (Authorization: Bearer TOKEN)" if not token else
        f"{action}: wrong admin token",
        presented=bool(token),
    )
