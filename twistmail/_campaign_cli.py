"""The command-line options of campaigns kept in a queue: ``send --queue``, ``status --queue``
and ``report`` (the work is in :mod:`twistmail.merge.queued`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["campaign_main", "queue_options", "report_parser", "send_options_problem"]


def queue_options(send: argparse.ArgumentParser) -> None:
    """``send``'s options for a campaign kept in a queue."""
    send.add_argument(
        "--queue",
        metavar="URL",
        help="store the campaign in this queue (sqlite:PATH or "
        "postgresql://user@host:port/db[?schema=NAME]) instead of a journal: any twistmail "
        "worker on any machine then renders and delivers its rows",
    )
    send.add_argument(
        "--enqueue-only",
        action="store_true",
        help="with --queue: store the campaign and exit; the workers deliver it",
    )
    send.add_argument(
        "--campaign",
        metavar="NAME",
        help="with --queue: the campaign's name (default: the CSV's file name without .csv)",
    )


def send_options_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with ``send``'s options about where the campaign is kept, if anything."""
    if not args.smtp and not (args.enqueue_only or args.dry_run):
        return "--smtp URL is required (unless --enqueue-only)"
    if (args.enqueue_only or args.campaign) and not args.queue:
        return "--enqueue-only and --campaign go with --queue URL"
    if args.queue and (args.new_campaign or args.journal):
        return (
            "--queue keeps the campaign in the queue: --journal and --new-campaign do not "
            "apply (name a new campaign with --campaign NAME)"
        )
    if args.queue:
        return _not_carried_by_the_queue(args)
    return None


def _not_carried_by_the_queue(args: argparse.Namespace) -> str | None:
    """Why ``send --queue`` cannot do what an option asks, for the first such option."""
    if args.suppression:
        return (
            "--queue checks the queue's own suppression list: --suppression does not apply "
            "(copy entries with: twistmail suppress export --suppression PATH | twistmail "
            "suppress import - --queue URL)"
        )
    if args.enqueue_only and (args.verp_domain or args.dkim):
        return (
            "--enqueue-only leaves delivery to the workers: give --verp-domain and --dkim to "
            "them (twistmail worker, the relay), not to send"
        )
    return None


def report_parser(sub: Any) -> None:
    """The ``report`` command's parser."""
    report = sub.add_parser(
        "report",
        help="write the report CSV of a campaign stored in a queue",
        description="Example: twistmail report --queue postgresql://mail@db/mail spring",
        epilog="exit status: 0 written; 2 no such queue or campaign.",
    )
    report.add_argument("campaign", metavar="CAMPAIGN")
    report.add_argument("--queue", metavar="URL", required=True, help="the queue's URL")
    report.add_argument(
        "--report", metavar="PATH", help="where to write it (default: CAMPAIGN.report.csv)"
    )


def campaign_main(
    args: argparse.Namespace, react_exit: Callable[[Callable[[Any], Any]], None]
) -> None:
    """``status --queue`` and ``report``: a campaign stored in a queue (``react_exit`` runs
    the command under the reactor and exits with its status)."""
    from .merge import queued

    if args.command == "report":
        react_exit(
            lambda reactor: queued.report(
                args.queue, args.campaign, args.report, sys.stdout, reactor
            )
        )
        return
    react_exit(
        lambda reactor: queued.status(args.queue, args.journal, args.limit, sys.stdout, reactor)
    )
