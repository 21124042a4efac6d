"""Garbage-collector settings for twistmail's own processes (the CLI commands and the relay).

A sending process makes many short-lived objects a message and keeps few: collecting the
youngest generation every 700 allocations (CPython's default) spends about 5 % of a drain's CPU
walking objects that are about to die anyway, and every full collection walks the modules and
start-up state again. Libraries never change these settings; only our entry points do.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle"]

#: Allocations (net of deallocations) of container objects between young collections.
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Freeze what start-up made (it lives as long as the process) and collect less often.

    Call once the process has imported and configured what it needs, before its main work.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
