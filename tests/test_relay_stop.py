"""Stopping the real ``twistd twistmail``: SIGTERM is a graceful stop that a restart carries on
from; SIGKILL at any moment loses no message that got its 250."""

from __future__ import annotations

import collections
import re
import signal
import smtplib
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from relay_process import RelayProcess
from servers import CueServer
from waiting import wait_until

QUEUED = re.compile(rb"queued as (\d+)")


@pytest.fixture
def relays() -> Iterator[list[RelayProcess]]:
    """Relays a test starts by hand: any still running at its end (a failed test) is killed."""
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        if relay.process is not None and relay.process.poll() is None:
            relay.process.kill()
            relay.process.wait(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n\Z", data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_sigterm_finishes_data_ends_idle_sessions_and_a_restart_carries_on(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    path = tmp_path / "q.db"
    # The upstream never answers a message's final dot: that delivery stays in flight.
    with CueServer(stall_on="DOT") as stalled:
        relay = RelayProcess(path, stalled.port, "--shutdown-timeout", "1", "--retry-delay", "1")
        relays.append(relay.start())
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.sendmail(
                "app@example.com", ["first@example.org"], b"Subject: in flight\r\n\r\n1\r\n"
            )
        wait_until(lambda: len(stalled.commands) > 0 and "DATA" in " ".join(stalled.commands))
        idle = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
        assert read_reply(idle).startswith(b"220")
        busy = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
        read_reply(busy)
        busy.sendall(
            b"EHLO a\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<second@example.org>\r\nDATA\r\n"
        )
        got = b""
        while b"354" not in got:
            got += busy.recv(4096)
        busy.sendall(b"Subject: during stop\r\n\r\nfirst half\r\n")
        relay.signal(signal.SIGTERM)
        assert read_reply(idle).startswith(b"421 ")  # an idle session is told at once
        with pytest.raises(ConnectionRefusedError):  # no new session: the listener is closed
            socket.create_connection(("127.0.0.1", relay.port), timeout=30)
        time.sleep(0.2)  # the listener is closed before the message in DATA ends
        busy.sendall(b"second half\r\n.\r\n")
        finished = read_reply(busy)
        assert finished.startswith(b"250 2.0.0 Ok: queued as"), finished
        assert b"421" in finished + busy.recv(4096)  # then the session is closed
        assert relay.wait(60) == 0
        assert relay.count("stopped") >= 1
        idle.close()
        busy.close()
    with sqlite3.connect(path) as db:
        states = dict(
            db.execute(
                "SELECT r.address, m.state FROM messages m JOIN recipients r ON r.message = m.id"
            )
        )
    assert set(states) == {"first@example.org", "second@example.org"}
    assert "sent" not in states.values()
    # A restart delivers both (the one cut off in flight is deferred for a second).
    with CueServer() as upstream, RelayProcess(path, upstream.port, "--retry-delay", "1"):
        wait_until(lambda: len(upstream.received) == 2)
    assert sorted(r for m in upstream.received for r in m.recipients) == sorted(states)


def test_sigkill_during_2000_submissions_loses_no_acknowledged_message(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    total, clients, kills = 2000, 4, 3
    path = tmp_path / "q.db"
    port = free_port()
    acknowledged: set[str] = set()
    lock = threading.Lock()
    next_index = iter(range(total))
    with CueServer(pipelining=True) as upstream:
        relay = RelayProcess(path, upstream.port, port=port).start()
        relays.append(relay)

        def submit_all() -> None:
            for i in next_index:
                attempt = 0
                while True:
                    marker = f"m{i}-{attempt}"  # a resent message is a different message
                    try:
                        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                            smtp.sendmail(
                                "app@example.com",
                                [f"u{i}@example.org"],
                                f"Subject: {marker}\r\n\r\nbody {marker}\r\n".encode(),
                            )
                        with lock:
                            acknowledged.add(marker)
                        break
                    except (OSError, smtplib.SMTPException):
                        attempt += 1
                        time.sleep(0.05)

        threads = [threading.Thread(target=submit_all, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for k in range(kills):
            wait_until(lambda k=k: len(acknowledged) >= (k + 1) * total // (kills + 1))
            relay.signal(signal.SIGKILL)
            relay.wait(30)
            relay = RelayProcess(path, upstream.port, port=port).start()
            relays.append(relay)
        for thread in threads:
            thread.join(300)
        assert len(acknowledged) >= total
        subjects = re.compile(rb"Subject: (m\d+-\d+)")

        def seen() -> collections.Counter[str]:
            return collections.Counter(
                m.group(1).decode()
                for r in list(upstream.received)
                if (m := subjects.search(r.data))
            )

        wait_until(lambda: acknowledged <= set(seen()), timeout=120)
        assert relay.stop() == 0
    counts = seen()
    missing = acknowledged - set(counts)
    assert not missing
    duplicates = {marker: n for marker, n in counts.items() if n > 1}
    # Only deliveries in flight at a kill go out twice: at most --concurrency (10) per kill.
    assert len(duplicates) <= 10 * kills, duplicates
