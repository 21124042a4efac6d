"""Progress of a campaign: a live rich display on a terminal, a plain line every few seconds
otherwise, and the summary table at the end.

The rate and the time left count only the rows this run attempted: rows skipped because an
earlier run settled them are read in a moment and say nothing about how fast sending goes.
"""

from __future__ import annotations

from typing import Any, Protocol

from rich.console import Console
from rich.table import Table
from twisted.internet.task import LoopingCall

__all__ = ["Progress"]


class _Counts(Protocol):
    sent: int
    failed: int
    deferred: int
    invalid: int
    skipped: int


class Progress:
    """Shows the counters of a running campaign; driven by the reactor's clock."""

    plain_interval = 5.0
    live_interval = 0.25

    def __init__(self, out: Any, *, total: int, live: bool | None, clock: Any) -> None:
        self.out = out
        self.total = total
        self.live = out.isatty() if live is None else live
        self.clock = clock
        self._counts: _Counts | None = None
        self._loop: LoopingCall | None = None
        self._started = 0.0
        self._last = (0.0, 0)
        self._rate = 0.0
        self._rich: Any = None
        self._task: Any = None

    def start(self, counts: _Counts) -> None:
        """Begin showing ``counts`` (read, never changed)."""
        self._counts = counts
        self._started = self.clock.seconds()
        self._last = (self._started, 0)
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]sending"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                console=Console(file=self.out),
                auto_refresh=False,
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task("send", total=self.total or None, detail="")
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.live_interval if self.live else self.plain_interval, now=False)

    def stop(self) -> None:
        """Stop the display (the summary follows separately)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._rich is not None:
            self._tick()
            self._rich.stop()
            self._rich = None

    def _tick(self) -> None:
        counts = self._counts
        if counts is None:
            return
        now = self.clock.seconds()
        attempted = counts.sent + counts.failed + counts.invalid
        done = attempted + counts.skipped
        last_time, last_attempted = self._last
        if now > last_time:
            instant = (attempted - last_attempted) / (now - last_time)
            self._rate = instant if not self._rate else 0.7 * self._rate + 0.3 * instant
        self._last = (now, attempted)
        remaining = max(0, self.total - done)
        eta = f"  eta {remaining / self._rate:,.0f}s" if self._rate > 0 and remaining else ""
        detail = (
            f"sent {counts.sent}  failed {counts.failed}  deferred {counts.deferred}  "
            f"invalid {counts.invalid}  {self._rate:,.0f}/s{eta}"
        )
        waiting = getattr(counts, "waiting", None)
        if waiting:
            detail += f"  waiting for the server: {waiting}"
        if self._rich is not None:
            self._rich.update(self._task, completed=done, detail=detail)
            self._rich.refresh()
            return
        print(f"progress: {done}/~{self.total}  {detail}", file=self.out, flush=True)

    @staticmethod
    def summary(
        out: Any, run: _Counts, journal_counts: dict[str, int], report_path: str, lines: int
    ) -> None:
        """Print the end-of-run table: this run's work and the journal's totals."""
        table = Table(title="twistmail send: summary")
        table.add_column("state")
        table.add_column("this run", justify="right")
        table.add_column("campaign total", justify="right")
        rows = [
            ("sent", run.sent),
            ("failed", run.failed),
            ("deferred", run.deferred),
            ("invalid", run.invalid),
            ("duplicate", getattr(run, "duplicate", 0)),
            ("suppressed", getattr(run, "suppressed", 0)),
            ("pending", None),
        ]
        for state, this_run in rows:
            table.add_row(
                state,
                "" if this_run is None else str(this_run),
                str(journal_counts.get(state, 0)),
            )
        table.add_row("skipped (already settled)", str(run.skipped), "")
        changed = getattr(run, "changed", 0)
        if changed:
            table.add_row("  of which changed since (not resent)", str(changed), "")
        console = Console(file=out, width=max(80, Console(file=out).width))
        console.print(table)
        console.print(f"report: {report_path} ({lines} rows)")
