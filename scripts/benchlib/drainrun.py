"""``twistmail drain`` as a benchmark subject: a filled spool, and one measured drain.

The spool is filled once per message count, untimed, by this file run as a script with the
benchmarked interpreter (``python drainrun.py fill --spool PATH --count N``): the ``spool``
backend is given the library mode's messages (``senders.triples``: ~2.3 KB CRLF bytes, one
recipient each) in batches, exactly as an application would enqueue them. The closed spool file
is kept as a template; each measured run gets a fresh byte-for-byte copy of it.

A run is ``python -m twistmail drain --spool COPY --smtp smtp://127.0.0.1:PORT --concurrency N``
in a fresh subprocess, timed by the driver around the whole child (start-up, imports, opening
the spool, claiming, delivering, recording every outcome, closing); CPU and peak RSS come from
the child's ``wait4`` rusage. A run counts only if the drain exits 0 and the sink's counter grew
by exactly the number of messages.

Standard library only at import time, like ``runner.py`` (the ``fill`` entry point imports
Twisted and twistmail from the interpreter it runs under).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from runner import BenchError, Run, Sink, run_counted

DRAIN_SENDER = "twistmail-drain"
FILL_BATCH = 500  # messages per send_messages() call (one spool transaction each)
_SIDE_FILES = ("-wal", "-shm", "-journal")

# As in clirun.py: let the untimed runs write bytecode even if the environment forbids it.
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


class DrainInputs:
    """Filled spool templates (one per message count, filled once) in ``workdir``."""

    def __init__(self, python: str, workdir: Path) -> None:
        self.python = python
        self.workdir = workdir
        self._templates: dict[int, Path] = {}
        self._serial = 0

    def template_for(self, count: int) -> Path:
        if count not in self._templates:
            path = self.workdir / f"spool-template-{count}.db"
            t0 = time.perf_counter()
            cmd = [self.python, __file__, "fill", "--spool", str(path), "--count", str(count)]
            done = subprocess.run(
                cmd, env=_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise BenchError(
                    f"filling a spool with {count} messages failed (status {done.returncode})\n"
                    f"{done.stdout[-1500:]}\n{done.stderr[-2500:]}"
                )
            print(
                f"  filled a {count}-message spool ({path.stat().st_size / 1e6:.1f} MB) in "
                f"{time.perf_counter() - t0:.1f} s (untimed)",
                file=sys.stderr,
            )
            self._templates[count] = path
        return self._templates[count]

    def fresh_spool(self, count: int) -> Path:
        """A new copy of the ``count``-message template, for one drain to consume."""
        template = self.template_for(count)
        self._serial += 1
        copy = self.workdir / f"drain-{self._serial}.db"
        shutil.copyfile(template, copy)
        for suffix in _SIDE_FILES:
            side = Path(f"{template}{suffix}")
            if side.exists():
                shutil.copyfile(side, f"{copy}{suffix}")
        return copy


def run_drain(
    python: str,
    inputs: DrainInputs,
    sink: Sink,
    count: int,
    connections: int,
    timeout: float,
) -> Run:
    """One ``twistmail drain`` of a fresh ``count``-message spool; checked against the sink."""
    if not sink.alive():
        raise BenchError("smtp-sink has died")
    spool = inputs.fresh_spool(count)
    cmd = [
        python,
        "-m",
        "twistmail",
        "drain",
        "--spool",
        str(spool),
        "--smtp",
        f"smtp://127.0.0.1:{sink.port}",
        "--concurrency",
        str(connections),
    ]
    label = f"{DRAIN_SENDER} ({count} messages)"
    try:
        elapsed, rusage, received, _ = run_counted(
            cmd,
            label=label,
            sink=sink,
            expected=count,
            timeout=timeout,
            workdir=inputs.workdir,
            env=_ENV,
            name="drain",
        )
    finally:
        for p in (spool, *(Path(f"{spool}{s}") for s in _SIDE_FILES)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    cpu = rusage.ru_utime + rusage.ru_stime
    return Run(
        sender=DRAIN_SENDER,
        count=count,
        rate=count / elapsed,
        elapsed=elapsed,
        cpu_us_per_msg=cpu / count * 1e6,
        cpu_total_s=cpu,
        maxrss_mb=rusage.ru_maxrss / 1024,  # KiB on Linux
        sink_received=received,
    )


# ---------------------------------------------------------------------- fill (a child)


def fill(spool: str, count: int) -> None:
    """Enqueue ``count`` library-mode messages into ``spool`` with the spool backend."""
    from senders import triples
    from twisted.internet import defer, task

    from twistmail.backends.spool import SpoolBackend

    async def main(reactor: object) -> None:
        backend = SpoolBackend(path=spool, reactor=reactor)
        await backend.open()
        items = triples(count)
        enqueued = 0
        while enqueued < count:
            batch = [next(items) for _ in range(min(FILL_BATCH, count - enqueued))]
            enqueued += await backend.send_messages(batch)
        await backend.close()
        print(f"enqueued {enqueued}")

    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fill a spool for scripts/bench --mode drain")
    sub = parser.add_subparsers(dest="command", required=True)
    fill_parser = sub.add_parser("fill")
    fill_parser.add_argument("--spool", required=True)
    fill_parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    fill(args.spool, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
