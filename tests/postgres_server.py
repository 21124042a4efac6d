"""The PostgreSQL server the tests use, and a fresh schema for each test.

``TWISTMAIL_TEST_POSTGRES`` names it (default: ``postgresql://postgres@127.0.0.1:5432/test``,
trust authentication). With ``CI`` set, an unreachable server fails the test; elsewhere the
test is skipped with a message saying how to run it.
"""

from __future__ import annotations

import functools
import os
import uuid

import psycopg
import pytest
from psycopg import sql

URL = os.environ.get("TWISTMAIL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@functools.cache
def _unreachable() -> str | None:
    try:
        with psycopg.connect(URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return str(e).strip()
    return None


def require() -> str:
    """The server's URL; skips (fails, with ``CI`` set) the test if it cannot be reached."""
    problem = _unreachable()
    if problem is not None:
        text = (
            f"PostgreSQL at {URL} cannot be reached ({problem}); run one there (database "
            "'test', user 'postgres', trust authentication) or set TWISTMAIL_TEST_POSTGRES "
            "to a server's URL"
        )
        if os.environ.get("CI"):
            pytest.fail(text)
        pytest.skip(text)
    return URL


def new_schema() -> str:
    """A schema name no other test uses."""
    return f"test_{uuid.uuid4().hex[:16]}"


def drop_schema(schema: str) -> None:
    """Drop ``schema`` and everything in it (after the test's connections closed)."""
    if _unreachable() is not None:
        return
    with psycopg.connect(URL, autocommit=True, connect_timeout=3) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
