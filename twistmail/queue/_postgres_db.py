"""The PostgreSQL queue's side in its threads: the schema, the SQL, one connection per
thread. Used by :mod:`twistmail.queue.postgres` (see its docstring); nothing here runs on
the reactor thread."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

from ..address import Address, parse_address, parse_sender
from ..message import Envelope
from ..suppression.records import SHOWN_STATE_SQL
from .records import (
    MESSAGE_STATES,
    ClaimedMessage,
    Outcome,
    QueueError,
    QueueRow,
    QueueSummary,
    migrations_from,
)

try:  # an optional dependency: pip install 'twistmail[postgresql]'
    import psycopg
    from psycopg import sql
except ImportError:  # pragma: no cover - reported when a PostgreSQL queue is opened
    psycopg = None  # type: ignore[assignment]

__all__ = ["SCHEMA_VERSION", "describe_url"]


SCHEMA_VERSION: Final = "1"

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
    "CREATE INDEX messages_failed ON messages (updated_at, id) WHERE state = 'failed'",
    """CREATE TABLE recipients (
        message bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        position integer NOT NULL,
        address text NOT NULL,
        state text NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
        code integer,
        response text NOT NULL DEFAULT '',
        enhanced text,
        PRIMARY KEY (message, position)
    )""",
    # Idempotency keys (the HTTP API's), each with the message it queued, kept >= their keep.
    """CREATE TABLE idempotency (
        scope text NOT NULL,
        key text NOT NULL,
        fingerprint text NOT NULL,
        message bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        created_at float8 NOT NULL,
        PRIMARY KEY (scope, key)
    )""",
    "CREATE INDEX idempotency_created ON idempotency (created_at)",
    # The suppression list (twistmail.queue.postgres_suppression): "" list_id = all mail.
    """CREATE TABLE suppressions (
        address text NOT NULL,
        list_id text NOT NULL DEFAULT '',
        reason text NOT NULL
            CHECK (reason IN ('unsubscribed', 'hard-bounce', 'complaint', 'manual')),
        detail text NOT NULL DEFAULT '',
        created_at float8 NOT NULL,
        PRIMARY KEY (address, list_id)
    )""",
)

# Tables added to version 1 after its first use (it is unreleased): made wherever missing.
_ADDED: Final[tuple[str, ...]] = (
    # The shared --rate: each row a schedule of sending slots; next is its first free one.
    """CREATE TABLE IF NOT EXISTS rate_slots (
        name text PRIMARY KEY,
        next float8 NOT NULL
    )""",
    # --per-domain shared: one row per slot held, by whom, until when (a dead holder's expire).
    """CREATE TABLE IF NOT EXISTS domain_slots (
        domain text NOT NULL,
        holder text NOT NULL,
        until float8 NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS domain_slots_domain ON domain_slots (domain)",
    "CREATE INDEX IF NOT EXISTS domain_slots_holder ON domain_slots (holder)",
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
UPDATE recipients SET state = t.state, code = t.code, response = t.response,
    enhanced = t.enhanced
FROM unnest(%s::integer[], %s::text[], %s::integer[], %s::text[], %s::text[])
     AS t (position, state, code, response, enhanced)
WHERE recipients.message = %s AND recipients.position = t.position
"""

# count slots interval seconds apart from the first free one (now, if that is past); the row
# lock orders the workers asking at once. Fires with (first, now).
_RESERVE = _timed("""
INSERT INTO rate_slots AS r (name, next) VALUES (%(name)s, $NOW + %(span)s)
ON CONFLICT (name) DO UPDATE SET next = greatest(r.next, $NOW) + %(span)s
RETURNING next - %(span)s, $NOW
""")

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


_SESSION = """
SELECT set_config('search_path', %(path)s, false),
       set_config('synchronous_commit', CASE current_setting('synchronous_commit')
           WHEN 'off' THEN 'on' ELSE current_setting('synchronous_commit') END, false)
"""


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
        # A commit must be on disk before it is reported (a relay answers 250 on it): a server
        # or role configured with synchronous_commit=off is overridden for these connections
        # (local, on, remote_write and remote_apply are all durable here, and kept). One round
        # trip with the search path: a connection is made again after every cut.
        conn.execute(_SESSION, {"path": sql.Identifier(self.schema).as_string(conn)})
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
            for statement in (*_SCHEMA, *_ADDED):
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
        for statement in migrations_from(
            meta.get("schema_version", ""),
            SCHEMA_VERSION,
            _MIGRATIONS,
            lambda version: QueueError(
                f"{where}: schema {schema!r} is a twistmail queue of schema version "
                f"{version!r}, which this twistmail (schema {SCHEMA_VERSION}) cannot use; "
                "upgrade twistmail to use it"
            ),
        ):
            conn.execute(statement)
        for statement in _ADDED:
            conn.execute(statement)
        conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (SCHEMA_VERSION,))


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


# Claims, outcomes, releases and renewals need not wait for their commit's WAL flush: a killed
# worker or a cut connection loses none of them; a crash of the database server itself may lose
# the last few milliseconds of them, and those messages then go out again (as a SQLite queue's
# outcomes at synchronous=NORMAL after a power cut). Enqueues always wait: a 250 hangs on them.
_NO_FLUSH_WAIT = "SET LOCAL synchronous_commit TO off"


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
    conn.execute(_NO_FLUSH_WAIT)
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
    conn.execute(_NO_FLUSH_WAIT)
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
            [o.enhanced_at(i) for i in range(len(recipients))],
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
    conn.execute(_NO_FLUSH_WAIT)
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


def reserve_slots(
    name: str,
    count: int,
    interval: float,
    conn: psycopg.Connection[Any],
    now: float | None,
    again: bool,
) -> tuple[float, float]:
    """``count`` slots of schedule ``name``: ``(first, now)`` (see :data:`_RESERVE`)."""
    row = conn.execute(_RESERVE, {"name": name, "span": count * interval, "now": now}).fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


def take_domain_slots(
    holder: str,
    domain: str,
    count: int,
    cap: int,
    lease: float,
    conn: psycopg.Connection[Any],
    now: float | None,
    again: bool,
) -> int:
    """Up to ``count`` of ``domain``'s slots for ``holder``, ``cap`` held by all together;
    how many it got. Requests for one domain are serialised by an advisory lock."""
    conn.execute(_NO_FLUSH_WAIT)
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"twistmail-domain:{domain}",))
    params = {"domain": domain, "holder": holder, "lease": lease, "now": now}
    conn.execute(
        _timed("DELETE FROM domain_slots WHERE domain = %(domain)s AND until <= $NOW"), params
    )
    row = conn.execute(
        "SELECT count(*) FROM domain_slots WHERE domain = %(domain)s", params
    ).fetchone()
    free = cap - (int(row[0]) if row is not None else 0)
    got = max(0, min(count, free))
    if got:
        conn.execute(
            _timed(
                "INSERT INTO domain_slots (domain, holder, until) "
                "SELECT %(domain)s, %(holder)s, $NOW + %(lease)s FROM generate_series(1, %(got)s)"
            ),
            {**params, "got": got},
        )
    return got


def give_domain_slots(
    holder: str,
    domain: str,
    count: int,
    conn: psycopg.Connection[Any],
    now: float | None,
    again: bool,
) -> int:
    """Hand back ``count`` of ``holder``'s slots of ``domain``; how many there were."""
    conn.execute(_NO_FLUSH_WAIT)
    return conn.execute(
        "DELETE FROM domain_slots WHERE ctid IN (SELECT ctid FROM domain_slots "
        "WHERE domain = %s AND holder = %s LIMIT %s)",
        (domain, holder, count),
    ).rowcount


def renew_domain_slots(
    holder: str, lease: float, conn: psycopg.Connection[Any], now: float | None, again: bool
) -> int:
    """Every slot of ``holder`` held ``lease`` more seconds from now; how many."""
    conn.execute(_NO_FLUSH_WAIT)
    return conn.execute(
        _timed("UPDATE domain_slots SET until = $NOW + %(lease)s WHERE holder = %(holder)s"),
        {"holder": holder, "lease": lease, "now": now},
    ).rowcount


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


def _queued_at(
    message: int, conn: psycopg.Connection[Any], now: float | None, again: bool
) -> float | None:
    row = conn.execute("SELECT created_at FROM messages WHERE id = %s", (message,)).fetchone()
    return None if row is None else float(row[0])


def _oldest_waiting(conn: psycopg.Connection[Any], now: float | None, again: bool) -> float | None:
    row = conn.execute(
        "SELECT min(created_at) FROM messages WHERE state IN ('queued', 'deferred', 'sending')"
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def _unsent(
    limit: int, conn: psycopg.Connection[Any], now: float | None, again: bool
) -> list[QueueRow]:
    rows = conn.execute(
        "SELECT m.id, m.message_id, m.state, m.attempts, m.due, m.code, m.response, "  # noqa: S608
        f"string_agg(r.address || ' ' || {SHOWN_STATE_SQL}, ', ' ORDER BY r.position) "
        "FROM messages m "
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
