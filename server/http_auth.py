"""What every HTTP route that checks credentials shares: RFC 7807 problems, the client's peer
key, and the failed-auth limit (429 + Retry-After) with its 401s.

/api/* (http_api) and the registry's writes (registry.http_common: SPARQL Update, /things,
imports) answer the same way because they call the same functions here, and they count
failures in the coordinator's one FailedAuthLimiter, keyed as gRPC keys them (auth.peer_key),
so one client's HTTP and gRPC failures add up.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from tinyfleet.server.auth import FailedAuthLimiter, bearer, is_admin_token, peer_key, too_many_failures

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
    """429 + Retry-After for a peer past its failed-auth limit (checked before anything else,
    so a blocked peer learns nothing), or None."""
    wait_s = limiter.retry_after(peer)
    if wait_s <= 0:
        return None
    refused = problem(429, "Too many failed attempts", too_many_failures(peer, wait_s))
    refused.headers["retry-after"] = f"{max(wait_s, 1):.0f}"
    return refused


def unauthorized(limiter: FailedAuthLimiter, peer: str, detail: str) -> JSONResponse:
    """401 for a failed authentication, counted against `peer`."""
    limiter.failed(peer)
    log.warning("authentication refused for %s: %s", peer, detail)
    refused = problem(401, "Unauthorized", detail)
    refused.headers["www-authenticate"] = 'Bearer realm="tinyfleet"'
    return refused


def refuse_unless_admin(
    request: Request, admin_token: str | None, limiter: FailedAuthLimiter, action: str
) -> JSONResponse | None:
    """None when the request is the admin's (auth.is_admin_token); else 429 for a blocked peer,
    or 401 naming `action` ("SPARQL Update", "listing jobs") counted as a failure."""
    peer = client_peer(request)
    if (blocked := too_many_attempts(limiter, peer)) is not None:
        return blocked
    token = presented_token(request)
    if is_admin_token(token, admin_token):
        return None
    return unauthorized(
        limiter, peer,
        f"{action} needs the admin token (Authorization: Bearer TOKEN)" if not token else
        f"{action}: wrong admin token",
    )
