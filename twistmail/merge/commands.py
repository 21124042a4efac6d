"""The small commands of the CLI: check, preview, status, capture, and the pre-send validation."""

from __future__ import annotations

from collections.abc import Callable
from email.header import decode_header, make_header
from typing import TYPE_CHECKING, Any, TextIO

from twisted.internet import defer
from twisted.internet.error import CannotListenError

from twistmail.errors import TwistmailError
from twistmail.message import unstuff
from twistmail.testing import CapturedMessage, CaptureServer

from .journal import read_status
from .prepare import (
    Duplicates,
    Prepared,
    Problem,
    load_inputs,
    prepare_row,
    preview_message_id,
    problems,
)
from .run import EXIT_FAILED, EXIT_OK, EXIT_USAGE, SendOptions
from .suppressing import with_unsubscribe

if TYPE_CHECKING:
    from twistmail.unsubscribe.headers import Unsubscribe

__all__ = ["capture", "check", "preview", "status", "validate_before_send"]


def _show_message(prepared: Prepared, unsubscribe: Unsubscribe | None, out: TextIO) -> None:
    """Print ``prepared`` as ``send`` would send it (with its ``List-Unsubscribe`` headers)."""
    if unsubscribe is not None:
        prepared = with_unsubscribe(prepared, unsubscribe)
    env = prepared.envelope
    print(f"# row {prepared.row}", file=out)
    print(f"# MAIL FROM:<{env.sender}>", file=out)
    for rcpt in env.recipients:
        print(f"# RCPT TO:<{rcpt}>", file=out)
    print(unstuff(env.payload).decode("utf-8", "replace").replace("\r\n", "\n"), file=out)


def _print_problems(
    csv_path: str,
    template_path: str,
    envelope_from: str | None,
    out: TextIO,
    first: Callable[[Prepared], None] | None = None,
    each: Callable[[Prepared], None] | None = None,
) -> int | None:
    """Print every problem of a campaign as it is found; their number, or None when the CSV
    or the template cannot be used at all (that error is printed)."""
    found = 0
    try:
        source, template = load_inputs(csv_path, template_path)
        # Printed as found: a million bad rows never sit in memory.
        for problem in problems(source, template, envelope_from, first=first, each=each):
            found += 1
            print(problem.reason, file=out)
    except (TwistmailError, OSError) as e:
        print(f"error: {e}", file=out)
        return None
    return found


def check(csv_path: str, template_path: str, envelope_from: str | None, out: TextIO) -> int:
    """List every problem of a campaign; 0 when there is none, 1 when rows are invalid.

    Rows whose recipient repeats an earlier row's are listed too, without failing the check.
    """
    duplicates = Duplicates()
    repeated = 0

    def each(prepared: Prepared) -> None:
        nonlocal repeated
        earlier = duplicates.earlier_row(prepared)
        if earlier is not None:
            repeated += 1
            print(
                f"row {prepared.row}: duplicate of row {earlier}: {prepared.email}",
                file=out,
            )

    found = _print_problems(csv_path, template_path, envelope_from, out, each=each)
    if found is None:
        return EXIT_USAGE
    if repeated:
        print(f"{repeated} row(s) repeat the address of an earlier row", file=out)
    if found:
        print(f"{found} invalid row(s)", file=out)
        return EXIT_FAILED
    print("every row is valid", file=out)
    return EXIT_OK


def preview(
    csv_path: str,
    template_path: str,
    row: int,
    envelope_from: str | None,
    out: TextIO,
    unsubscribe: Unsubscribe | None = None,
) -> int:
    """Print the rendered message of data row ``row``, with the ``List-Unsubscribe`` headers
    of ``unsubscribe`` as ``send`` adds them."""
    try:
        source, template = load_inputs(csv_path, template_path)
        for candidate in source:
            if candidate.number == row:
                result = prepare_row(template, candidate, preview_message_id, envelope_from)
                if isinstance(result, Problem):
                    print(f"invalid: {result.reason}", file=out)
                    return EXIT_FAILED
                _show_message(result, unsubscribe, out)
                return EXIT_OK
    except (TwistmailError, OSError) as e:
        print(f"error: {e}", file=out)
        return EXIT_USAGE
    print(f"error: {csv_path} has no data row {row}", file=out)
    return EXIT_USAGE


def validate_before_send(options: SendOptions, *, dry_run: bool, out: TextIO) -> int | None:
    """For --dry-run and --strict: validate every row; an exit status, or None to go on."""
    shown: list[Prepared] = []
    found = _print_problems(
        options.csv_path, options.template_path, options.envelope_from, out, first=shown.append
    )
    if found is None:
        return EXIT_USAGE
    if dry_run:
        if shown:
            _show_message(shown[0], options.unsubscribe, out)
        print(f"dry run: {found} invalid row(s); nothing sent", file=out)
        return EXIT_FAILED if found else EXIT_OK
    if found:
        print(f"--strict: {found} invalid row(s); nothing sent", file=out)
        return EXIT_USAGE
    return None


def status(journal_path: str, limit: int, out: TextIO) -> int:
    """Print a journal's counts and its first rows not yet sent."""
    try:
        summary = read_status(journal_path, limit=limit)
    except (TwistmailError, OSError) as e:
        print(f"error: {e}", file=out)
        return EXIT_USAGE
    print(f"journal {summary.path} (campaign {summary.campaign_id})", file=out)
    for state in ("sent", "failed", "deferred", "invalid", "duplicate", "suppressed", "pending"):
        print(f"  {state:<10} {summary.counts.get(state, 0)}", file=out)
    if summary.changed:
        print(
            f"changed since sent: {summary.changed} (rows whose cells changed after their "
            "message went; not sent again)",
            file=out,
        )
    if summary.unsent:
        print("not sent:", file=out)
        for row in summary.unsent:
            code = f" {row.code}" if row.code else ""
            print(f"  row {row.row} {row.email} {row.state}{code} {row.response}", file=out)
    # A suppressed row is settled as asked: not sending it is the point.
    not_sent = summary.total - summary.counts.get("sent", 0) - summary.counts.get("suppressed", 0)
    return EXIT_OK if not_sent == 0 else EXIT_FAILED


def capture(
    reactor: Any, port: int, maildir: str | None, out: TextIO, err: TextIO
) -> defer.Deferred[int]:
    """Run the capture server until interrupted, a line per message; fires with 2 at once when
    the port cannot be listened on."""

    def show(message: CapturedMessage) -> None:
        to = ", ".join(r.decode("utf-8", "replace") for r in message.recipients)
        subject = b""
        for line in message.data.split(b"\r\n"):
            if not line:
                break
            if line.lower().startswith(b"subject:"):
                subject = line[8:].strip()
        try:
            title = str(make_header(decode_header(subject.decode("utf-8", "replace"))))
        except (ValueError, LookupError):
            title = subject.decode("utf-8", "replace")
        print(
            f"message from <{message.sender.decode('utf-8', 'replace')}> to {to}: "
            f"{title} ({len(message.data)} bytes)",
            file=out,
            flush=True,
        )

    server = CaptureServer(reactor, maildir=maildir, on_message=show)
    try:
        server.listen(port)
    except CannotListenError as e:
        reason = e.socketError.strerror if isinstance(e.socketError, OSError) else e.socketError
        print(f"error: cannot listen on 127.0.0.1:{port}: {reason}", file=err, flush=True)
        return defer.succeed(EXIT_USAGE)
    where = f" storing in Maildir {maildir}" if maildir else ""
    print(f"capture server listening on 127.0.0.1:{server.port}{where}", file=out, flush=True)
    done: defer.Deferred[int] = defer.Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", server.stop)
    return done
