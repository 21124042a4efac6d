"""The suppression list: addresses mail must not go to, checked before every send.

See :class:`~twistmail.interfaces.ISuppressionList` for the contract. Stores:
:class:`SqliteSuppressionList` (a file of its own for ``twistmail send``, by default
:func:`default_suppression_path`, or a SQLite queue's file),
:class:`twistmail.queue.postgres_suppression.PostgresSuppressionList` (a PostgreSQL queue's
schema) and :class:`MemorySuppressionList` (tests).
"""

from .memory import MemorySuppressionList
from .opening import open_suppression_file, open_suppression_for_queue
from .records import (
    COMPLAINT,
    HARD_BOUNCE,
    MANUAL,
    REASONS,
    UNSUBSCRIBED,
    Reason,
    Suppression,
    SuppressionError,
    list_key,
    suppression_key,
)
from .sqlite import SqliteSuppressionList, default_suppression_path

__all__ = [
    "COMPLAINT",
    "HARD_BOUNCE",
    "MANUAL",
    "REASONS",
    "UNSUBSCRIBED",
    "MemorySuppressionList",
    "Reason",
    "SqliteSuppressionList",
    "Suppression",
    "SuppressionError",
    "default_suppression_path",
    "list_key",
    "open_suppression_file",
    "open_suppression_for_queue",
    "suppression_key",
]
