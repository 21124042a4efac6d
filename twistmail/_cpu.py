"""Keeping a command's interpreter on one CPU: its threads take turns at the GIL anyway.

The reactor thread and a SQLite store's thread hand the interpreter lock to each other several
times a message. On two CPUs each hand-off wakes a thread on the other one, and the thread that
wanted the lock back waits for that: on the same CPU the hand-off is a plain switch. A
20,000-message drain into smtp-sink took 0.74-0.80 of the time with its threads on one CPU
(medians of 6 alternating runs each: the sink free to run anywhere, or held to the other CPU)
and 0.95 even on the sink's own CPU. So ``twistmail send`` and ``twistmail drain``
(:func:`hold_to_one_cpu`) keep their threads on the CPU they started on; the DKIM signing
threads, which sign with the lock released and are there to use every CPU, are given back the
process's whole set (:func:`on_every_cpu`). The long-running commands (``worker``, the relay)
are left to the scheduler. ``TWISTMAIL_ONE_CPU=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["cpus", "hold_to_one_cpu", "on_every_cpu"]

_OFF = ("0", "false", "no", "off")  # TWISTMAIL_ONE_CPU values that turn it off
_every: set[int] | None = None  # the CPUs the process had before hold_to_one_cpu


def hold_to_one_cpu() -> bool:
    """Run the calling thread, and the threads it starts from now on, on the CPU it is on; True
    if it did (not where the process has one CPU, the OS cannot, or ``TWISTMAIL_ONE_CPU`` is
    ``0``, ``false``, ``no`` or ``off``)."""
    global _every
    if os.environ.get("TWISTMAIL_ONE_CPU", "1").strip().lower() in _OFF:
        return False
    try:
        allowed = os.sched_getaffinity(0)
        cpu = _current_cpu()
        if len(allowed) < 2 or cpu not in allowed:
            return False
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError, ValueError, IndexError):  # not Linux, or not allowed
        return False
    _every = allowed
    return True


def on_every_cpu() -> None:
    """Give the calling thread back every CPU the process had (after :func:`hold_to_one_cpu`)."""
    if _every is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, _every)


def cpus() -> int:
    """How many CPUs the process may use (before :func:`hold_to_one_cpu` held it to one)."""
    if _every is not None:
        return len(_every)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _current_cpu() -> int:
    """The CPU the calling thread runs on (``/proc/thread-self/stat``, field 39)."""
    with open("/proc/thread-self/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return int(fields[36])
