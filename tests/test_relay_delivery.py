"""Delivery by the real ``twistd twistmail``: retries on Postfix's schedule (shortened here),
failures, --max-age, an unreachable upstream, dead owners' claims and the delivery lock."""

from __future__ import annotations

import email
import re
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from relay_process import ROOT, TWISTD, RelayProcess
from servers import CueServer
from waiting import wait_until


def submit(relay: RelayProcess, *recipients: str, subject: str = "hello") -> int:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("app.test")
        smtp.mail("app@example.com")
        for rcpt in recipients:
            smtp.rcpt(rcpt)
        code, reply = smtp.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    assert code == 250, reply
    match = re.search(rb"queued as (\d+)", reply)
    assert match is not None
    return int(match.group(1))


def rows(path: Path) -> dict[int, tuple[str, int, str]]:
    with sqlite3.connect(path) as db:
        return {
            i: (state, attempts, response)
            for i, state, attempts, response in db.execute(
                "SELECT id, state, attempts, response FROM messages"
            )
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_4xx_is_retried_when_due_and_a_5xx_fails(tmp_path: Path) -> None:
    replies = {"busy": "451 4.2.1 try later"}
    with CueServer(
        rcpt_replies_once=replies, rcpt_replies={"gone": "550 5.1.1 no such user"}
    ) as up:
        path = tmp_path / "q.db"
        with RelayProcess(path, up.port, "--retry-delay", "1", "--max-retry-delay", "2") as relay:
            busy = submit(relay, "busy@example.org", subject="busy")
            gone = submit(relay, "gone@example.org", subject="gone")
            relay.wait_for(rf"delivery {busy} to=<busy@example.org> .*attempt=1 status=deferred")
            # Woken by the queue's next due time (about a second later), not by a poll.
            relay.wait_for(rf"delivery {busy} to=<busy@example.org> .*attempt=2 status=sent")
            relay.wait_for(rf"delivery {gone} to=<gone@example.org> .*status=failed reply=550")
            relay.wait_for(rf"notification \d+ queued for {gone} to=<app@example.com>")
            wait_until(lambda: len(up.received) == 2)
        assert rows(path)[busy][:2] == ("sent", 2)
        assert rows(path)[gone][:2] == ("failed", 1)
        delivered, dsn = sorted(up.received, key=lambda m: m.sender != "app@example.com")
        assert delivered.recipients == ["busy@example.org"]
        # The failure is reported to the envelope sender, from <>, as an RFC 3464 report.
        assert (dsn.sender, dsn.recipients) == ("", ["app@example.com"])
        report = email.message_from_bytes(dsn.data)
        assert report.get_content_type() == "multipart/report"
        assert report.get_param("report-type") == "delivery-status"
        parts = report.get_payload()
        assert isinstance(parts, list)
        status = parts[1]
        assert status.get_content_type() == "message/delivery-status"
        per_message, per_recipient = status.get_payload()
        assert per_message["Reporting-MTA"] == "dns; relay.test"
        assert per_recipient["Action"] == "failed"
        assert per_recipient["Status"] == "5.1.1"
        assert per_recipient["Final-Recipient"] == "rfc822; gone@example.org"
        assert per_recipient["Diagnostic-Code"].startswith("smtp; 550")
        assert b"Subject: gone" in parts[2].as_bytes()  # the original's headers


def test_no_notification_for_a_null_sender_or_with_no_bounces(tmp_path: Path) -> None:
    with CueServer(rcpt_replies={"gone": "550 5.1.1 no such user"}) as up:
        with RelayProcess(tmp_path / "a.db", up.port) as relay:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
                smtp.sendmail("<>", ["gone@example.org"], b"Subject: from null\r\n\r\nx\r\n")
            relay.wait_for(r"no notification for \d+ \(its sender is <>\)")
        with RelayProcess(tmp_path / "b.db", up.port, "--no-bounces") as relay:
            failed = submit(relay, "gone@example.org")
            relay.wait_for(rf"delivery {failed} .*status=failed")
        assert relay.count(r"notification \d+ queued") == 0
        assert rows(tmp_path / "b.db").keys() == {failed}  # nothing else was queued
        assert up.received == []


def test_max_age_fails_a_message_that_keeps_being_deferred(tmp_path: Path) -> None:
    with CueServer(rcpt_replies={"busy": "451 4.2.1 try later"}) as up:
        path = tmp_path / "q.db"
        options = ("--retry-delay", "1", "--max-retry-delay", "1", "--max-age", "3")
        with RelayProcess(path, up.port, *options) as relay:
            queue_id = submit(relay, "busy@example.org")
            relay.wait_for(rf"delivery {queue_id} .*status=failed", timeout=30)
        state, attempts, response = rows(path)[queue_id]
        assert state == "failed"
        assert attempts >= 2
        assert "expired" in response


def test_max_attempts_is_a_limit_only_when_given(tmp_path: Path) -> None:
    with CueServer(rcpt_replies={"busy": "451 4.2.1 try later"}) as up:
        path = tmp_path / "q.db"
        options = ("--retry-delay", "0.5", "--max-retry-delay", "0.5", "--max-attempts", "2")
        with RelayProcess(path, up.port, *options) as relay:
            queue_id = submit(relay, "busy@example.org")
            relay.wait_for(rf"delivery {queue_id} .*attempt=2 status=failed")
        assert rows(path)[queue_id][:2] == ("failed", 2)


def test_an_unreachable_upstream_keeps_everything_queued_without_attempts(
    tmp_path: Path,
) -> None:
    port = free_port()
    path = tmp_path / "q.db"
    with RelayProcess(path, port) as relay:
        ids = [submit(relay, f"u{n}@example.org", subject=f"wait {n}") for n in range(5)]
        relay.wait_for("the upstream cannot be reached, messages stay queued")
        # Given back untried (or still held by the paused loop): not one attempt spent.
        assert sorted(rows(path)) == ids
        assert all(state in ("queued", "sending") for state, _, _ in rows(path).values())
        assert all(attempts == 0 for _, attempts, _ in rows(path).values())
        with CueServer(port=port) as up:
            wait_until(lambda: len(up.received) == 5)
            relay.wait_for("the upstream works again")
            # Each outcome is recorded once its reply is in: wait for the records, not a log line.
            wait_until(lambda: all(r[:2] == ("sent", 1) for r in rows(path).values()))


def test_a_second_relay_on_the_same_queue_is_refused_while_writers_may_add(
    tmp_path: Path,
) -> None:
    with CueServer() as up:
        path = tmp_path / "q.db"
        with RelayProcess(path, up.port) as relay:
            second = subprocess.run(
                [*relay.argv],
                cwd=tmp_path,
                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert second.returncode != 0
            assert "another process" in second.stderr
            assert "is already delivering from this queue" in second.stderr
            # A writer (the spool backend, in its own process) adds to the same file.
            script = (
                "from twisted.internet import task\n"
                "from twistmail.backends.spool import SpoolBackend\n"
                "def main(reactor):\n"
                f"    b = SpoolBackend({str(path)!r})\n"
                "    d = b.send_messages([('w@example.com', ['spooled@example.org'], "
                "b'Subject: spooled\\r\\n\\r\\nx\\r\\n')])\n"
                "    return d.addCallback(lambda _: b.close())\n"
                "task.react(main)\n"
            )
            written = subprocess.run(
                [TWISTD[0], "-c", script],
                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert written.returncode == 0, written.stderr
            # The relay notices the other process's commit and delivers it (nothing else is
            # due and no timer is set: without the notice it would wait for a submission).
            wait_until(lambda: any("spooled@example.org" in m.recipients for m in up.received))


def test_at_start_only_dead_relays_claims_are_taken_back(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "q.db"
    with RelayProcess(path, port) as relay:
        dead, live = submit(relay, "a@example.org"), submit(relay, "b@example.org")
    later = time.time() + 3600
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE messages SET state='sending', owner=?, lease_until=? WHERE id=?",
            ("relay:gone-host:123:abcd", later, dead),
        )
        db.execute(
            "UPDATE messages SET state='sending', owner=?, lease_until=? WHERE id=?",
            ("otherhost:0123456789abcdef", later, live),
        )
    with CueServer(port=port) as up, RelayProcess(path, port) as relay:
        relay.wait_for("took back 1 messages claimed by a relay that died")
        wait_until(lambda: len(up.received) == 1)
        assert up.received[0].recipients == ["a@example.org"]
        # The other owner's claim (a drain, say, whose lock we cannot see) waits for its lease.
        assert rows(path)[live][0] == "sending"


def test_twistmail_serve_runs_the_same_relay_in_the_foreground(tmp_path: Path) -> None:
    with CueServer() as up:
        relay = RelayProcess(tmp_path / "q.db", up.port)
        # `twistmail serve OPTIONS` instead of `twistd -n --pidfile= twistmail OPTIONS`.
        options = relay.argv[relay.argv.index("twistmail") + 1 :]
        relay.argv = [sys.executable, "-m", "twistmail", "serve", *options]
        with relay:
            queue_id = submit(relay, "served@example.org")
            relay.wait_for(rf"delivery {queue_id} to=<served@example.org> .*status=sent")
        assert relay.process is not None
        assert relay.process.returncode == 0
        assert not (tmp_path / "twistd.pid").exists()
