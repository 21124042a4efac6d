"""Bounce handling: reading delivery status notifications and feedback reports, VERP return
paths, and the intake that turns them into failed recipients and suppressions.

:mod:`.parse` reads RFC 3464 DSNs and RFC 5965 complaints (pure); :mod:`.verp` makes and checks
signed ``bounces+TOKEN@domain`` return paths (pure); :mod:`.intake` applies a report to the
queue or campaign journal and the suppression list; :mod:`.maildir` reads a Maildir of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .parse import RecipientReport, Report, parse_report

__all__ = ["RecipientReport", "Report", "parse_report"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the command line's parser is built from this package's options.
    if name in __all__:
        from . import parse

        return getattr(parse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
