"""Opening the suppression list a door uses: a file of its own, or its queue's database."""

from __future__ import annotations

from twisted.internet import defer

from .._twisted import Reactor
from ..interfaces import ISuppressionList
from ..queue.records import QueueError
from ..queue.url import parse_queue_url
from .records import SuppressionError
from .sqlite import SqliteSuppressionList, default_suppression_path

__all__ = ["open_suppression_file", "open_suppression_for_queue"]


def open_suppression_file(
    path: str | None = None, *, create: bool = True, reactor: Reactor | None = None
) -> defer.Deferred[ISuppressionList]:
    """The list in the SQLite file at ``path`` (:func:`default_suppression_path` if None)."""
    d: defer.Deferred[ISuppressionList] = SqliteSuppressionList.open(  # type: ignore[assignment]
        path if path is not None else default_suppression_path(), create=create, reactor=reactor
    )
    return d


async def _open_for_queue(
    url: str, create: bool, queue_ready: bool, reactor: Reactor | None, close_at_shutdown: bool
) -> ISuppressionList:
    try:
        parsed = parse_queue_url(url)
    except ValueError as e:
        raise SuppressionError(f"--queue: {e}") from None
    if parsed.kind == "sqlite":
        from ..queue.sqlite import SqliteQueue

        if not queue_ready:
            # The queue's own opening makes a new file a spool (and checks an old one is one).
            try:
                queue = await SqliteQueue.open(parsed.target, create=create, reactor=reactor)
            except QueueError as e:
                raise SuppressionError(str(e)) from None
            await queue.close()
        opened: ISuppressionList = await SqliteSuppressionList.open(
            parsed.target, create=False, reactor=reactor, close_at_shutdown=close_at_shutdown
        )
        return opened
    from ..queue.postgres_suppression import PostgresSuppressionList

    pg: ISuppressionList = await PostgresSuppressionList.open(
        parsed.target, schema=parsed.schema, reactor=reactor
    )
    return pg


def open_suppression_for_queue(
    url: str,
    *,
    create: bool = True,
    queue_ready: bool = False,
    reactor: Reactor | None = None,
    close_at_shutdown: bool = True,
) -> defer.Deferred[ISuppressionList]:
    """The list in the database of the queue at ``url`` (``sqlite:PATH`` or
    ``postgresql://...``), where the relay and workers keep it. ``create`` applies to a
    SQLite file, as for the queue; ``queue_ready``: the caller has opened the queue already
    (it exists and is one). ``close_at_shutdown=False``: the caller closes a SQLite list
    during reactor shutdown (a PostgreSQL list is always closed by its caller). Fails with
    :class:`SuppressionError`."""
    return defer.ensureDeferred(
        _open_for_queue(url, create, queue_ready, reactor, close_at_shutdown)
    )
