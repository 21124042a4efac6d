"""The ``twistmail`` command: argument parsing only; the work is in :mod:`twistmail.merge`.

Subcommands: ``send``, ``check``, ``preview``, ``status``, ``capture``, ``drain``, ``users``
(the relay's AUTH users file), ``tokens`` (its HTTP API tokens), ``suppress`` (the
suppression list) and ``serve`` (the relay in the
foreground: the same service as ``twistd -n twistmail``).
Exit status: 0 every recipient sent; 1 some recipients failed or were invalid; 2 usage,
configuration or template error (nothing sent); 3 interrupted, or rows remain to send.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, task

from . import _cpu, _dispatch, _onethread
from ._campaign_cli import campaign_main, queue_options, report_parser, send_options_problem
from ._heap import resume, settle
from .bounces.command import add_bounces_parser, add_verp_option, verp_from_args
from .dkimcmd import add_dkim_options, add_dkim_parser, dkim_main, signer_from_args
from .errors import TwistmailError
from .suppresscmd import (
    add_send_options,
    add_suppress_parser,
    add_unsubscribe_options,
    send_options_from,
    suppress_main,
    unsubscribe_from,
)

EXIT_USAGE = 2
"""Usage or configuration error: the status every command exits with for one."""

__all__ = ["build_parser", "main"]

_SEND_EXAMPLE = """\
example:
  TWISTMAIL_SMTP_PASSWORD=... twistmail send recipients.csv message.txt \\
      --smtp smtp+tls://alice@mail.example.com --rate 20 --concurrency 5

The password of a URL naming a user comes from TWISTMAIL_SMTP_PASSWORD or --password-file,
never from the command line: a URL holding one is refused. Re-running the same command
resumes from the journal, even with the CSV fixed, extended or re-sorted since: rows are kept
by recipient (the mailbox in the address column the template's To reads), so only recipients
not reached yet are sent; a recipient sent before whose row changed is reported, not resent.
exit status: 0 all sent; 1 some failed or invalid; 2 usage/template error, or the server
refused the login or the TLS check (no row attempted); 3 interrupted, or rows still to send
(deferred, --limit reached, or the server could not be reached within --give-up-after).
"""


def _positive_int(text: str) -> int:
    """A count: a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds (0 or more), got {text!r}")
    return value


def _positive(what: str) -> Callable[[str], float]:
    """An argparse type for a positive number of ``what`` ("seconds", "messages per second")."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not value > 0 or math.isinf(value):
            raise argparse.ArgumentTypeError(f"expected a positive number of {what}, got {text!r}")
        return value

    return convert


_seconds = _positive("seconds")
_per_second = _positive("messages per second")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``twistmail`` command."""
    parser = argparse.ArgumentParser(
        prog="twistmail",
        description="Bulk mail on Twisted: send a CSV mail merge, check it, or run a capture "
        "server.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    send = sub.add_parser(
        "send",
        help="send one message per CSV row",
        description="Render TEMPLATE for each row of RECIPIENTS.csv and send it, journaling "
        "every outcome so that an interrupted run resumes exactly.",
        epilog=_SEND_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _inputs(send)
    _smtp_options(send, url_required=False, attempts_scope="", unless="--enqueue-only")
    add_dkim_options(send, missing=False)
    add_send_options(send)
    add_verp_option(send)
    send.add_argument(
        "--from",
        dest="envelope_from",
        metavar="ADDR",
        help="envelope sender (MAIL FROM); default: the From address, e.g. --from bounces@x.org",
    )
    send.add_argument(
        "--journal",
        metavar="PATH",
        help="journal file (default: RECIPIENTS.journal.db beside the CSV)",
    )
    send.add_argument(
        "--report",
        metavar="PATH",
        help="per-recipient report CSV (default: RECIPIENTS.report.csv beside the CSV)",
    )
    send.add_argument(
        "--dry-run",
        action="store_true",
        help="render and validate every row, print the first message, send nothing",
    )
    send.add_argument(
        "--limit", type=_positive_int, metavar="N", help="send at most N messages in this run"
    )
    send.add_argument(
        "--strict",
        action="store_true",
        help="abort before sending anything if any row is invalid",
    )
    send.add_argument(
        "--retry-failed", action="store_true", help="send again the rows that failed before"
    )
    send.add_argument(
        "--new-campaign",
        action="store_true",
        help="start the journal over, e.g. after the template changed (sends every row again)",
    )
    queue_options(send)
    send.add_argument(
        "--allow-duplicates",
        action="store_true",
        help="send to every row even when an earlier row has the same recipient (by default a "
        "later row for the same address, compared case-insensitively, is not sent and is "
        "reported as duplicate)",
    )

    check = sub.add_parser(
        "check",
        help="validate a campaign and list every problem",
        description="Render every row without sending; list each invalid row with the reason, "
        "and each row whose address repeats an earlier row's (ignoring case). "
        "Example: twistmail check recipients.csv message.txt",
        epilog="exit status: 0 every row is valid (repeated addresses are listed only); "
        "1 some rows are invalid; 2 the CSV or the template cannot be used.",
    )
    _inputs(check)
    check.add_argument("--from", dest="envelope_from", metavar="ADDR", help="as for send")
    add_unsubscribe_options(check)

    preview = sub.add_parser(
        "preview",
        help="print the message for one row",
        description="Print the rendered message of one row, with its envelope. "
        "Example: twistmail preview recipients.csv message.txt --row 3",
    )
    _inputs(preview)
    preview.add_argument(
        "--row", type=_positive_int, default=1, metavar="N", help="data row (default: 1)"
    )
    preview.add_argument("--from", dest="envelope_from", metavar="ADDR", help="as for send")
    add_unsubscribe_options(preview)

    status = sub.add_parser(
        "status",
        help="show a journal's (or a queue's campaigns') counts and the recipients not yet sent",
        description="Example: twistmail status recipients.journal.db; for campaigns in a queue: "
        "twistmail status --queue postgresql://mail@db/mail [CAMPAIGN]",
        epilog="exit status: 0 every row of the campaign was sent; 1 some rows are not sent "
        "(failed, invalid, deferred or pending); 2 the journal or queue cannot be read.",
    )
    status.add_argument(
        "journal",
        metavar="JOURNAL",
        nargs="?",
        help="the journal; with --queue: the campaign (default: every campaign)",
    )
    status.add_argument("--queue", metavar="URL", help="show the campaigns stored in this queue")
    status.add_argument(
        "--limit",
        type=_positive_int,
        default=20,
        metavar="N",
        help="list at most N unsent rows (default: 20)",
    )

    capture = sub.add_parser(
        "capture",
        help="run a local SMTP server that accepts and stores everything",
        description="Twisted's ESMTP server on 127.0.0.1: accepts every message, prints a "
        "line per message, and stores it in a Maildir. "
        "Example: twistmail capture --port 2525 --maildir ./captured",
    )
    capture.add_argument(
        "--port", type=_port, default=2525, metavar="N", help="port (default: 2525; 0: any)"
    )
    capture.add_argument("--maildir", metavar="DIR", help="store messages in this Maildir")
    report_parser(sub)
    _drain_parser(sub)
    _worker_parser(sub)
    _users_parser(sub)
    add_dkim_parser(sub)
    add_bounces_parser(sub)
    _tokens_parser(sub)
    add_suppress_parser(sub)
    sub.add_parser(
        "serve",
        help="run the mail relay in the foreground (as twistd -n twistmail)",
        description="Run the relay: SMTP submission in, a durable queue, delivery upstream. "
        "See twistmail serve --help for its options.",
    )
    return parser


_USERS_EXAMPLE = """\
examples:
  twistmail users add alice --users-file /etc/twistmail/users    (prompts twice)
  printf '%s\\n' "$PASSWORD" | twistmail users add alice --users-file /etc/twistmail/users
  twistmail users remove alice --users-file /etc/twistmail/users
  twistmail users list --users-file /etc/twistmail/users

The password is read from the terminal (twice), or from the first line of standard input when
it is not a terminal; never from the command line. The file is replaced atomically, mode 0600.
exit status: 0 done; 1 no such user (remove); 2 bad name, password or file.
"""


def _file_parser(
    sub: Any,
    command: str,
    texts: tuple[str, str, str],
    actions: tuple[tuple[str, str], ...],
    name_help: str,
    file_option: tuple[str, dict[str, Any]],
) -> None:
    """A ``twistmail COMMAND add|remove|list`` parser: ``texts`` are its help, description
    and epilog; ``file_option`` the option naming the file and its argparse settings."""
    help_text, description, epilog = texts
    parser = sub.add_parser(
        command,
        help=help_text,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub_actions = parser.add_subparsers(dest=f"{command}_action", required=True, metavar="ACTION")
    for action, text in actions:
        one = sub_actions.add_parser(action, help=text, description=text)
        if action != "list":
            one.add_argument("name", metavar="NAME", help=name_help)
        option, settings = file_option
        one.add_argument(option, metavar="PATH", **settings)


def _users_parser(sub: Any) -> None:
    from .relay import DEFAULT_USERS_FILE

    _file_parser(
        sub,
        "users",
        (
            "add, remove or list the relay's AUTH users",
            "Manage the users file the relay checks SMTP AUTH against (scrypt hashes).",
            _USERS_EXAMPLE,
        ),
        (
            ("add", "add a user, or change a user's password"),
            ("remove", "remove a user"),
            ("list", "list the users' names"),
        ),
        "the login name, e.g. alice",
        (
            "--users-file",
            {
                "default": DEFAULT_USERS_FILE,
                "help": f"the users file (default: {DEFAULT_USERS_FILE} in the working directory)",
            },
        ),
    )


_TOKENS_EXAMPLE = """\
examples:
  twistmail tokens add billing --api-token-file /etc/twistmail/api-tokens   (prints the token)
  twistmail tokens remove billing --api-token-file /etc/twistmail/api-tokens
  twistmail tokens list --api-token-file /etc/twistmail/api-tokens

add prints the new token once on standard output; the file keeps only its SHA-256. The running
relay (twistd twistmail --api-token-file FILE) picks up a changed file without a restart.
exit status: 0 done; 1 no such token (remove) or the name is taken (add); 2 bad name or file.
"""


def _tokens_parser(sub: Any) -> None:
    _file_parser(
        sub,
        "tokens",
        (
            "add, remove or list the relay's HTTP API tokens",
            "Manage the bearer tokens the relay's HTTP API accepts (stored hashed).",
            _TOKENS_EXAMPLE,
        ),
        (
            ("add", "make a token and print it once"),
            ("remove", "remove a token"),
            ("list", "list the tokens' names"),
        ),
        "the token's name, e.g. billing",
        ("--api-token-file", {"required": True, "help": "the token file"}),
    )


_DRAIN_EXAMPLE = """\
example (from cron):
  TWISTMAIL_SMTP_PASSWORD=... twistmail drain --spool /var/spool/app/mail.db \\
      --smtp smtp+tls://alice@mail.example.com --concurrency 5
  twistmail drain --spool /var/spool/app/mail.db --status

Delivers every message due now (queued, or deferred with its retry time reached), once each,
then exits. Two drains may run at once on one spool: each message is claimed by one of them.
exit status: 0 everything due was sent; 1 a message failed permanently; 2 usage/configuration
error; 3 messages remain (deferred, not due yet, --limit reached, server unreachable).
"""


def _drain_parser(sub: Any) -> None:
    drain = sub.add_parser(
        "drain",
        help="deliver the messages waiting in a spool, then exit",
        description="Deliver what the spool backend enqueued in PATH and is due now, with "
        "retries and backoff across runs; failed messages are kept with their reason.",
        epilog=_DRAIN_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = drain.add_mutually_exclusive_group(required=True)
    where.add_argument("--spool", metavar="PATH", help="the spool file")
    where.add_argument(
        "--queue",
        metavar="URL",
        help="the queue as a URL: sqlite:PATH or postgresql://user@host:port/db[?schema=NAME]",
    )
    drain.add_argument(
        "--status",
        action="store_true",
        help="print the spool's counts and the messages not sent, deliver nothing",
    )
    _smtp_options(drain, url_required=False, attempts_scope=", over all runs", patience=0.0)
    add_dkim_options(drain, missing=True)
    add_verp_option(drain, secret_file=True)
    drain.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="deliver at most N messages in this run (with --status: list at most N, default 20)",
    )
    drain.add_argument(
        "--lease",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="how long a claimed message stays reserved if this drain dies (renewed while it "
        "runs; default: 300)",
    )


def _drain_main(args: argparse.Namespace) -> None:
    from .queue import command

    if args.status:
        if args.spool is None:
            print("error: --status reads a spool file: use --spool PATH", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        resume()  # no reactor, so nothing settles the heap
        sys.exit(command.status(args.spool, args.limit or 20, sys.stdout))
    if not args.smtp:
        print("error: --smtp URL is required (or --status)", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    options = command.DrainOptions(
        spool_path=args.spool,
        queue_url=args.queue,
        limit=args.limit,
        lease=args.lease,
        verp=verp_from_args(args, sys.stderr),
        **_delivery(args),
    )
    _react_exit(lambda reactor: command.drain(options, reactor), one_cpu=True)


_WORKER_EXAMPLE = """\
examples:
  TWISTMAIL_SMTP_PASSWORD=... twistmail worker --queue postgresql://mail@db.example.com/mail \\
      --smtp smtp+tls://alice@mail.example.com --concurrency 10
  twistmail worker --queue sqlite:/var/spool/app/mail.db --smtp smtp://127.0.0.1:2525

Delivers from the queue until SIGTERM or SIGINT (a second one cuts off the messages in
flight; they stay queued). Start as many as you like, on any machines, on one PostgreSQL
queue: each message is claimed by one of them. A worker that dies holds its messages until its
lease runs out; then the others take them. New messages wake an idle worker at once
(PostgreSQL's LISTEN/NOTIFY; a SQLite queue is looked at every second).
exit status: 0 stopped by a signal; 2 usage/configuration error (bad URL, refused login/TLS).
"""


def _worker_parser(sub: Any) -> None:
    worker = sub.add_parser(
        "worker",
        help="deliver from a queue until stopped (any number of them on one queue)",
        description="Deliver the messages of a queue as they become due, with retries and "
        "backoff, until stopped; no listener.",
        epilog=_WORKER_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker.add_argument(
        "--queue",
        required=True,
        metavar="URL",
        help="sqlite:PATH or postgresql://user@host:port/db[?schema=NAME]",
    )
    _smtp_options(
        worker,
        url_required=True,
        attempts_scope=", over all workers",
        patience=None,
        rate_scope="for all the workers and relays of a PostgreSQL queue together",
    )
    add_dkim_options(worker, missing=True)
    add_verp_option(worker, secret_file=True)
    worker.add_argument(
        "--lease",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="how long a claimed message stays reserved if this worker dies (renewed while "
        "it runs; default: 300)",
    )
    worker.add_argument(
        "--per-domain",
        type=_positive_int,
        metavar="N",
        help="at most N messages in flight per recipient domain (on a PostgreSQL queue, for "
        "all its workers and relays together), e.g. --per-domain 5",
    )


def _worker_main(args: argparse.Namespace) -> None:
    from .queue import command

    options = command.WorkerOptions(
        queue_url=args.queue,
        lease=args.lease,
        per_domain=args.per_domain,
        verp=verp_from_args(args, sys.stderr),
        **_delivery(args),
    )
    _react_exit(lambda reactor: command.work(options, reactor))


def _smtp_options(
    parser: argparse.ArgumentParser,
    *,
    url_required: bool,
    attempts_scope: str,
    patience: float | None = 60.0,
    unless: str = "--status",
    rate_scope: str = "for the whole run",
) -> None:
    """The options saying where and how to deliver, shared by ``send``, ``drain`` and
    ``worker`` (``patience=None``: no ``--give-up-after``, the server is waited for ever)."""
    parser.add_argument(
        "--smtp",
        required=url_required,
        metavar="URL",
        help="smtp://host[:port] (plain), smtp+tls://user@host (STARTTLS required) or "
        "smtp+ssl://user@host (implicit TLS), e.g. smtp+tls://alice@mail.example.com:587"
        + ("" if url_required else f" (required unless {unless})"),
    )
    parser.add_argument(
        "--password-file",
        metavar="PATH",
        help="read the SMTP password from this file (default: $TWISTMAIL_SMTP_PASSWORD)",
    )
    parser.add_argument("--ca-file", metavar="PEM", help="trust this CA, e.g. --ca-file ca.pem")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's certificate (prints a warning; testing only)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=10,
        metavar="N",
        help="SMTP connections to use (default: 10), e.g. --concurrency 20",
    )
    parser.add_argument(
        "--rate",
        type=_per_second,
        metavar="R",
        help=f"at most R messages per second {rate_scope}, e.g. --rate 50",
    )
    parser.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=5,
        metavar="N",
        help=f"attempts per recipient for 4xx replies, drops and timeouts{attempts_scope} "
        "(default: 5)",
    )
    parser.add_argument(
        "--retry-delay",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="first backoff; doubles each attempt, with jitter (default: 5)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="connect and reply timeout (default: 60)",
    )
    if patience is None:
        parser.set_defaults(server_patience=math.inf)
        return
    parser.add_argument(
        "--give-up-after",
        dest="server_patience",
        type=_non_negative_seconds,
        default=patience,
        metavar="SECONDS",
        help="how long to keep trying a server that cannot be reached, with backoff "
        f"(1, 2, 4 ... 30 s between tries) before stopping with the rows kept for the next "
        f"run (default: {patience:g}{'' if patience else ': stop at once'}). A refused login "
        "or TLS check stops at once.",
    )


def _inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipients", metavar="RECIPIENTS.csv", help="the recipients CSV")
    parser.add_argument("template", metavar="TEMPLATE", help="the message template (Jinja2)")


def _delivery(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~twistmail.options.DeliveryOptions` fields from ``_smtp_options``' arguments."""
    return {
        "smtp_url": args.smtp,
        "password": _smtp_password(args),
        "ca_file": args.ca_file,
        "insecure": args.insecure,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "max_attempts": args.max_attempts,
        "retry_delay": args.retry_delay,
        "timeout": args.timeout,
        "server_patience": args.server_patience,
        "dkim": signer_from_args(args, args.template if args.command == "send" else None),
    }


def _smtp_password(args: argparse.Namespace) -> str | None:
    """The password from --password-file (exit 2 if unreadable, or if --smtp holds one)."""
    try:
        password = urlsplit(args.smtp or "").password
    except ValueError:  # an invalid port, say: the Mailer reports the URL itself
        password = None
    if password is not None:
        print(
            "error: --smtp must not contain the password (other users can read the process "
            "list): remove it from the URL and set TWISTMAIL_SMTP_PASSWORD or use "
            "--password-file PATH",
            file=sys.stderr,
        )
        sys.exit(EXIT_USAGE)
    if args.insecure:
        print(
            "warning: --insecure: the server's certificate is not verified; anyone on the path "
            "can read the messages and the password",
            file=sys.stderr,
        )
    if args.password_file is None:
        return None
    try:
        text = Path(args.password_file).read_text(encoding="utf-8")
    except OSError as e:
        print(f"error: cannot read --password-file: {e.strerror}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    return text.rstrip("\r\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``twistmail`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        resume()
        serve(argv[1:])
        return
    args = build_parser().parse_args(argv)
    if args.command == "drain":
        _drain_main(args)  # settles the heap (and so resumes collection) once it starts
        return
    # The other commands collect as usual from here (python -m twistmail held the collector).
    resume()
    if args.command == "dkim":
        sys.exit(dkim_main(args, sys.stdout, sys.stderr))
    if args.command == "worker":
        _worker_main(args)
        return
    if args.command == "bounces":
        from .bounces.command import bounces_main

        _react_exit(lambda reactor: bounces_main(args, reactor, sys.stdout, sys.stderr))
        return
    if args.command == "suppress":
        suppress_main(args, sys.stdout, sys.stderr)
    if args.command == "users":
        from .relay.users import users_command

        sys.exit(
            users_command(
                args.users_action,
                getattr(args, "name", None),
                args.users_file,
                stdin=sys.stdin,
                stdout=sys.stdout,
                stderr=sys.stderr,
            )
        )
    if args.command == "tokens":
        from .relay.tokens import tokens_command

        sys.exit(
            tokens_command(
                args.tokens_action,
                getattr(args, "name", None),
                args.api_token_file,
                stdout=sys.stdout,
                stderr=sys.stderr,
            )
        )
    # The CSV commands' modules (templates, Markdown, the progress display) are imported for
    # them only: a drain, often run from cron, starts ~0.15 s of CPU sooner without them.
    from .merge import commands
    from .merge.run import SendOptions, run

    if args.command == "report" or (args.command == "status" and args.queue):
        campaign_main(args, _react_exit)
        return
    if args.command == "status":
        if args.journal is None:
            print("error: status needs a JOURNAL (or --queue URL)", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        sys.exit(commands.status(args.journal, args.limit, sys.stdout))
    if args.command == "check":
        unsubscribe_from(args)  # refused here as send would refuse them
        sys.exit(commands.check(args.recipients, args.template, args.envelope_from, sys.stdout))
    if args.command == "preview":
        unsubscribe = unsubscribe_from(args)
        sys.exit(
            commands.preview(
                args.recipients,
                args.template,
                args.row,
                args.envelope_from,
                sys.stdout,
                unsubscribe,
            )
        )
    if args.command == "capture":
        _react_exit(
            lambda reactor: commands.capture(
                reactor, args.port, args.maildir, sys.stdout, sys.stderr
            )
        )
        return
    options = SendOptions(
        csv_path=args.recipients,
        template_path=args.template,
        envelope_from=args.envelope_from,
        journal_path=args.journal,
        report_path=args.report,
        limit=args.limit,
        retry_failed=args.retry_failed,
        new_campaign=args.new_campaign,
        allow_duplicates=args.allow_duplicates,
        queue_url=args.queue,
        enqueue_only=args.enqueue_only,
        campaign=args.campaign,
        **send_options_from(args),
        verp=verp_from_args(args, sys.stderr),
        **_delivery(args),
    )
    problem = send_options_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if args.dry_run or args.strict:
        code = commands.validate_before_send(options, dry_run=args.dry_run, out=sys.stdout)
        if code is not None:
            sys.exit(code)
    if args.queue:
        from .merge import queued

        _react_exit(lambda reactor: queued.send(options, reactor), one_cpu=True)
        return
    _react_exit(lambda reactor: run(options, reactor), one_cpu=True)


def serve(options: Sequence[str]) -> None:
    """``twistmail serve [OPTIONS]``: the relay in the foreground, logging to stdout.

    The options are those of ``twistd twistmail`` (``twistmail serve --help`` lists them).
    """
    from twisted.scripts import twistd

    add_plugin_directory()
    # twistd reads sys.argv: the relay's options follow the plugin's name.
    sys.argv = ["twistmail serve", "--nodaemon", "--pidfile=", "twistmail", *options]
    twistd.run()


def add_plugin_directory() -> None:
    """Put the directory holding twistmail's twistd plugin on ``twisted.plugins.__path__``.

    A wheel installs ``twisted/plugins/twistmail_plugin.py`` into Twisted's own plugin
    directory, already on the path; an editable install leaves it in the source tree beside
    the ``twistmail`` package, which twistd otherwise finds only when the tree's root is on
    ``sys.path``. The directory is added once, and only if it holds the plugin.
    """
    import os

    import twisted.plugins

    directory = Path(__file__).resolve().parent.parent / "twisted" / "plugins"
    if not (directory / "twistmail_plugin.py").is_file():
        return
    known = {os.path.realpath(entry) for entry in twisted.plugins.__path__}
    if os.path.realpath(directory) not in known:
        twisted.plugins.__path__.append(str(directory))


def _react_exit(command: Callable[[Any], defer.Deferred[int]], *, one_cpu: bool = False) -> None:
    """Run ``command(reactor)`` under ``task.react``; exit with the status it fires with.

    ``one_cpu``: a batch command's threads stay on the CPU it starts on (see ``_cpu``).
    """
    if one_cpu:
        _cpu.hold_to_one_cpu()

    def go(reactor: Any) -> defer.Deferred[None]:
        def done(code: int) -> None:
            if code:
                raise SystemExit(code)

        settle()
        _dispatch.install(reactor)  # this process owns the reactor
        _onethread.run_in_background()  # and its store threads
        return command(reactor).addCallback(done)

    try:
        task.react(go)
    except TwistmailError as e:  # pragma: no cover - the commands report their own errors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
