"""``twistmail drain`` as a subprocess: messages enqueued in process with the spool backend,
delivered to real SMTP servers on 127.0.0.1 from a real SQLite spool.

The subprocesses are started with Popen and polled with deferLater, so servers running in the
test's reactor (CaptureServer) keep serving while a drain runs. Nothing waits for real time to
pass: retry delays and leases are long, and a run "later" is a drain in process whose queue is
opened with a clock set ahead (the store owns time).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest_twisted
from servers import CueServer
from twisted.internet import reactor
from waiting import until

from twistmail.backends.spool import SpoolBackend
from twistmail.mailer import Mailer
from twistmail.queue.sqlite import SqliteQueue
from twistmail.queue.worker import Drain, DrainReport
from twistmail.retry import RetryPolicy
from twistmail.testing import CaptureServer

Cue = Callable[..., CueServer]
MESSAGE_ID = re.compile(rb"\r\nMessage-ID: (<[^>]+>)\r\n")


def triple(n: int, *recipients: str) -> tuple[str, list[str], bytes]:
    rcpts = list(recipients) or [f"user{n}@example.org"]
    data = (
        f"From: shop@example.com\r\nTo: {', '.join(rcpts)}\r\nMessage-ID: <m{n}@test>\r\n"
        f"Subject: message {n}\r\n\r\nHello {n}.\r\n"
    ).encode()
    return ("shop@example.com", rcpts, data)


async def enqueue(path: Path, messages: Iterable[Any]) -> int:
    backend = SpoolBackend(path=path)
    try:
        count: int = await backend.send_messages(list(messages))
    finally:
        await backend.close()
    return count


def start_drain(
    *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[str]:
    """``twistmail drain`` as a subprocess; its output piped, or written to ``log`` as it goes."""
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("w")) if log is not None else subprocess.PIPE
        return subprocess.Popen(
            [sys.executable, "-m", "twistmail", "drain", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )


async def finish(proc: subprocess.Popen[str], seconds: float = 60) -> tuple[int, str]:
    try:
        await until(lambda: proc.poll() is not None, "the drain finished", seconds)
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    output = ""
    if proc.stdout is not None:
        output = proc.stdout.read()
        proc.stdout.close()
    return proc.returncode, output


async def drain(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    return await finish(start_drain(*args, env=env))


async def drain_later(path: Path, port: int, ahead: float, **options: Any) -> DrainReport:
    """One drain pass in process on a queue whose clock reads ``ahead`` seconds past now."""
    spool = await SqliteQueue.open(path, create=False, clock=lambda: time.time() + ahead)
    mailer = Mailer(f"smtp://127.0.0.1:{port}", max_attempts=1, reactor=reactor)
    try:
        retry = RetryPolicy(max_attempts=5, initial_delay=600)
        return await Drain(spool, mailer, retry=retry, reactor=reactor, **options).run()
    finally:
        await mailer.close()
        await spool.close()


def query(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def states(path: Path) -> dict[str, int]:
    return dict(query(path, "SELECT state, count(*) FROM messages GROUP BY state"))


@pytest_twisted.ensureDeferred
async def test_two_drains_at_once_send_every_message_exactly_once(
    capture_server: Callable[..., CaptureServer], tmp_path: Path
) -> None:
    server = capture_server()
    path = tmp_path / "spool.db"
    assert await enqueue(path, (triple(n) for n in range(2000))) == 2000
    url = f"smtp://127.0.0.1:{server.port}"
    # Small claims so that the two drains interleave.
    procs = [start_drain("--spool", str(path), "--smtp", url, "--concurrency", "4") for _ in "ab"]
    results = [await finish(p, 120) for p in procs]
    for code, output in results:
        # 0 for both: messages held by the other (live) drain are not "remaining".
        assert code == 0, output
    ids = collections.Counter(
        m.group(1) for m in (MESSAGE_ID.search(msg.data) for msg in server.messages) if m
    )
    assert len(server.messages) == 2000
    assert set(ids.values()) == {1}
    assert set(ids) == {f"<m{n}@test>".encode() for n in range(2000)}
    assert states(path) == {"sent": 2000}
    sent = [re.search(r"drain: (\d+) sent", out) for _, out in results]
    assert sum(int(m.group(1)) for m in sent if m) == 2000


@pytest_twisted.ensureDeferred
async def test_refusals_deferrals_and_partial_retries_across_runs(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server(
        rcpt_replies={"bounce": "550 5.1.1 no such user"},
        rcpt_replies_once={
            "slow": "451 4.2.1 mailbox busy",
            "later": "452 4.2.2 over quota, try later",
        },
    )
    path = tmp_path / "spool.db"
    messages = [
        triple(1, "ann@example.org"),
        triple(2, "bounce@example.org"),
        triple(3, "slow@example.org"),
        triple(4, "carl@example.org", "later@example.org"),
    ]
    assert await enqueue(path, messages) == 4
    url = f"smtp://127.0.0.1:{server.port}"
    code, output = await drain("--spool", str(path), "--smtp", url, "--retry-delay", "600")
    assert code == 1, output  # the 550
    assert re.search(r"failed: message \d+ <m2@test>: bounce@example.org: .*no such user", output)
    assert "drain: 1 sent, 2 deferred, 1 failed;" in output
    assert [m.recipients for m in server.received] == [["ann@example.org"], ["carl@example.org"]]

    by_mid = {
        mid: (state, attempts, due - updated, code_, response)
        for mid, state, attempts, due, updated, code_, response in query(
            path,
            "SELECT message_id, state, attempts, due, updated_at, code, response FROM messages",
        )
    }
    assert by_mid["<m2@test>"][:2] == ("failed", 1)
    assert by_mid["<m2@test>"][3] == 550
    assert "no such user" in by_mid["<m2@test>"][4]
    for mid in ("<m3@test>", "<m4@test>"):
        state, attempts, delay, _, _ = by_mid[mid]
        assert (state, attempts) == ("deferred", 1)
        assert 600 * 0.8 <= delay <= 600 * 1.2  # due: the retry delay (with jitter) after the try
    assert by_mid["<m3@test>"][3] == 451
    assert query(
        path,
        "SELECT r.address, r.state, r.code FROM recipients r JOIN messages m "
        "ON m.id = r.message WHERE m.message_id = '<m4@test>' ORDER BY r.position",
    ) == [("carl@example.org", "sent", 250), ("later@example.org", "pending", 452)]

    # Before the retry time: nothing is due, the deferred ones remain (exit 3).
    code, output = await drain("--spool", str(path), "--smtp", url)
    assert code == 3, output
    assert "drain: 0 sent, 0 deferred, 0 failed;" in output
    assert len(server.received) == 2
    # Once the retry delay has passed on the queue's clock, both go.
    report = await drain_later(path, server.port, ahead=600 * 1.2 + 1)
    assert (report.sent, report.deferred, report.failed) == (2, 0, 0)
    # Only the deferred recipient of message 4 was tried again.
    assert sorted(m.recipients for m in server.received[2:]) == [
        ["later@example.org"],
        ["slow@example.org"],
    ]
    assert states(path) == {"sent": 3, "failed": 1}
    # A later run finds nothing to do; the failed message stays, with its payload and reason.
    code, output = await drain("--spool", str(path), "--smtp", url)
    assert code == 0, output
    assert len(server.received) == 4
    assert query(
        path,
        "SELECT length(data) > 0 FROM payloads JOIN messages ON id = message "
        "WHERE state = 'failed'",
    ) == [(1,)]
    code, output = await drain("--spool", str(path), "--status")
    assert code == 0
    assert re.search(r"sent\s+3", output)
    assert re.search(r"failed\s+1", output)
    assert re.search(r"<m2@test> failed 550 attempts=1 bounce@example.org: .*no such user", output)


@pytest_twisted.ensureDeferred
async def test_attempts_run_out_into_failed(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server(rcpt_replies={"slow": "421 4.3.2 not now"})
    path = tmp_path / "spool.db"
    await enqueue(path, [triple(1, "slow@example.org")])
    url = f"smtp://127.0.0.1:{server.port}"
    code, output = await drain("--spool", str(path), "--smtp", url, "--max-attempts", "1")
    assert code == 1, output
    assert "gave up after 1 attempts" in output
    assert query(path, "SELECT state, attempts, code FROM messages") == [("failed", 1, 421)]


@pytest_twisted.ensureDeferred
async def test_limit_leaves_the_rest_for_the_next_run(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server()
    path = tmp_path / "spool.db"
    await enqueue(path, (triple(n) for n in range(5)))
    url = f"smtp://127.0.0.1:{server.port}"
    code, output = await drain("--spool", str(path), "--smtp", url, "--limit", "2")
    assert code == 3, output
    assert "drain: 2 sent, 0 deferred, 0 failed (--limit reached); spool: 3 queued" in output
    assert len(server.received) == 2
    code, output = await drain("--spool", str(path), "--smtp", url)
    assert code == 0, output
    found = [MESSAGE_ID.search(m.data) for m in server.received]
    assert sorted(m.group(1) for m in found if m) == [f"<m{n}@test>".encode() for n in range(5)]


@pytest_twisted.ensureDeferred
async def test_the_password_is_used_but_never_shown(cue_server: Cue, tmp_path: Path) -> None:
    secret = "s3cr3t-pw"
    server = cue_server(auth={"alice": secret})
    path = tmp_path / "spool.db"
    await enqueue(path, (triple(n) for n in range(3)))
    url = f"smtp://alice@127.0.0.1:{server.port}"
    # Wrong password: a configuration error, nothing is spent.
    code, output = await drain(
        "--spool", str(path), "--smtp", url, env={"TWISTMAIL_SMTP_PASSWORD": "wrong-pw"}
    )
    assert code == 2, output
    assert "wrong-pw" not in output
    assert "error:" in output
    assert query(path, "SELECT DISTINCT state, attempts FROM messages") == [("queued", 0)]
    # From the environment.
    code, output = await drain(
        "--spool", str(path), "--smtp", url, "--limit", "1", env={"TWISTMAIL_SMTP_PASSWORD": secret}
    )
    assert code == 3, output
    assert secret not in output
    # From a file.
    password_file = tmp_path / "password"
    password_file.write_text(secret + "\n", encoding="utf-8")
    code, output = await drain(
        "--spool", str(path), "--smtp", url, "--password-file", str(password_file)
    )
    assert code == 0, output
    assert secret not in output
    assert len(server.received) == 3
    # In the URL: refused before anything is spent, and never echoed.
    await enqueue(path, [triple(9)])
    code, output = await drain(
        "--spool", str(path), "--smtp", f"smtp://alice:{secret}@127.0.0.1:{server.port}"
    )
    assert code == 2, output
    assert "error: --smtp must not contain the password" in output
    assert secret not in output
    assert len(server.received) == 3
    assert query(path, "SELECT state, attempts FROM messages WHERE state != 'sent'") == [
        ("queued", 0)
    ]


@pytest_twisted.ensureDeferred
async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.db")
    code, output = await drain("--spool", missing, "--smtp", "smtp://127.0.0.1:1")
    assert code == 2
    assert "no such spool" in output
    assert not os.path.exists(missing)
    code, output = await drain("--spool", missing)
    assert code == 2
    assert "--smtp" in output
    code, output = await drain("--spool", missing, "--smtp", "smtp://x", "--concurrency", "0")
    assert code == 2
    assert "--concurrency" in output


@pytest_twisted.ensureDeferred
async def test_a_killed_drains_messages_are_reclaimed_once_its_lease_expires(
    cue_server: Cue, tmp_path: Path
) -> None:
    stalling = cue_server(stall_on="DOT")  # takes the message, never answers the final dot
    working = cue_server()
    path = tmp_path / "spool.db"
    await enqueue(path, [triple(1)])
    stuck = start_drain(
        "--spool", str(path), "--smtp", f"smtp://127.0.0.1:{stalling.port}", "--lease", "600"
    )
    await until(lambda: stalling.stalled, "the drain's message reached the final dot")
    stuck.kill()  # SIGKILL: no chance to give the message back
    await finish(stuck)
    assert query(path, "SELECT state, attempts FROM messages") == [("sending", 0)]
    # While the lease holds, another drain leaves the message alone (held, not its to send).
    code, output = await drain("--spool", str(path), "--smtp", f"smtp://127.0.0.1:{working.port}")
    assert code == 0, output
    assert "drain: 0 sent, 0 deferred, 0 failed; spool: 0 queued, 0 deferred, 1 sending" in output
    assert working.received == []
    assert query(path, "SELECT state, attempts FROM messages") == [("sending", 0)]
    # Once it has expired on the queue's clock, the message is claimed and sent.
    report = await drain_later(path, working.port, ahead=601)
    assert report.sent == 1
    assert [m.recipients for m in working.received] == [["user1@example.org"]]
    assert query(path, "SELECT state, attempts, owner FROM messages") == [("sent", 1, None)]


@pytest_twisted.ensureDeferred
async def test_sigterm_stops_claiming_and_gives_unsent_messages_back(
    cue_server: Cue, tmp_path: Path
) -> None:
    stalling = cue_server(stall_on="DOT")
    path = tmp_path / "spool.db"
    await enqueue(path, (triple(n) for n in range(100)))
    log = tmp_path / "drain.log"
    proc = start_drain(
        "--spool",
        str(path),
        "--smtp",
        f"smtp://127.0.0.1:{stalling.port}",
        "--concurrency",
        "2",
        log=log,
    )
    await until(lambda: stalling.stalled, "a message reached the final dot")
    proc.send_signal(signal.SIGTERM)  # stop claiming; messages in flight may finish
    # (That the loop then waits for them whatever the time is shown on a clock in test_engine.)
    await until(lambda: "stopping:" in log.read_text(encoding="utf-8"), "the first signal")
    assert proc.poll() is None  # still waiting for the stalled server
    proc.send_signal(signal.SIGTERM)  # abort what is in flight
    code, _ = await finish(proc)
    output = log.read_text(encoding="utf-8")
    assert code == 3, output
    assert "stopping: letting messages in flight finish" in output
    assert "(interrupted)" in output
    got = dict(query(path, "SELECT state || '/' || attempts, count(*) FROM messages GROUP BY 1"))
    # Messages in flight were cut off (a drop: deferred, one attempt spent); the others were
    # given back untouched. None is left claimed.
    assert set(got) <= {"queued/0", "deferred/1"}
    assert got["queued/0"] >= 50
    assert sum(got.values()) == 100


@pytest_twisted.ensureDeferred
async def test_starttls_with_a_ca_file_and_refusal_without_it(
    cue_server: Cue, tmp_path: Path, server_ssl_context: ssl.SSLContext, ca_file: Path
) -> None:
    server = cue_server(starttls_context=server_ssl_context, require_starttls=True)
    path = tmp_path / "spool.db"
    await enqueue(path, (triple(n) for n in range(3)))
    url = f"smtp+tls://localhost:{server.port}"
    # Not trusting the test CA: the certificate check fails, a configuration error.
    code, output = await drain("--spool", str(path), "--smtp", url)
    assert code == 2, output
    assert query(path, "SELECT DISTINCT state, attempts FROM messages") == [("queued", 0)]
    code, output = await drain("--spool", str(path), "--smtp", url, "--ca-file", str(ca_file))
    assert code == 0, output
    assert len(server.received) == 3


@pytest_twisted.ensureDeferred
async def test_sigkill_mid_run_then_rerun_after_the_lease_duplicates_at_most_concurrency(
    capture_server: Callable[..., CaptureServer], tmp_path: Path
) -> None:
    server = capture_server()
    n, concurrency = 3000, 5
    path = tmp_path / "spool.db"
    await enqueue(path, (triple(i) for i in range(n)))
    args = ("--spool", str(path), "--smtp", f"smtp://127.0.0.1:{server.port}")
    args += ("--concurrency", str(concurrency), "--lease", "600")
    killed = start_drain(*args)
    try:
        await until(
            lambda: len(server.messages) >= n // 3 or killed.poll() is not None,
            "a third delivered",
            120,
        )
        assert killed.poll() is None, "finished before it could be killed"
        killed.kill()  # SIGKILL: no chance to record or give anything back
    finally:
        code, _ = await finish(killed)
    assert code == -signal.SIGKILL
    assert len(server.messages) < n
    # Its claims stay "sending" until their lease runs out on the queue's clock; then a new
    # drain takes them over.
    report = await drain_later(path, server.port, ahead=601)
    assert report.abort is None
    delivered = collections.Counter(tuple(m.recipients) for m in server.messages)
    assert set(delivered) == {(f"user{i}@example.org".encode(),) for i in range(n)}  # none lost
    duplicates = sum(count - 1 for count in delivered.values())
    assert duplicates <= concurrency
    assert states(path) == {"sent": n}


def test_a_drain_starts_without_the_csv_commands_modules(tmp_path: Path) -> None:
    # Jinja2, Markdown and the progress display cost ~0.15 s of CPU to import: a drain (often
    # run from cron, every minute) has no use for them, nor for the composer, the backends or
    # the relay's users file code (a few ms more).
    unused = (
        "jinja2",
        "markdown",
        "rich",
        "twistmail.merge",
        "twistmail.composer",
        "twistmail.backends",
        "twistmail.relay.users",
    )
    script = (
        "import sys\n"
        "from twistmail.cli import main\n"
        "try:\n"
        f"    main(['drain', '--spool', {str(tmp_path / 'none.db')!r}, '--status'])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
        f"print(sorted(m for m in {unused!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines()[-2:] == ["exit 2", "[]"], done.stdout + done.stderr


def allowed_cpus(pid: int) -> dict[str, frozenset[int]]:
    """Each thread of process ``pid`` (by id): the CPUs it may run on."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        cpus: set[int] = set()
        for part in fields["Cpus_allowed_list"].strip().split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
        threads[tid] = frozenset(cpus)
    return threads


@pytest_twisted.ensureDeferred
async def test_a_drain_keeps_its_threads_on_the_cpu_it_started_on(
    cue_server: Cue, tmp_path: Path
) -> None:
    # The reactor and the store threads take turns at the GIL: on one CPU a hand-off is a plain
    # switch (see twistmail._cpu). TWISTMAIL_ONE_CPU=0 leaves the drain to the scheduler.
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        return  # nothing to hold on a one-CPU machine
    every = os.sched_getaffinity(0)
    for setting, one in (("1", True), ("0", False)):
        stalling = cue_server(stall_on="DOT")
        path = tmp_path / f"spool-{setting}.db"
        await enqueue(path, [triple(1)])
        proc = start_drain(
            "--spool", str(path), "--smtp", f"smtp://127.0.0.1:{stalling.port}",
            env={"TWISTMAIL_ONE_CPU": setting},
        )  # fmt: skip
        try:
            await until(lambda s=stalling: s.stalled, "the drain's message reached the final dot")
            threads = allowed_cpus(proc.pid)
        finally:
            proc.kill()
            await finish(proc)
        assert len(threads) >= 3, threads  # the reactor's, the queue's, the suppression list's
        (cpus,) = set(threads.values())  # the same for every thread
        assert (len(cpus) == 1 and cpus <= every) if one else cpus == every, threads
