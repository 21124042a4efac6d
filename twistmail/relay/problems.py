"""Error responses of the relay's HTTP API: ``application/problem+json`` (RFC 9457)."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Final

from twisted.web.iweb import IRequest

__all__ = ["PROBLEM", "problem"]

PROBLEM: Final = b"application/problem+json"


def problem(request: IRequest, status: int, detail: str, field: str | None = None) -> bytes:
    """An RFC 9457 problem response body, the status and content type set on ``request``."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", PROBLEM)
    request.setHeader(b"Cache-Control", b"no-store")
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if field is not None:
        body["field"] = field
    return json.dumps(body).encode() + b"\n"
