"""The pytest plugin installed with twistmail (entry point ``pytest11: twistmail``).

For every test, the ``locmem`` outbox (:data:`twistmail.testing.outbox`) starts empty and
:func:`twistmail.send_mail` without ``backend=`` delivers to it, as Django's test runner does;
a test may still call :func:`twistmail.backends.configure` (undone after the test).

Fixtures: ``mail_outbox`` (the outbox list) and ``mail_backend`` (a ``locmem`` backend).
Disable the plugin with ``-p no:twistmail``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from twistmail.backends.locmem import LocmemBackend, OutboxMessage

# twistmail is imported inside the fixtures, not here: importing it imports Twisted's reactor,
# which must wait until plugins such as pytest-twisted have chosen one.


@pytest.fixture(autouse=True)
def _twistmail_locmem_default() -> Iterator[None]:
    """Empty the outbox and make ``locmem`` the default backend for the test."""
    from twistmail.backends import api, locmem

    locmem.outbox.clear()
    previous = api._swap_default(("locmem", {}))
    try:
        yield
    finally:
        api._swap_default(previous)


@pytest.fixture
def mail_outbox() -> list[OutboxMessage]:
    """The messages sent through ``locmem`` backends during this test, oldest first."""
    from twistmail.backends.locmem import outbox

    return outbox


@pytest.fixture
def mail_backend() -> LocmemBackend:
    """A ``locmem`` backend: what it sends lands in ``mail_outbox``."""
    from twistmail.backends.locmem import LocmemBackend

    return LocmemBackend()
