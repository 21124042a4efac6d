"""Row keys and fingerprints (merge/identity.py), and the migration of older journals to them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from twistmail.merge.csvsource import Row
from twistmail.merge.identity import RowIdentity, row_id
from twistmail.merge.schema import migrate
from twistmail.merge.template import MessageTemplate

COLUMNS = ("E-mail Address", "name", "code", "unused")


def identity(to: str, body: str = "Hi {{ name }}, {{ code }}") -> RowIdentity:
    template = MessageTemplate(f"From: a@example.com\nTo: {to}\nSubject: s\n\n{body}\n")
    template.check_columns(COLUMNS)
    return RowIdentity.of(template, COLUMNS)


def row(number: int = 1, email: str = "Ann@Example.ORG", **cells: str) -> Row:
    values = {"E-mail Address": email, "name": "Ann", "code": "1", "unused": "x"}
    values.update(cells)
    return Row(number, values)


@pytest.mark.parametrize(
    "to",
    [
        "{{ name }} <{{ e_mail_address }}>",
        '{{ name|mailbox(row["E-mail Address"]) }}',
        "{{ e_mail_address }}",
    ],
)
def test_the_key_is_the_mailbox_of_the_address_column_the_to_header_reads(to: str) -> None:
    assert identity(to).key(row(7)) == ("ann@example.org", "Ann@Example.ORG", "E-mail Address")


def test_a_row_without_a_usable_address_is_keyed_by_its_number() -> None:
    keyed = identity("{{ e_mail_address }}")
    assert keyed.key(row(7, email="not an address"))[0] == "#7"
    assert keyed.key(row(8, email=""))[0] == "#8"
    built = identity("{{ name }}@example.org")  # no cell holds the address
    assert built.key(row(9))[0] == "#9"


def test_the_fingerprint_follows_the_cells_the_template_reads() -> None:
    keyed = identity("{{ name }} <{{ e_mail_address }}>")
    first = keyed.identify(row())[2]
    assert keyed.identify(row(number=5))[2] == first, "the row number is not a cell"
    assert keyed.identify(row(unused="changed"))[2] == first, "a column the template ignores"
    assert keyed.identify(row(email="ann@example.org"))[2] == first, "the same mailbox"
    assert keyed.identify(row(code="2"))[2] != first
    assert keyed.identify(row(name="Anne"))[2] != first


def test_a_template_reading_the_whole_row_fingerprints_every_column() -> None:
    keyed = identity("{{ e_mail_address }}", body="{% for k in row %}{{ row[k] }}{% endfor %}")
    assert keyed.fingerprinted == COLUMNS
    assert keyed.identify(row(unused="changed"))[2] != keyed.identify(row())[2]


_V2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE rows (
    row INTEGER PRIMARY KEY, email TEXT NOT NULL, state TEXT NOT NULL, code INTEGER,
    response TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0, message_id TEXT,
    next_attempt_at REAL, updated_at REAL NOT NULL
);
INSERT INTO meta VALUES ('schema_version', '2'), ('campaign_id', 'c'), ('csv_sha256', 'x');
INSERT INTO rows (row, email, state, updated_at) VALUES
    (1, 'Ann@Example.org', 'sent', 0),
    (2, 'bob@x.org', 'pending', 0),
    (3, 'ann@example.org', 'sent', 0),
    (4, 'ANN@example.org', 'duplicate', 0),
    (5, 'broken', 'invalid', 0),
    (6, '', 'invalid', 0);
"""


def test_a_version_2_journal_takes_the_keys_the_current_version_gives(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "j.db")
    conn.executescript(_V2)
    migrate(conn, "2")
    ids = dict(conn.execute("SELECT row, id FROM rows"))
    assert ids == {
        1: row_id("ann@example.org"),
        2: row_id("bob@x.org"),
        3: row_id("ann@example.org#2"),  # sent twice with --allow-duplicates: the second copy
        4: row_id("#4"),  # a duplicate is found afresh by each run
        5: row_id("#5"),
        6: row_id("#6"),
    }
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta == {"schema_version": "3", "campaign_id": "c"}
    conn.close()
