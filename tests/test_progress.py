"""The progress display and summary, on a task.Clock."""

from __future__ import annotations

import io

from twisted.internet import task

from twistmail.merge.progress import Progress
from twistmail.merge.run import Counts


def test_plain_progress_line_every_few_seconds_with_counts_rate_and_eta() -> None:
    clock = task.Clock()
    out = io.StringIO()
    counts = Counts()
    progress = Progress(out, total=1000, live=False, clock=clock)
    progress.start(counts)
    clock.advance(4.9)
    assert out.getvalue() == ""
    counts.sent, counts.failed, counts.deferred, counts.invalid = 90, 5, 3, 5
    clock.advance(0.1)
    line = out.getvalue().strip()
    assert line.startswith("progress: 100/~1000")
    assert "sent 90" in line
    assert "failed 5" in line
    assert "deferred 3" in line
    assert "invalid 5" in line
    assert "20/s" in line  # 100 rows in 5 s
    assert "eta 45s" in line  # 900 rows left at 20/s
    progress.stop()
    assert clock.getDelayedCalls() == []


def test_live_progress_uses_rich_and_summary_table() -> None:
    clock = task.Clock()
    out = io.StringIO()
    counts = Counts()
    progress = Progress(out, total=10, live=True, clock=clock)
    progress.start(counts)
    counts.sent = 7
    clock.advance(1)
    progress.stop()
    assert "sending" in out.getvalue()
    assert "7/10" in out.getvalue()
    summary = io.StringIO()
    Progress.summary(summary, counts, {"sent": 9, "failed": 1}, "r.csv", 10)
    text = summary.getvalue()
    assert "summary" in text
    assert "report: r.csv (10 rows)" in text
    sent_line = next(line for line in text.splitlines() if "sent" in line and "│" in line)
    assert "7" in sent_line
    assert "9" in sent_line


def test_rate_and_eta_count_only_rows_attempted_in_this_run() -> None:
    clock = task.Clock()
    out = io.StringIO()
    counts = Counts()
    progress = Progress(out, total=1000, live=False, clock=clock)
    progress.start(counts)
    # A resumed run: 800 rows settled before are skipped at once, 50 are sent in 5 s.
    counts.skipped, counts.sent = 800, 50
    clock.advance(5)
    line = out.getvalue().strip()
    assert line.startswith("progress: 850/~1000")
    assert " 10/s" in line  # 50 attempted in 5 s, not 850
    assert "eta 15s" in line  # 150 rows left at 10/s
    progress.stop()


def test_live_progress_shows_the_same_rate_and_eta() -> None:
    clock = task.Clock()
    out = io.StringIO()
    counts = Counts()
    progress = Progress(out, total=1000, live=True, clock=clock)
    progress.start(counts)
    counts.skipped, counts.sent = 800, 50
    clock.advance(5)
    progress.stop()
    assert "10/s  eta 15s" in out.getvalue()
