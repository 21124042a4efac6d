"""The API's message endpoints: look a message up, list them, retry a failed one, cancel one.

``GET /v1/messages/{id}``: state, attempts, times and each recipient's last reply (code and
text; the queue does not keep enhanced status codes yet).
``GET /v1/messages?state=&limit=&cursor=``: a page by id and the ``next_cursor`` of the next
(null on the last): stable, since ids only grow.
``POST /v1/messages/{id}/retry`` puts a failed message back (409 otherwise);
``DELETE /v1/messages/{id}`` cancels one not yet being sent (409 otherwise). 404 for an id
that is not in the queue.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

from twisted.internet import defer
from twisted.web.iweb import IRequest

from ..interfaces import IQueue
from ..queue.records import MESSAGE_STATES, MessageStatus
from ..suppression.records import shown_state
from .problems import problem

__all__ = ["CANCELLED", "message_json", "tracking_routes"]

CANCELLED: Final = "cancelled by the API"
"""The reason recorded for a message cancelled with ``DELETE``."""

MAX_ID: Final = 2**63 - 1
MAX_PAGE: Final = 1000
DEFAULT_PAGE: Final = 100

Route = tuple[str, str, Callable[..., "defer.Deferred[bytes]"]]


def _time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_json(status: MessageStatus) -> dict[str, Any]:
    """A message as the API shows it."""
    waiting = status.state in ("queued", "deferred")
    return {
        "id": status.id,
        "message_id": status.message_id,
        "from": status.sender,
        "state": status.state,
        "attempts": status.attempts,
        "created_at": _time(status.created_at),
        "updated_at": _time(status.updated_at),
        "next_attempt_at": _time(status.due) if waiting else None,
        "last_reply": {
            "code": status.code,
            "text": status.response,
        },
        "recipients": [
            {
                "address": r.address,
                "state": shown_state(r.state, r.code, r.response),
                "code": r.code,
                "text": r.response,
            }
            for r in status.recipients
        ],
    }


def _json(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode() + b"\n"


def _number(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    raw = (request.args or {}).get(name.encode())
    if not raw:
        return default
    text = raw[-1].decode("ascii", "replace")
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}")
    return int(text)


def tracking_routes(queue: IQueue, wake: Callable[[], None]) -> list[Route]:
    """``(path, method, handler)`` of each message endpoint over ``queue``."""

    def _missing(request: IRequest, message_id: int) -> bytes:
        return problem(request, 404, f"no message {message_id} in the queue", "id")

    def known(
        handler: Callable[[IRequest, int], defer.Deferred[bytes]],
    ) -> Callable[[IRequest, int], defer.Deferred[bytes]]:
        """``handler`` for an id a queue can hold (SQLite ids are 64-bit); 404 otherwise."""

        @functools.wraps(handler)
        def checked(request: IRequest, message_id: int) -> defer.Deferred[bytes]:
            if not 0 < message_id <= MAX_ID:
                return defer.succeed(_missing(request, message_id))
            return handler(request, message_id)

        return checked

    def show(request: IRequest, message_id: int) -> defer.Deferred[bytes]:
        def found(status: MessageStatus | None) -> bytes:
            if status is None:
                return _missing(request, message_id)
            return _json(request, message_json(status))

        return queue.message(message_id).addCallback(found)

    def listing(request: IRequest) -> defer.Deferred[bytes]:
        states = (request.args or {}).get(b"state")
        state = states[-1].decode("ascii", "replace") if states else None
        if state is not None and state not in MESSAGE_STATES:
            detail = f"state must be one of {', '.join(MESSAGE_STATES)}"
            return defer.succeed(problem(request, 400, detail, "state"))
        try:
            limit = _number(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
            after = _number(request, "cursor", 0, 0, MAX_ID)
        except ValueError as e:
            field = str(e).split(" ", 1)[0]
            return defer.succeed(problem(request, 400, str(e), field))

        def page(found: list[MessageStatus]) -> bytes:
            more = len(found) > limit
            shown = found[:limit]
            cursor = str(shown[-1].id) if more and shown else None
            body = {"messages": [message_json(s) for s in shown], "next_cursor": cursor}
            return _json(request, body)

        # One more than asked, to know whether another page follows.
        return queue.messages(state, after=after, limit=limit + 1).addCallback(page)

    def changed(
        request: IRequest, message_id: int, result: str, done: str, verb: str
    ) -> defer.Deferred[bytes] | bytes:
        if result == "missing":
            return _missing(request, message_id)
        if result != done:
            detail = f"message {message_id} is {result}: only {verb}"
            return problem(request, 409, detail, "id")
        return show(request, message_id)

    def retry(request: IRequest, message_id: int) -> defer.Deferred[bytes]:
        def retried(result: str) -> defer.Deferred[bytes] | bytes:
            if result == "retried":
                wake()
            return changed(request, message_id, result, "retried", "a failed one can be retried")

        return queue.retry(message_id).addCallback(retried)

    def cancel(request: IRequest, message_id: int) -> defer.Deferred[bytes]:
        def cancelled(result: str) -> defer.Deferred[bytes] | bytes:
            verb = "a queued or deferred one can be cancelled"
            return changed(request, message_id, result, "cancelled", verb)

        return queue.cancel(message_id, CANCELLED).addCallback(cancelled)

    return [
        ("/v1/messages", "GET", listing),
        ("/v1/messages/<int:message_id>", "GET", known(show)),
        ("/v1/messages/<int:message_id>/retry", "POST", known(retry)),
        ("/v1/messages/<int:message_id>", "DELETE", known(cancel)),
    ]
