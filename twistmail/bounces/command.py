"""``twistmail bounces --maildir DIR``: apply the bounces and complaints waiting in a Maildir.

Each message in ``DIR/new`` is read (in the reactor's thread pool) and given to the
:class:`~twistmail.bounces.intake.BounceIntake`. A report (a DSN or feedback report) is moved to
``DIR/cur`` marked seen (``:2,S``) once what it changes is committed, so a second run does
nothing twice; a crash in between only applies it again, which changes nothing more. A message
that is no report is left where it is, untouched, and counted.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, TextIO

from twisted.internet import defer, threads

from ..errors import TwistmailError

# Imported when a command runs: the parser of every twistmail command is built with this.
if TYPE_CHECKING:
    from ..interfaces import ISuppressionList
    from .intake import BounceIntake, BounceQueue
    from .verp import VerpSigner

__all__ = [
    "add_bounces_parser",
    "add_verp_option",
    "bounces_main",
    "maildir_messages",
    "verp_from_args",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
MAX_MESSAGE_BYTES = 50 * 1024 * 1024
"""A larger file in the Maildir is no bounce we read (left alone, counted)."""

_EXAMPLE = """\
examples:
  twistmail bounces --maildir ~/Maildir/.bounces --suppression ~/suppressed.db
  twistmail bounces --maildir /var/mail/bounces --queue sqlite:/var/spool/twistmail/queue.db \\
      --verp-domain bounces.example.com --secret-file /etc/twistmail/secret
"""


def add_bounces_parser(sub: Any) -> None:
    """The ``twistmail bounces`` sub-command."""
    parser = sub.add_parser(
        "bounces",
        help="apply the bounces and complaints in a Maildir (suppress, fail recipients)",
        description="Read the new messages of a Maildir: a hard bounce fails its recipient "
        "(in the queue, with VERP) and suppresses an address that does not exist, a complaint "
        "suppresses its address, a soft bounce is recorded. Reports move to cur/; other mail "
        "is left alone and counted.",
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--maildir", required=True, metavar="DIR", help="the Maildir to read")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--queue",
        metavar="URL",
        help="the queue whose recipients VERP paths name, and whose suppression list to use "
        "(sqlite:PATH or postgresql://...)",
    )
    where.add_argument(
        "--suppression",
        metavar="PATH",
        help="the suppression list file (default: the user's, as twistmail send uses)",
    )
    parser.add_argument(
        "--journal",
        metavar="PATH",
        help="a campaign's journal (twistmail send's): rows that VERP paths name and that "
        "bounced hard become failed (not while the campaign runs)",
    )
    parser.add_argument(
        "--verp-domain",
        "--bounce-domain",
        dest="verp_domain",
        metavar="DOMAIN",
        help="the domain of the VERP return paths (bounces+TOKEN@DOMAIN); needs --secret-file",
    )
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="the keys VERP return paths are signed with (KEY_ID:SECRET a line; the relay's "
        "and twistmail send's --secret-file)",
    )


def add_verp_option(parser: argparse.ArgumentParser, *, secret_file: bool = False) -> None:
    """``--verp-domain`` (its keys come from ``--secret-file``, added too with
    ``secret_file``: ``send`` has one already)."""
    parser.add_argument(
        "--verp-domain",
        metavar="DOMAIN",
        help="send each recipient's message from its own signed return path "
        "bounces+TOKEN@DOMAIN (keys from --secret-file), so that its bounce names it "
        "(twistmail bounces); one SMTP transaction per recipient (a queued message with "
        "several recipients goes as one copy each; a campaign row with a Cc or Bcc keeps "
        "its sender)",
    )
    if secret_file:
        parser.add_argument(
            "--secret-file",
            metavar="PATH",
            help="the keys VERP return paths are signed with (KEY_ID:SECRET a line, the "
            "first signs), the relay's --secret-file",
        )


def verp_from_args(args: argparse.Namespace, err: TextIO) -> VerpSigner | None:
    """The signer ``--verp-domain`` and ``--secret-file`` ask for; prints why and exits 2
    when they cannot be used."""
    if not args.verp_domain:
        return None
    from .verp import VerpSigner, read_verp_keys

    try:
        if not args.secret_file:
            raise ValueError("--verp-domain needs --secret-file (the keys of the return paths)")
        return VerpSigner(read_verp_keys(args.secret_file), args.verp_domain)
    except ValueError as e:
        print(f"error: {e}", file=err)
        raise SystemExit(EXIT_USAGE) from None


def maildir_messages(directory: str) -> list[str]:
    """The file names in ``directory/new``, oldest first (blocking: run it in a thread).

    :raises TwistmailError: ``directory`` is not a Maildir.
    """
    for sub in ("new", "cur"):
        if not os.path.isdir(os.path.join(directory, sub)):
            raise TwistmailError(f"--maildir {directory}: not a Maildir (no {sub}/ directory)")
    new = os.path.join(directory, "new")
    names = [n for n in os.listdir(new) if not n.startswith(".")]
    names.sort(key=lambda n: (os.stat(os.path.join(new, n)).st_mtime, n))
    return names


def _read(path: str) -> bytes | None:
    if os.path.getsize(path) > MAX_MESSAGE_BYTES:
        return None
    with open(path, "rb") as f:
        return f.read()


def _done(directory: str, name: str) -> None:
    """Move ``new/name`` to ``cur/`` marked seen."""
    base = name.split(":2,", 1)[0]
    os.replace(os.path.join(directory, "new", name), os.path.join(directory, "cur", base + ":2,S"))


def bounces_main(
    args: argparse.Namespace, reactor: Any, out: TextIO, err: TextIO
) -> defer.Deferred[int]:
    """Run ``twistmail bounces``; fires with the exit status."""
    return defer.ensureDeferred(_main(args, reactor, out, err))


async def _main(args: argparse.Namespace, reactor: Any, out: TextIO, err: TextIO) -> int:
    from .intake import BounceIntake
    from .verp import VerpSigner, read_verp_keys

    verp = None
    if bool(args.verp_domain) != bool(args.secret_file):
        print("error: --verp-domain and --secret-file go together", file=err)
        return EXIT_USAGE
    if args.verp_domain:
        try:
            verp = VerpSigner(read_verp_keys(args.secret_file), args.verp_domain)
        except ValueError as e:
            print(f"error: --secret-file: {e}", file=err)
            return EXIT_USAGE
    try:
        names = await threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), maildir_messages, args.maildir
        )
    except (TwistmailError, OSError) as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    suppressions: ISuppressionList | None = None
    queue: Any = None
    try:
        suppressions, queue = await _open(args, reactor)
        journal = _JournalFile(args.journal, reactor) if args.journal else None
        intake = BounceIntake(
            suppressions, queue=queue, journal=journal, verp=verp, reactor=reactor
        )
        counts = await _run(args.maildir, names, intake, reactor, out)
    except (TwistmailError, OSError) as e:  # what was applied so far was moved to cur/
        print(f"error: {e}", file=err)
        return EXIT_ERROR
    finally:
        if queue is not None:
            await queue.close()
        if suppressions is not None:
            await suppressions.close()
    print(
        f"{counts['messages']} messages: {counts['reports']} reports "
        f"({counts['hard']} hard, {counts['soft']} soft, {counts['complaint']} complaints, "
        f"{counts['unmatched']} unmatched), {counts['suppressed']} suppressed, "
        f"{counts['failed']} recipients failed; {counts['other']} not reports, left alone",
        file=out,
    )
    return EXIT_OK


class _JournalFile:
    """A campaign journal's rows failed by bounces, in the reactor's thread pool."""

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self.reactor = reactor

    def bounce(
        self, campaign: str, row: int, *, failed: bool, code: int | None, response: str
    ) -> defer.Deferred[str | None]:
        from ..merge.journal import bounce_rows

        d = threads.deferToThreadPool(
            self.reactor,
            self.reactor.getThreadPool(),
            bounce_rows,
            self.path,
            [(campaign, row, failed, code, response)],
        )
        return d.addCallback(lambda found: found[0])


async def _open(
    args: argparse.Namespace, reactor: Any
) -> tuple[ISuppressionList, BounceQueue | None]:
    from ..queue.url import open_queue
    from ..suppression.opening import open_suppression_file, open_suppression_for_queue

    if not args.queue:
        return await open_suppression_file(args.suppression, reactor=reactor), None
    suppressions = await open_suppression_for_queue(args.queue, create=False, reactor=reactor)
    try:
        queue: Any = await open_queue(args.queue, create=False, reactor=reactor)
    except TwistmailError:
        await suppressions.close()
        raise
    return suppressions, queue


async def _run(
    directory: str, names: list[str], intake: BounceIntake, reactor: Any, out: TextIO
) -> dict[str, int]:
    pool = reactor.getThreadPool()
    counts = dict.fromkeys(
        (
            "messages",
            "reports",
            "hard",
            "soft",
            "complaint",
            "unmatched",
            "suppressed",
            "failed",
            "other",
        ),
        0,
    )
    for name in names:
        path = os.path.join(directory, "new", name)
        try:
            data = await threads.deferToThreadPool(reactor, pool, _read, path)
        except OSError:
            continue  # gone meanwhile (another reader took it)
        counts["messages"] += 1
        processed = None if data is None else await intake.process(data)
        if processed is None or not processed.is_report:
            counts["other"] += 1
            continue
        counts["reports"] += 1
        for event in processed.events:
            if event.kind in counts:
                counts[event.kind] += 1
            counts["suppressed"] += event.suppressed
            counts["failed"] += event.failed
            marks = [
                m for m, on in (("suppressed", event.suppressed), ("failed", event.failed)) if on
            ]
            print(
                f"{name}: {event.kind} {event.address or '-'} {event.status or '-'}"
                + (f" ({', '.join(marks)})" if marks else ""),
                file=out,
            )
        await threads.deferToThreadPool(reactor, pool, _done, directory, name)
    return counts
