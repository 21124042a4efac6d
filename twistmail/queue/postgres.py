"""The PostgreSQL queue: one queue shared by any number of workers on any number of machines.

:class:`PostgresQueue` provides :class:`~twistmail.interfaces.IQueue` on a PostgreSQL database
(``postgresql://user@host:port/db``), through psycopg 3. Nothing home-made coordinates the
workers: PostgreSQL's row locks, ``SKIP LOCKED``, transactions and ``LISTEN/NOTIFY`` do.

Tables live in one schema (``twistmail`` unless another is given), created on first use under
an advisory lock and versioned in its ``meta`` table: an older version is migrated in place,
a newer one refused with a message saying so.

Claims: one transaction takes up to ``limit`` due messages with ``SELECT ... FOR UPDATE SKIP
LOCKED`` (two workers never wait for, or take, the same row) and sets ``state='sending'``, the
owner, ``lease_until`` and the next fencing number. An outcome is written only with the
claim's owner and fencing number, so a worker whose lease expired and was taken over can
never overwrite the outcome of the worker that took over.

Time: due times and leases are seconds since the epoch on the database server's clock
(``now()``), never a worker's, unless a ``clock`` is given (for tests).

Threading: every statement runs on a thread of the queue's own pool (one connection a
thread), never on the reactor thread. A transaction that fails because the connection was
lost (server restart, network cut) or by a serialization failure is tried again, on a new
connection, with exponential backoff, for ever until :meth:`PostgresQueue.close`. A commit
whose answer was lost is recognised when tried again: an enqueue is found by its batch token
(not stored twice) and an outcome by its fencing number (reported recorded, never sent twice).

Wake-ups: each enqueue sends ``NOTIFY`` on the schema's channel; :meth:`PostgresQueue.notified`
fires on the next one (from any process), so an idle worker waits on it and on
:meth:`~twistmail.interfaces.IQueue.next_due`, never on a fixed poll.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .._twisted import Reactor, default_reactor
from ..address import Address, parse_address, parse_sender
from ..interfaces import IQueue
from ..message import Envelope
from .records import MESSAGE_STATES, ClaimedMessage, Outcome, QueueError, QueueRow, QueueSummary

try:  # an optional dependency: pip install 'twistmail[postgresql]'
    import psycopg
    from psycopg import sql
except ImportError:  # pragma: no cover - reported when a PostgreSQL queue is opened
    psycopg = None  # type: ignore[assignment]

__all__ = ["SCHEMA_VERSION", "PostgresQueue", "describe_url"]

log = Logger()

SCHEMA_VERSION: Final = "1"

_T = TypeVar("_T")
_Op = Callable[["psycopg.Connection[Any]", "float | None", bool], Any]
"""``op(conn, now, again)`` run in one transaction; ``again``: an earlier try of it failed
with the connection, so its commit may have happened."""

RETRY_FIRST: Final = 0.1
RETRY_MAX: Final = 5.0

# The store's now, in seconds since the epoch: the server's clock unless the caller gave one.
_NOW = "coalesce(%(now)s::float8, extract(epoch from now()))"


def _timed(text: str) -> str:
    """``text`` with each ``$NOW`` standing for the store's now."""
    return text.replace("$NOW", _NOW)


_SCHEMA: Final[tuple[str, ...]] = (
    "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE messages (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        batch uuid NOT NULL,
        sender text NOT NULL,
        size integer NOT NULL,
        eight_bit boolean NOT NULL,
        smtputf8 boolean NOT NULL,
        message_id text,
        payload bytea,
        state text NOT NULL
            CHECK (state IN ('queued', 'sending', 'deferred', 'sent', 'failed')),
        attempts integer NOT NULL DEFAULT 0,
        due float8 NOT NULL,
        owner text,
        lease_until float8,
        fence bigint NOT NULL DEFAULT 0,
        claim uuid,
        code integer,
        response text NOT NULL DEFAULT '',
        created_at float8 NOT NULL,
        updated_at float8 NOT NULL
    )""",
    "CREATE INDEX messages_due ON messages (due, id) WHERE state IN ('queued', 'deferred')",
    "CREATE INDEX messages_lease ON messages (lease_until) WHERE state = 'sending'",
    "CREATE INDEX messages_owner ON messages (owner) WHERE state = 'sending'",
    "CREATE INDEX messages_batch ON messages (batch)",
    """CREATE TABLE recipients (
        message bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        position integer NOT NULL,
        address text NOT NULL,
        state text NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
        code integer,
        response text NOT NULL DEFAULT '',
        PRIMARY KEY (message, position)
    )""",
)

# From each older schema version to the next (none yet: version 1 is the first).
_MIGRATIONS: Final[dict[str, tuple[str, ...]]] = {}

# A claim tried again after its commit's answer was lost takes back what that first try took
# (its ``claim`` token says which), instead of leaving it held until the lease ends.
_CLAIM = _timed("""
UPDATE messages SET state = 'sending', owner = %(owner)s, lease_until = $NOW + %(lease)s,
    fence = fence + 1, claim = %(claim)s, updated_at = $NOW
WHERE id IN (
    SELECT id FROM messages
    WHERE (state IN ('queued', 'deferred') AND due <= $NOW)
       OR (state = 'sending' AND (lease_until <= $NOW OR claim = %(claim)s))
    ORDER BY due, id LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id, fence, sender, payload, size, eight_bit, smtputf8, message_id, attempts
""")

_RECORD = _timed("""
UPDATE messages SET state = %(state)s, attempts = %(attempts)s,
    due = $NOW + %(retry_in)s, code = %(code)s, response = %(response)s, owner = NULL,
    lease_until = NULL, updated_at = $NOW,
    payload = CASE WHEN %(state)s = 'sent' THEN NULL ELSE payload END
WHERE id = %(id)s AND owner = %(owner)s AND fence = %(fence)s AND state = 'sending'
""")

# A record whose commit was lost on the way back: it is ours if nothing claimed it since.
_RECORDED = """
SELECT 1 FROM messages WHERE id = %(id)s AND fence = %(fence)s AND owner IS NULL
    AND state = %(state)s AND attempts = %(attempts)s
"""

# One statement for a whole batch (a round trip per message made a batch slow to commit).
_INSERT = _timed("""
INSERT INTO messages (batch, sender, size, eight_bit, smtputf8, message_id, payload, state, due,
                      created_at, updated_at)
SELECT %(batch)s, sender, size, eight_bit, smtputf8, message_id, payload, 'queued', $NOW, $NOW,
       $NOW
FROM unnest(%(senders)s::text[], %(sizes)s::integer[], %(eight_bits)s::boolean[],
            %(smtputf8s)s::boolean[], %(message_ids)s::text[], %(payloads)s::bytea[])
     WITH ORDINALITY AS t (sender, size, eight_bit, smtputf8, message_id, payload, n)
ORDER BY n
RETURNING id
""")

_INSERT_RECIPIENTS = """
INSERT INTO recipients (message, position, address, state)
SELECT message, position, address, 'pending'
FROM unnest(%s::bigint[], %s::integer[], %s::text[]) AS t (message, position, address)
"""

_RECORD_RECIPIENTS = """
UPDATE recipients SET state = t.state, code = t.code, response = t.response
FROM unnest(%s::integer[], %s::text[], %s::integer[], %s::text[])
     AS t (position, state, code, response)
WHERE recipients.message = %s AND recipients.position = t.position
"""

_RENEW = _timed(
    "UPDATE messages SET lease_until = $NOW + %(lease)s "
    "WHERE owner = %(owner)s AND state = 'sending'"
)

_DUE_AND_EXPIRED = _timed("""
SELECT count(*) FILTER (WHERE state IN ('queued', 'deferred') AND due <= $NOW),
       count(*) FILTER (WHERE state = 'sending' AND lease_until <= $NOW)
FROM messages
""")

_RELEASE = _timed("""
UPDATE messages SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
    owner = NULL, lease_until = NULL, updated_at = $NOW
WHERE id = %(id)s AND owner = %(owner)s AND fence = %(fence)s AND state = 'sending'
""")

_NEXT_DUE = _timed("""
SELECT least(
    (SELECT min(due) FROM messages WHERE state IN ('queued', 'deferred')),
    (SELECT min(lease_until) FROM messages WHERE state = 'sending')
) - $NOW
""")


def describe_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    if psycopg is None:
        return "postgresql://..."
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{info.get('host', '')}{port}/{info.get('dbname', '')}"


def _retryable(error: BaseException) -> bool:
    """A failure after which the transaction can be tried again (it was rolled back, or
    its commit is recognised when tried again)."""
    if psycopg is None or not isinstance(error, psycopg.Error):
        return False
    if isinstance(error, psycopg.OperationalError):
        return True  # connection lost or refused, server shutting down
    return error.sqlstate in ("40001", "40P01")  # serialization failure, deadlock


# Functions that run on the queue's threads. ---------------------------------------------------


class _Connections:
    """One connection per pool thread, opened on first use and again once broken."""

    def __init__(self, url: str, schema: str, connect_timeout: float) -> None:
        self.url = url
        self.schema = schema
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[psycopg.Connection[Any]] = []

    def get(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.broken and not conn.closed:
            return conn
        if conn is not None:
            self._forget(conn)
        conn = self.connect()
        row = conn.execute(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone()
        self._local.conn = conn
        self._local.backend = list(row) if row is not None else []
        with self._lock:
            self._all.append(conn)
        return conn

    @property
    def backend(self) -> list[Any]:
        """``[pid, backend_start]`` of this thread's connection's server process."""
        return list(getattr(self._local, "backend", []))

    def connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout))
        )
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn

    def _forget(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        conn.close()

    def close_all(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def _prepare(conn: psycopg.Connection[Any], schema: str, where: str) -> None:
    """Create the schema and its tables, migrate an older version, refuse a newer one."""
    with conn.transaction():
        # Workers starting together: one creates, the others wait and then find it made.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"twistmail:{schema}",))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        tables = {
            name
            for (name,) in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            )
        }
        if not tables:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('kind', 'twistmail-queue'), "
                "('schema_version', %s)",
                (SCHEMA_VERSION,),
            )
            return
        meta: dict[str, str] = {}
        if "meta" in tables:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("kind") != "twistmail-queue":
            raise QueueError(f"{where}: schema {schema!r} holds tables that are not a queue")
        version = meta.get("schema_version", "")
        if version not in _MIGRATIONS and version != SCHEMA_VERSION:
            raise QueueError(
                f"{where}: schema {schema!r} is a twistmail queue of schema version "
                f"{version!r}, which this twistmail (schema {SCHEMA_VERSION}) cannot use; "
                "upgrade twistmail to use it"
            )
        while version in _MIGRATIONS:
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
            version = str(int(version) + 1)
        conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (version,))


def _insert(
    envelopes: Sequence[Envelope],
    token: uuid.UUID,
    notify: str,
    conn: psycopg.Connection[Any],
    now: float | None,
    again: bool,
) -> list[int]:
    if again:  # the first try may have committed: its batch token says
        rows = conn.execute(
            "SELECT id FROM messages WHERE batch = %s ORDER BY id", (token,)
        ).fetchall()
        if rows:
            return [row[0] for row in rows]
    rows = conn.execute(
        _INSERT,
        {
            "batch": token,
            "senders": [str(env.sender) for env in envelopes],
            "sizes": [env.size for env in envelopes],
            "eight_bits": [env.eight_bit for env in envelopes],
            "smtputf8s": [env.smtputf8 for env in envelopes],
            "message_ids": [env.message_id for env in envelopes],
            "payloads": [env.payload for env in envelopes],
            "now": now,
        },
    ).fetchall()
    # Identities are drawn in the ORDER BY's order: sorted, they follow the envelopes.
    ids = sorted(row[0] for row in rows)
    messages, positions, addresses = [], [], []
    for message, env in zip(ids, envelopes, strict=True):
        for position, rcpt in enumerate(env.recipients):
            messages.append(message)
            positions.append(position)
            addresses.append(str(rcpt))
    conn.execute(_INSERT_RECIPIENTS, (messages, positions, addresses))
    conn.execute("SELECT pg_notify(%s, '')", (notify,))
    return ids


def _claim(
    owner: str,
    limit: int,
    lease: float,
    token: uuid.UUID,
    conn: psycopg.Connection[Any],
    now: float | None,
    again: bool,
) -> list[ClaimedMessage]:
    if limit <= 0:
        return []
    rows = conn.execute(
        _CLAIM,
        {"owner": owner, "lease": lease, "limit": limit, "claim": token, "now": now},
    ).fetchall()
    if not rows:
        return []
    ids = [row[0] for row in rows]
    pending: dict[int, list[tuple[int, str]]] = {message: [] for message in ids}
    for message, position, address in conn.execute(
        "SELECT message, position, address FROM recipients "
        "WHERE message = ANY(%s) AND state = 'pending' ORDER BY message, position",
        (ids,),
    ):
        pending[message].append((position, address))
    refused: dict[int, tuple[str, int | None, str]] = {}
    tried = [row[0] for row in rows if row[8]]
    if tried:
        for message, address, code, response in conn.execute(
            "SELECT DISTINCT ON (message) message, address, code, response FROM recipients "
            "WHERE message = ANY(%s) AND state = 'failed' ORDER BY message, position",
            (tried,),
        ):
            refused[message] = (address, code, response)
    senders: dict[str, Address] = {}
    claimed = []
    for message, fence, sender, payload, size, eight_bit, smtputf8, mid, attempts in sorted(rows):
        envelope_sender = senders.get(sender)
        if envelope_sender is None:
            envelope_sender = senders[sender] = parse_sender(sender, field="sender")
        mine = pending[message]
        claimed.append(
            ClaimedMessage(
                id=message,
                fence=fence,
                envelope=Envelope(
                    envelope_sender,
                    tuple(parse_address(a, field="recipients") for _, a in mine),
                    bytes(payload),
                    size,
                    eight_bit,
                    smtputf8,
                    mid,
                ),
                positions=tuple(position for position, _ in mine),
                attempts=attempts,
                refused_before=refused.get(message),
            )
        )
    return claimed


def _record(
    owner: str, o: Outcome, conn: psycopg.Connection[Any], now: float | None, again: bool
) -> bool:
    params = {
        "state": o.state,
        "attempts": o.attempts,
        "retry_in": o.retry_in if o.state == "deferred" else 0.0,
        "code": o.code,
        "response": o.response,
        "id": o.id,
        "owner": owner,
        "fence": o.fence,
        "now": now,
    }
    cursor = conn.execute(_RECORD, params)
    if cursor.rowcount != 1:
        # Lost (the lease expired and another claim took it over), or recorded by a first
        # try whose commit's answer was lost.
        return again and conn.execute(_RECORDED, params).fetchone() is not None
    recipients = o.recipients
    conn.execute(
        _RECORD_RECIPIENTS,
        (
            [r[0] for r in recipients],
            [r[1] for r in recipients],
            [r[2] for r in recipients],
            [r[3] for r in recipients],
            o.id,
        ),
    )
    return True


def _release(
    owner: str,
    claims: Sequence[tuple[int, int]],
    conn: psycopg.Connection[Any],
    now: float | None,
    again: bool,
) -> int:
    released = 0
    for message, fence in claims:
        cursor = conn.execute(
            _RELEASE,
            {"id": message, "owner": owner, "fence": fence, "now": now},
        )
        released += cursor.rowcount
    return released


def _renew(
    owner: str, lease: float, conn: psycopg.Connection[Any], now: float | None, again: bool
) -> int:
    cursor = conn.execute(
        _RENEW,
        {"owner": owner, "lease": lease, "now": now},
    )
    return cursor.rowcount


def _next_due(conn: psycopg.Connection[Any], now: float | None, again: bool) -> float | None:
    row = conn.execute(_NEXT_DUE, {"now": now}).fetchone()
    return None if row is None or row[0] is None else max(0.0, float(row[0]))


def _summary(conn: psycopg.Connection[Any], now: float | None, again: bool) -> QueueSummary:
    counts = dict.fromkeys(MESSAGE_STATES, 0)
    counts.update(conn.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall())
    row = conn.execute(
        _DUE_AND_EXPIRED,
        {"now": now},
    ).fetchone()
    assert row is not None
    due, expired = int(row[0]), int(row[1])
    return QueueSummary(counts, due, counts["sending"] - expired, expired)


def _unsent(
    limit: int, conn: psycopg.Connection[Any], now: float | None, again: bool
) -> list[QueueRow]:
    rows = conn.execute(
        "SELECT m.id, m.message_id, m.state, m.attempts, m.due, m.code, m.response, "
        "string_agg(r.address || ' ' || r.state, ', ' ORDER BY r.position) FROM messages m "
        "JOIN recipients r ON r.message = m.id WHERE m.state != 'sent' "
        "GROUP BY m.id ORDER BY m.id LIMIT %s",
        (max(0, limit),),
    ).fetchall()
    return [QueueRow(*row) for row in rows]


_END_GHOST = """
SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity
WHERE pid = %s AND backend_start = %s
"""


def _transaction(
    connections: _Connections, op: _Op, now: float | None, again: bool, backend: list[Any]
) -> Any:
    """``op`` in one transaction. ``backend`` holds the server process of the op's last try:
    when trying again, that process is ended first (waiting until it is), so a commit of the
    earlier try still under way on the server is either done or undone before ``op`` looks
    for it (a row it still locks would be skipped, an insert not yet seen stored twice)."""
    conn = connections.get()
    if again and backend:
        conn.execute(_END_GHOST, backend)
    backend[:] = connections.backend
    with conn.transaction():
        return op(conn, now, again)


def _listen(connections: _Connections, channel: str) -> psycopg.Connection[Any]:
    conn = connections.connect()
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    return conn


def _wait_notify(conn: psycopg.Connection[Any], timeout: float) -> int:
    return sum(1 for _ in conn.notifies(timeout=timeout, stop_after=1))


# The reactor-side object. ---------------------------------------------------------------------


@implementer(IQueue)
class PostgresQueue:
    """The queue in a PostgreSQL database, used from the reactor thread (see :class:`IQueue`).

    Get one with :meth:`PostgresQueue.open`; finish with :meth:`close`.
    """

    def __init__(
        self,
        connections: _Connections,
        pool: ThreadPool,
        reactor: Reactor,
        clock: Callable[[], float] | None,
        where: str,
    ) -> None:
        """Use :meth:`PostgresQueue.open`; this only wires an opened pool."""
        self.where = where
        self._connections = connections
        self._pool = pool
        self._reactor = reactor
        self._threads = IReactorFromThreads(reactor)
        self._clock = clock
        self._closed = False
        self._pending: set[defer.Deferred[Any]] = set()
        self._timers: dict[IDelayedCall, defer.Deferred[Any] | None] = {}
        self._channel = f"twistmail_queue_{connections.schema}"[:63]
        self._waiters: list[defer.Deferred[None]] = []
        self._listener: psycopg.Connection[Any] | None = None
        self._listen_pool: ThreadPool | None = None
        self._listen_delay = RETRY_FIRST
        self.retries = 0
        """Transactions tried again after a lost connection (or a serialization failure)."""
        self._trigger: object = reactor.addSystemEventTrigger(
            "before", "shutdown", self._close_at_shutdown
        )

    @classmethod
    def open(
        cls,
        url: str,
        *,
        schema: str = "twistmail",
        threads: int = 4,
        clock: Callable[[], float] | None = None,
        connect_timeout: float = 10.0,
        reactor: Reactor | None = None,
    ) -> defer.Deferred[PostgresQueue]:
        """Connect to the database at ``url`` and prepare ``schema`` (created if missing).

        ``threads`` connections run the queue's statements. ``clock()`` replaces the server's
        ``now()`` (tests only). Fails with :class:`QueueError` (naming the server, never the
        password) when the server cannot be reached, or the schema holds something else or a
        newer queue.
        """
        if psycopg is None:
            return defer.fail(
                QueueError("a PostgreSQL queue needs psycopg: pip install 'twistmail[postgresql]'")
            )
        reactor = reactor if reactor is not None else default_reactor()
        where = describe_url(url)
        connections = _Connections(url, schema, connect_timeout)
        pool = ThreadPool(minthreads=1, maxthreads=threads, name=f"twistmail-queue {where}")
        pool.start()

        def prepare() -> None:
            conn = connections.get()
            _prepare(conn, schema, where)

        d = threads_defer(reactor, pool, prepare)

        def opened(_: None) -> PostgresQueue:
            return cls(connections, pool, reactor, clock, where)

        def failed(failure: Failure) -> Failure:
            connections.close_all()
            pool.stop()
            if failure.check(QueueError):
                return failure
            if psycopg is not None and failure.check(psycopg.Error):
                raise QueueError(f"{where}: cannot use the queue ({failure.value})")
            return failure

        return d.addCallbacks(opened, failed)

    # The contract ---------------------------------------------------------------------------

    def enqueue(self, envelopes: Sequence[Envelope]) -> defer.Deferred[list[int]]:
        """Store ``envelopes`` as ``queued``, due now; fires with their ids once committed."""
        batch, token, channel = list(envelopes), uuid.uuid4(), self._channel
        return self._run(lambda conn, now, again: _insert(batch, token, channel, conn, now, again))

    def claim(
        self, owner: str, limit: int, *, lease: float
    ) -> defer.Deferred[list[ClaimedMessage]]:
        """Take up to ``limit`` due messages for ``owner`` for ``lease`` seconds (see IQueue)."""
        token = uuid.uuid4()
        return self._run(
            lambda conn, now, again: _claim(owner, limit, lease, token, conn, now, again)
        )

    def record(self, owner: str, outcome: Outcome) -> defer.Deferred[bool]:
        """Write an attempt's outcome unless ``owner`` lost the claim; False if it did."""
        return self._run(lambda conn, now, again: _record(owner, outcome, conn, now, again))

    def release(self, owner: str, claimed: Sequence[ClaimedMessage]) -> defer.Deferred[int]:
        """Give back claims not attempted (no attempt counted); fires with how many."""
        claims = [(c.id, c.fence) for c in claimed]
        return self._run(lambda conn, now, again: _release(owner, claims, conn, now, again))

    def renew(self, owner: str, lease: float) -> defer.Deferred[int]:
        """Extend every lease ``owner`` holds to ``lease`` seconds from now; fires with how many."""
        return self._run(lambda conn, now, again: _renew(owner, lease, conn, now, again))

    def next_due(self) -> defer.Deferred[float | None]:
        """Seconds until the earliest waiting message is due: 0.0 if now, None if none waits."""
        return self._run(_next_due)

    def summary(self) -> defer.Deferred[QueueSummary]:
        """Counts by state, and how many messages are due, held or with an expired lease."""
        return self._run(_summary)

    def unsent(self, limit: int = 20) -> defer.Deferred[list[QueueRow]]:
        """The first ``limit`` messages not sent, with their recipients' states."""
        return self._run(lambda conn, now, again: _unsent(limit, conn, now, again))

    # Wake-ups -------------------------------------------------------------------------------

    def notified(self) -> defer.Deferred[None]:
        """Fires at the next enqueue into this queue, by any process (or after the listening
        connection was lost and made again: something may have come meanwhile)."""
        if self._closed:
            return defer.fail(QueueError(f"{self.where}: the queue is closed"))
        waiter: defer.Deferred[None] = defer.Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        if self._listen_pool is None:
            self._listen_pool = ThreadPool(1, 1, name=f"twistmail-listen {self.where}")
            self._listen_pool.start()
            self._relisten()
        return waiter

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _relisten(self) -> None:
        if self._closed:
            return
        assert self._listen_pool is not None
        d = threads_defer(
            self._reactor, self._listen_pool, _listen, self._connections, self._channel
        )

        def listening(conn: psycopg.Connection[Any]) -> None:
            if self._closed:
                conn.close()
                return
            self._listener = conn
            self._listen_delay = RETRY_FIRST
            self._wake_waiters()  # an enqueue may have come while nobody listened
            self._wait()

        d.addCallbacks(listening, self._listen_failed)

    def _wait(self) -> None:
        if self._closed or self._listener is None:
            return
        assert self._listen_pool is not None
        d = threads_defer(self._reactor, self._listen_pool, _wait_notify, self._listener, 0.5)

        def heard(count: int) -> None:
            if count:
                self._wake_waiters()
            self._wait()

        d.addCallbacks(heard, self._listen_failed)

    def _listen_failed(self, failure: Failure) -> None:
        if self._closed:
            return
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        log.warn(
            "listening for new messages in {where} failed, again in {delay:g} s: {error}",
            where=self.where,
            delay=self._listen_delay,
            error=str(failure.value),
        )
        self._later(self._listen_delay, self._relisten)
        self._listen_delay = min(RETRY_MAX, self._listen_delay * 2)

    # Running transactions -------------------------------------------------------------------

    def _run(self, op: _Op) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(QueueError(f"{self.where}: the queue is closed"))
        result: defer.Deferred[Any] = defer.Deferred()
        self._pending.add(result)
        result.addBoth(self._settled, result)
        self._try(op, result, again=False, delay=RETRY_FIRST)
        return result

    def _settled(self, value: object, d: defer.Deferred[Any]) -> object:
        self._pending.discard(d)
        return value

    def _try(
        self,
        op: _Op,
        result: defer.Deferred[Any],
        *,
        again: bool,
        delay: float,
        backend: list[Any] | None = None,
    ) -> None:
        if result.called:
            return  # failed by close()
        now = self._clock() if self._clock is not None else None
        backend = [] if backend is None else backend
        attempt = threads_defer(
            self._reactor, self._pool, _transaction, self._connections, op, now, again, backend
        )

        def failed(failure: Failure) -> None:
            if result.called:
                return
            if self._closed or not _retryable(failure.value):  # type: ignore[arg-type]
                result.errback(failure)
                return
            self.retries += 1
            log.warn(
                "the queue's database {where} failed, trying again in {delay:g} s: {error}",
                where=self.where,
                delay=delay,
                error=str(failure.value).strip(),
            )
            self._later(
                delay,
                lambda: self._try(
                    op, result, again=True, delay=min(RETRY_MAX, delay * 2), backend=backend
                ),
                result,
            )

        attempt.addCallbacks(
            lambda value: None if result.called else result.callback(value), failed
        )

    def _later(
        self, delay: float, call: Callable[[], None], waiting: defer.Deferred[Any] | None = None
    ) -> None:
        """``call()`` in ``delay`` seconds, unless closed first (``waiting`` then fails)."""

        def fire() -> None:
            del self._timers[timer]
            call()

        timer = self._reactor.callLater(delay, fire)
        self._timers[timer] = waiting

    # Lifecycle ------------------------------------------------------------------------------

    def close(self) -> defer.Deferred[None]:
        """Let statements running finish, fail what waits to be tried again, close every
        connection and stop the threads; idempotent."""
        if self._closed:
            return self._when_closed()
        self._closed = True
        self._closed_waiters: list[defer.Deferred[None]] = []
        self._done = False
        if self._trigger is not None:
            trigger, self._trigger = self._trigger, None
            self._reactor.removeSystemEventTrigger(trigger)
        for timer, waiting in list(self._timers.items()):
            if timer.active():
                timer.cancel()
            if waiting is not None and not waiting.called:
                waiting.errback(QueueError(f"{self.where}: the queue was closed"))
        self._timers.clear()
        for waiter in list(self._waiters):
            waiter.cancel()
        listener, self._listener = self._listener, None
        listen_pool, self._listen_pool = self._listen_pool, None
        pool = self._pool

        def stop() -> None:
            if listen_pool is not None:
                listen_pool.stop()  # its thread waits at most 0.5 s for a notification
            if listener is not None:
                listener.close()
            pool.stop()
            self._connections.close_all()

        def stopped(_: object) -> None:
            self._done = True
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)

        running = [d for d in self._pending if not d.called]
        gathered = defer.DeferredList(running, consumeErrors=True)
        # Joined on a thread of the reactor's own pool: never on the reactor thread.
        gathered.addCallback(
            lambda _: threads.deferToThreadPool(
                self._threads, IReactorThreads(self._reactor).getThreadPool(), stop
            )
        ).addBoth(stopped)
        return self._when_closed()

    def _close_at_shutdown(self) -> defer.Deferred[None]:
        self._trigger = None  # firing: removing it now would make Twisted warn
        return self.close()

    def _when_closed(self) -> defer.Deferred[None]:
        if self._done:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(waiter)
        return waiter


def threads_defer(
    reactor: Reactor, pool: ThreadPool, function: Callable[..., _T], *args: Any
) -> defer.Deferred[_T]:
    """``function(*args)`` on ``pool``; the Deferred fires on the reactor thread."""
    return threads.deferToThreadPool(IReactorFromThreads(reactor), pool, function, *args)
