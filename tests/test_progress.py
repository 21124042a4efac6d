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
