"""A queue chosen by URL: ``sqlite:PATH`` or ``postgresql://user@host:port/db``.

:func:`open_queue` is what every door given a ``--queue URL`` opens its queue with. A
PostgreSQL URL may name the schema holding the queue with ``?schema=NAME`` (default
``twistmail``); its other query parameters are psycopg's (libpq's). The password, if any,
is best left out of the URL (other users can read a process's arguments): libpq reads
``PGPASSWORD`` or ``~/.pgpass``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.internet import defer

from .._sqlite import Synchronous
from .._twisted import Reactor
from ..interfaces import IQueue
from .records import QueueError

__all__ = ["QueueUrl", "open_queue", "parse_queue_url"]

DEFAULT_SCHEMA = "twistmail"


@dataclass(frozen=True)
class QueueUrl:
    """A parsed queue URL: ``kind`` and where (a file path, or a libpq URL and a schema)."""

    kind: Literal["sqlite", "postgresql"]
    target: str
    schema: str = DEFAULT_SCHEMA


def parse_queue_url(url: str) -> QueueUrl:
    """``url`` parsed; ValueError saying what a queue URL looks like when it is not one."""
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "sqlite" and colon and rest:
        return QueueUrl("sqlite", rest)
    if scheme in ("postgresql", "postgres") and rest.startswith("//"):
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schema = DEFAULT_SCHEMA
        kept = []
        for key, value in query:
            if key == "schema":
                schema = value
            else:
                kept.append((key, value))
        if not schema or not schema.replace("_", "").isalnum() or schema[0].isdigit():
            raise ValueError(f"schema={schema!r}: expected a name of letters, digits and _")
        target = urlunsplit(parts._replace(query=urlencode(kept)))
        return QueueUrl("postgresql", target, schema)
    raise ValueError(f"expected sqlite:PATH or postgresql://user@host:port/db, got {_shown(url)!r}")


def _shown(url: str) -> str:
    """``url`` without a password it may hold."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("@")[-1]
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=f"{user}{host}{port}"))


def open_queue(
    url: str,
    *,
    reactor: Reactor | None = None,
    create: bool = True,
    synchronous: Synchronous = "FULL",
    close_at_shutdown: bool = True,
) -> defer.Deferred[IQueue]:
    """Open the queue at ``url`` (see the module's docstring).

    ``create`` and ``synchronous`` apply to a SQLite file (see
    :meth:`~twistmail.queue.SqliteQueue.open`); a PostgreSQL schema is always created on first
    use. ``close_at_shutdown=False`` leaves closing to the caller during reactor shutdown (a
    service that records outcomes while it stops). Fails with :class:`QueueError` for a URL
    that is not a queue's, or a queue that cannot be opened.
    """
    try:
        parsed = parse_queue_url(url)
    except ValueError as e:
        return defer.fail(QueueError(f"--queue: {e}"))
    if parsed.kind == "sqlite":
        from .sqlite import SqliteQueue

        d: defer.Deferred[IQueue] = SqliteQueue.open(  # type: ignore[assignment]
            parsed.target,
            create=create,
            synchronous=synchronous,
            reactor=reactor,
            close_at_shutdown=close_at_shutdown,
        )
        return d
    from .postgres import PostgresQueue

    return PostgresQueue.open(  # type: ignore[return-value]
        parsed.target, schema=parsed.schema, reactor=reactor, close_at_shutdown=close_at_shutdown
    )
