"""Durable queues of messages waiting for delivery, and the worker that drains them.

:class:`~twistmail.queue.sqlite.SqliteSpool` is the SQLite store behind the ``spool`` backend;
:class:`~twistmail.queue.worker.Drain` delivers what is due from it through a
:class:`~twistmail.Mailer`.
"""

from .records import ClaimedMessage, Outcome, SpoolError, SpoolSummary
from .sqlite import SqliteSpool, read_spool_status
from .worker import Drain, DrainReport

__all__ = [
    "ClaimedMessage",
    "Drain",
    "DrainReport",
    "Outcome",
    "SpoolError",
    "SpoolSummary",
    "SqliteSpool",
    "read_spool_status",
]
