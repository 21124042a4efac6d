"""Durable queues of messages waiting for delivery, and the worker that drains them.

:class:`~twistmail.interfaces.IQueue` is the contract every store keeps;
:class:`~twistmail.queue.sqlite.SqliteQueue` is the SQLite store behind the ``spool`` backend
and ``twistmail drain --spool``, :class:`twistmail.testing.MemoryQueue` the in-memory one.
:class:`~twistmail.queue.worker.Drain` delivers what is due from a queue through a
:class:`~twistmail.Mailer`.
"""

from .records import (
    ClaimedMessage,
    Idempotent,
    MessageStatus,
    Outcome,
    QueueError,
    QueueRow,
    QueueSummary,
    RecipientStatus,
)
from .sqlite import SqliteQueue, read_queue_status
from .worker import Drain, DrainReport

__all__ = [
    "ClaimedMessage",
    "Drain",
    "DrainReport",
    "Idempotent",
    "MessageStatus",
    "Outcome",
    "QueueError",
    "QueueRow",
    "QueueSummary",
    "RecipientStatus",
    "SqliteQueue",
    "read_queue_status",
]
