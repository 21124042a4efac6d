"""The relay on a PostgreSQL queue: several ``twistd twistmail`` instances share it, a killed one
loses no acknowledged message, and its health and metrics keep working (also while the
database is away)."""

from __future__ import annotations

import collections
import json
import re
import signal
import smtplib
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import postgres_server
import psycopg
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from relay_process import RelayProcess
from servers import CueServer
from tcp_proxy import CuttingProxy
from twisted.internet import defer, reactor, task
from waiting import wait_until

from twistmail.relay import service as service_module
from twistmail.relay.config import RelayConfig
from twistmail.relay.service import RelayService

SUBJECT = re.compile(rb"Subject: (m\d+-\d+)")
MESSAGE_ID = re.compile(rb"(?im)^Message-ID: (<[^>]+>)")
HTTP_LISTENING = re.compile(r"HTTP \(API[^)]*\) listening on [^:]+:(\d+)")


@pytest.fixture
def schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped after it."""
    postgres_server.require()
    name = postgres_server.new_schema()
    yield name
    postgres_server.drop_schema(name)


@pytest.fixture
def relays() -> Iterator[list[RelayProcess]]:
    """Relays a test starts: any still running at its end (a failed test) is killed."""
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        if relay.process is not None and relay.process.poll() is None:
            relay.process.kill()
            relay.process.wait(30)


def query(schema: str, text: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(postgres_server.URL, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return conn.execute(text, args).fetchall()  # type: ignore[arg-type]


def message_ids(schema: str, where: str, *args: object) -> set[str]:
    return {str(mid) for (mid,) in query(schema, f"SELECT message_id FROM messages {where}", *args)}


def test_two_relays_on_one_queue_one_killed_every_acknowledged_message_is_delivered(
    tmp_path: Path, schema: str, relays: list[RelayProcess]
) -> None:
    total, clients, concurrency = 600, 4, 5
    url = f"{postgres_server.URL}?schema={schema}"
    acknowledged: set[str] = set()
    by_relay: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    next_index = iter(range(total))
    options = (
        "--lease",
        "4",
        "--concurrency",
        str(concurrency),
        "--rate",
        "40",
        "--per-domain",
        "4",
    )
    with CueServer(pipelining=True) as upstream:
        killed, survivor = (
            RelayProcess(tmp_path / "unused", upstream.port, *options, queue_url=url).start()
            for _ in range(2)
        )
        relays.extend([killed, survivor])
        ports = [killed.port, survivor.port]

        def submit_all(client: int) -> None:
            for i in next_index:
                attempt = 0
                while True:
                    marker = f"m{i}-{attempt}"  # a resent message is a different message
                    port = ports[(client + attempt) % 2]  # each relay gets its share
                    try:
                        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                            smtp.sendmail(
                                "app@example.com",
                                [f"u{i}@example.org"],
                                f"Subject: {marker}\r\n\r\nbody {marker}\r\n".encode(),
                            )
                        with lock:
                            acknowledged.add(marker)
                            by_relay[port] += 1
                        break
                    except (OSError, smtplib.SMTPException):
                        attempt += 1

        threads = [
            threading.Thread(target=submit_all, args=(c,), daemon=True) for c in range(clients)
        ]
        for thread in threads:
            thread.start()
        # --rate keeps a backlog claimed by each relay: the kill finds deliveries in flight.
        wait_until(lambda: len(acknowledged) >= total // 2 and len(upstream.received) > 100)
        killed.signal(signal.SIGKILL)
        assert killed.wait(30) == -signal.SIGKILL
        pid = killed.process.pid  # type: ignore[union-attr]
        # What the killed relay held when it died (its lease has 4 s to run).
        in_flight = message_ids(
            schema, "WHERE state = 'sending' AND owner LIKE %s", f"relay:%:{pid}:%"
        )
        assert in_flight
        for thread in threads:
            thread.join(300)
        assert len(acknowledged) >= total
        assert min(by_relay[ports[0]], by_relay[ports[1]]) > 50, by_relay

        def seen() -> collections.Counter[str]:
            return collections.Counter(
                m.group(1).decode()
                for r in list(upstream.received)
                if (m := SUBJECT.search(r.data))
            )

        wait_until(lambda: acknowledged <= set(seen()), timeout=120)
        wait_until(
            lambda: query(schema, "SELECT count(*) FROM messages WHERE state != 'sent'") == [(0,)],
            timeout=60,
        )
        assert survivor.stop() == 0, "\n".join(survivor.lines)
    counts = seen()
    assert not acknowledged - set(counts)
    duplicates = {
        found.group(1).decode()
        for r in upstream.received
        if (subject := SUBJECT.search(r.data))
        and counts[subject.group(1).decode()] > 1
        and (found := MESSAGE_ID.search(r.data))
    }
    # Only what the killed relay had claimed when it died went out twice, and at most its
    # --concurrency (the duplicate bound: delivered, outcome not yet committed).
    assert duplicates <= in_flight, (duplicates, in_flight)
    assert len(duplicates) <= concurrency
    # Its claims came back to the survivor when its lease ran out (claimed again: a new fence).
    assert in_flight <= message_ids(schema, "WHERE fence > 1")


def test_health_and_metrics_of_a_relay_on_postgresql(
    tmp_path: Path, schema: str, relays: list[RelayProcess]
) -> None:
    url = f"{postgres_server.URL}?schema={schema}"
    with CueServer(pipelining=True) as upstream:
        relay = RelayProcess(
            tmp_path / "unused", upstream.port, queue_url=url, http="tcp:0:interface=127.0.0.1"
        ).start()
        relays.append(relay)
        listening = HTTP_LISTENING.search(relay.wait_for(HTTP_LISTENING))
        assert listening is not None
        base = f"http://127.0.0.1:{listening.group(1)}"
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            for n in range(3):
                smtp.sendmail("app@example.com", [f"u{n}@example.org"], b"Subject: x\r\n\r\nx\r\n")
        wait_until(lambda: len(upstream.received) == 3)
        with urllib.request.urlopen(f"{base}/healthz", timeout=30) as response:
            assert response.status == 200
            health = json.load(response)
        assert health["queue_writable"] is True
        assert health["upstream"] == "ok"

        def metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
                text = r.read().decode()
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }

        sent = ("twistmail_relay_queue_messages", (("state", "sent"),))
        wait_until(lambda: metrics().get(sent) == 3)
        got = metrics()
        assert got[("twistmail_relay_messages_accepted_total", ())] == 3
        assert got[("twistmail_relay_oldest_queued_age_seconds", ())] == 0
        assert relay.stop() == 0


@pytest_twisted.ensureDeferred
async def test_healthz_says_not_writable_while_the_database_is_away_and_a_stop_still_ends(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "HEALTH_TIMEOUT", 0.5)
    monkeypatch.setattr(service_module, "CLOSE_GRACE", 0.5)
    info = conninfo_to_dict(postgres_server.URL)
    proxy = CuttingProxy(str(info.get("host", "127.0.0.1")), int(info.get("port", 5432)))
    port = proxy.listen()
    user, db = info.get("user", "postgres"), info.get("dbname", "test")
    url = f"postgresql://{user}@127.0.0.1:{port}/{db}?schema={schema}&connect_timeout=2"
    config = RelayConfig(
        smtp_url="smtp://127.0.0.1:9",
        queue_url=url,
        submission=None,
        http=None,
        shutdown_timeout=1.0,
    )
    service = RelayService.make(config, reactor)  # type: ignore[arg-type]
    service.startService()
    stopped = None
    try:
        await poll(lambda: service.worker is not None and service.worker.running)
        assert (await service.health())["queue_writable"] is True

        async def database_away() -> None:
            proxy.refusing = True
            proxy.cut()
            # Answered (not left hanging while the queue tries again): 503 over HTTP.
            answer = service.health()
            await poll(lambda: answer.called, seconds=10)
            assert (await answer)["queue_writable"] is False

        await database_away()
        proxy.refusing = False  # it comes back
        await poll(lambda: service.health().addCallback(lambda h: h["queue_writable"]))
        await database_away()
        # Stopped while the database is away: the worker's claims cannot be settled, so the
        # queue is closed under it once --shutdown-timeout and the grace have passed.
        stopped = service.stopService()
        await poll(lambda: stopped.called, seconds=20)
    finally:
        if stopped is None:
            await service.stopService()
        await proxy.stop()


async def poll(condition: Callable[[], Any], seconds: float = 60) -> None:
    """Wait, on the reactor, until ``condition()`` (a bool or a Deferred of one) is true."""
    deadline = time.monotonic() + seconds
    while not await defer.maybeDeferred(condition):
        assert time.monotonic() < deadline, "timed out"
        await task.deferLater(reactor, 0.1, lambda: None)
