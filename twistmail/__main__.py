"""``python -m twistmail``: the same as the ``twistmail`` command."""

from .cli import main

main()
