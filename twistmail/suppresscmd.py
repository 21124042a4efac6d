"""The command line's suppression and unsubscribe parts: ``send``'s ``--suppression``,
``--unsubscribe-url``, ``--unsubscribe-mailto`` and ``--secret-file``, and
``twistmail suppress add|remove|list|import|export``.

CSV in and out has the columns ``address,reason,list_id,created_at,detail`` (``created_at`` in
ISO 8601, UTC); an import needs only ``address`` (or ``email``): a missing reason is
``manual``, a missing time now. An import is checked whole before anything is stored: a bad
row is named (row number, column) and nothing of the file is imported.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from twisted.internet import defer, task, threads

from .errors import TwistmailError

if TYPE_CHECKING:
    from .unsubscribe.headers import Unsubscribe

__all__ = [
    "add_send_options",
    "add_suppress_parser",
    "add_unsubscribe_options",
    "send_options_from",
    "suppress_main",
    "unsubscribe_from",
]

EXIT_OK, EXIT_NOTHING, EXIT_USAGE = 0, 1, 2
COLUMNS = ("address", "reason", "list_id", "created_at", "detail")
_BATCH = 1000


def add_send_options(parser: argparse.ArgumentParser) -> None:
    """``send``'s suppression and one-click unsubscribe options."""
    parser.add_argument(
        "--suppression",
        metavar="PATH",
        help="the suppression list checked before every message and fed by hard bounces "
        "(default: $XDG_DATA_HOME/twistmail/suppression.db, i.e. ~/.local/share/twistmail/); "
        "a relay's SQLite queue file works too, so unsubscribes it takes apply",
    )
    add_unsubscribe_options(parser)


def add_unsubscribe_options(parser: argparse.ArgumentParser) -> None:
    """The one-click unsubscribe options (``send``'s, also taken by ``preview`` and ``check``
    so that they show and check what ``send`` would add)."""
    parser.add_argument(
        "--unsubscribe-url",
        metavar="TEMPLATE",
        help="add List-Unsubscribe (one-click, RFC 8058) with this https URL, {token} "
        "standing for each recipient's signed token, e.g. "
        "https://mail.example.com/unsubscribe/{token} (served by the relay's --public-http)",
    )
    parser.add_argument(
        "--unsubscribe-mailto",
        metavar="ADDR",
        help="add a mailto: unsubscribe address to List-Unsubscribe, e.g. unsubscribe@example.com",
    )
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="the unsubscribe token keys (KEY_ID:SECRET a line; the first signs), the file "
        "the relay's --secret-file reads",
    )


def send_options_from(args: argparse.Namespace) -> dict[str, Any]:
    """``SendOptions`` fields of the options above; prints why and exits 2 when unusable."""
    return {"suppression_path": args.suppression, "unsubscribe": unsubscribe_from(args)}


def unsubscribe_from(args: argparse.Namespace) -> Unsubscribe | None:
    """The ``List-Unsubscribe`` headers the unsubscribe options ask for (None: none); prints
    why and exits 2 when they are unusable."""
    from .unsubscribe import SecretError
    from .unsubscribe.headers import Unsubscribe, UnsubscribeError

    # --secret-file alone also signs --verp-domain return paths: no unsubscribe headers then.
    verp_only = args.secret_file and getattr(args, "verp_domain", None)
    tokens_only = args.secret_file and not verp_only
    if not (args.unsubscribe_url or args.unsubscribe_mailto or tokens_only):
        return None
    try:
        return Unsubscribe.from_options(
            args.unsubscribe_url, args.unsubscribe_mailto, args.secret_file
        )
    except (SecretError, UnsubscribeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


_SUPPRESS_EXAMPLE = """\
examples:
  twistmail suppress add ann@example.org --note "asked by phone"
  twistmail suppress add bob@example.org --list news.example.org   (unsubscribed from a list)
  twistmail suppress remove ann@example.org
  twistmail suppress list --queue sqlite:/var/spool/twistmail/queue.db
  twistmail suppress import bounces.csv
  twistmail suppress export > suppressed.csv

Without --suppression or --queue, the list of twistmail send is used
($XDG_DATA_HOME/twistmail/suppression.db). --queue URL is the relay's and the workers' list, in
their queue's database (sqlite:PATH or postgresql://...).
CSV columns: address,reason,list_id,created_at,detail (import needs address only).
exit status: 0 done; 1 nothing to remove; 2 bad address, CSV row or list.
"""


def add_suppress_parser(sub: Any) -> None:
    """``twistmail suppress add|remove|list|import|export``."""
    parser = sub.add_parser(
        "suppress",
        help="add, remove, list, import or export suppressed addresses",
        description="Manage the suppression list: addresses no message is sent to (hard "
        "bounces, complaints, unsubscribes, manual entries).",
        epilog=_SUPPRESS_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="suppress_action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="suppress addresses")
    add.add_argument("addresses", nargs="+", metavar="ADDRESS")
    add.add_argument(
        "--reason",
        choices=("manual", "unsubscribed", "hard-bounce", "complaint"),
        help="why (default: manual; unsubscribed with --list)",
    )
    add.add_argument("--list", dest="list_id", default="", metavar="LIST_ID", help="a list id")
    add.add_argument("--note", default="", metavar="TEXT", help="kept as the entry's detail")
    remove = actions.add_parser("remove", help="remove addresses' entries")
    remove.add_argument("addresses", nargs="+", metavar="ADDRESS")
    remove.add_argument(
        "--list", dest="list_id", metavar="LIST_ID", help="only this list's entry (default: all)"
    )
    actions.add_parser("list", help="print the entries")
    imports = actions.add_parser("import", help="add the entries of a CSV file ('-': stdin)")
    imports.add_argument("csv_file", metavar="FILE")
    export = actions.add_parser("export", help="write every entry as CSV (default: stdout)")
    export.add_argument("csv_file", nargs="?", default="-", metavar="FILE")
    for one in (add, remove, actions.choices["list"], imports, export):
        where = one.add_mutually_exclusive_group()
        where.add_argument("--suppression", metavar="PATH", help="a suppression list file")
        where.add_argument("--queue", metavar="URL", help="the list in this queue's database")


def suppress_main(args: argparse.Namespace, out: TextIO, err: TextIO) -> NoReturn:
    """Run ``twistmail suppress`` and exit with its status."""

    def go(reactor: Any) -> defer.Deferred[None]:
        def done(code: int) -> None:
            if code:
                raise SystemExit(code)

        d = defer.Deferred.fromCoroutine(_suppress(args, out, err, reactor))
        return d.addCallback(done)

    task.react(go)  # exits


async def _suppress(args: argparse.Namespace, out: TextIO, err: TextIO, reactor: Any) -> int:
    from .suppression import (
        SuppressionError,
        open_suppression_file,
        open_suppression_for_queue,
    )

    action = args.suppress_action
    try:
        entries = (
            await threads.deferToThread(_read_import, args.csv_file) if action == "import" else []
        )
    except (SuppressionError, OSError, UnicodeDecodeError, csv.Error) as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    try:
        if args.queue:
            store = await open_suppression_for_queue(args.queue, create=False, reactor=reactor)
        else:
            store = await open_suppression_file(args.suppression, reactor=reactor)
    except TwistmailError as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    try:
        return await _act(store, action, args, entries, out, err)
    except (TwistmailError, OSError) as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    finally:
        await store.close()


async def _act(
    store: Any, action: str, args: argparse.Namespace, entries: list[Any], out: TextIO, err: TextIO
) -> int:
    from .suppression import MANUAL, UNSUBSCRIBED, Reason, Suppression

    if action == "add":
        reason: Reason = args.reason or (UNSUBSCRIBED if args.list_id else MANUAL)
        new = await store.add(
            [Suppression(a, reason, args.list_id, detail=args.note) for a in args.addresses]
        )
        print(f"added {new} (already there: {len(args.addresses) - new})", file=out)
        return EXIT_OK
    if action == "remove":
        removed = 0
        for address in args.addresses:
            removed += await store.remove(address, args.list_id)
        print(f"removed {removed}", file=out)
        return EXIT_OK if removed else EXIT_NOTHING
    if action == "import":
        new = 0
        for start in range(0, len(entries), _BATCH):
            new += await store.add(entries[start : start + _BATCH])
        print(f"imported {new} new of {len(entries)}", file=out)
        return EXIT_OK
    if action == "list":
        async for page in _pages(store):
            for e in page:
                where = f" list={e.list_id}" if e.list_id else ""
                line = f"{e.address} {e.reason}{where} {_iso(e.created_at)} {e.detail}"
                print(line.rstrip(), file=out)
        return EXIT_OK
    to_file = args.csv_file != "-"
    # The file is written on a thread, a page at a time: never on the reactor's.
    stream = await threads.deferToThread(_open_out, args.csv_file) if to_file else out
    try:
        writer = csv.writer(stream, lineterminator="\r\n")
        writer.writerow(COLUMNS)
        count = 0
        async for page in _pages(store):
            rows = [(e.address, e.reason, e.list_id, _iso(e.created_at), e.detail) for e in page]
            await threads.deferToThread(writer.writerows, rows)
            count += len(rows)
    finally:
        if to_file:
            await threads.deferToThread(stream.close)
    if to_file:
        print(f"exported {count}", file=err)
    return EXIT_OK


def _open_out(name: str) -> TextIO:
    return open(name, "w", newline="", encoding="utf-8")


async def _pages(store: Any) -> Any:
    after = None
    while page := await store.entries(after=after, limit=_BATCH):
        yield page
        after = (page[-1].address, page[-1].list_id)


def _iso(at: float | None) -> str:
    if at is None:
        return ""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _time(text: str, where: str) -> float | None:
    from .suppression import SuppressionError

    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SuppressionError(f"{where}: created_at {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _read_import(name: str) -> list[Any]:
    """Every entry of the CSV file ``name``, each checked; SuppressionError naming the row."""
    from .suppression import MANUAL, UNSUBSCRIBED, Suppression, SuppressionError
    from .suppression.records import checked

    if name == "-":
        text = sys.stdin.read()
    else:
        with open(name, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    reader.fieldnames = fields
    column = "address" if "address" in fields else "email" if "email" in fields else None
    if column is None:
        raise SuppressionError(f"{name}: the header row needs an address (or email) column")
    entries: list[Any] = []
    for number, row in enumerate(_rows_of(reader), 2):
        where = f"{name}, row {number}"
        list_id = (row.get("list_id") or "").strip()
        reason = (row.get("reason") or "").strip() or (UNSUBSCRIBED if list_id else MANUAL)
        entry = Suppression(
            (row.get(column) or "").strip(),
            reason,  # type: ignore[arg-type]  # checked() refuses an unknown one
            list_id,
            _time(row.get("created_at") or "", where),
            (row.get("detail") or "").strip(),
        )
        try:
            entries.append(checked(entry))
        except SuppressionError as e:
            raise SuppressionError(f"{where}: {e}") from None
    return entries


def _rows_of(reader: Iterable[dict[str, str]]) -> Iterable[dict[str, str]]:
    for row in reader:
        if any((v or "").strip() for v in row.values() if isinstance(v, str)):
            yield row
