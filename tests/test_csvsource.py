"""Tests for twistmail.merge.csvsource: streaming CSV rows with exact, actionable errors."""

from __future__ import annotations

import csv
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twistmail.errors import TwistmailError
from twistmail.merge.csvsource import CsvError, Row, count_lines, open_csv


def write(tmp_path: Path, data: bytes, name: str = "recipients.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_rows_stream_with_numbers_and_stripped_columns(tmp_path: Path) -> None:
    path = write(tmp_path, b" email , name\r\na@example.com,Ann\r\nb@example.com,Bob\r\n")
    source = open_csv(path)
    assert source.columns == ("email", "name")
    assert list(source) == [
        Row(1, {"email": "a@example.com", "name": "Ann"}),
        Row(2, {"email": "b@example.com", "name": "Bob"}),
    ]
    # Iterable more than once: each pass reads the file afresh.
    assert [row.number for row in source] == [1, 2]


def test_bom_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = write(tmp_path, "\ufeffemail,name\na@example.com,Zoë\n".encode())
    source = open_csv(path)
    assert source.columns == ("email", "name")
    assert next(iter(source)).values == {"email": "a@example.com", "name": "Zoë"}


def test_semicolon_dialect_is_sniffed(tmp_path: Path) -> None:
    path = write(tmp_path, b'email;name;note\na@example.com;"Doe, Ann";"x, y"\n')
    source = open_csv(path)
    assert source.columns == ("email", "name", "note")
    assert next(iter(source)).values == {
        "email": "a@example.com",
        "name": "Doe, Ann",
        "note": "x, y",
    }


def test_tab_dialect_is_sniffed(tmp_path: Path) -> None:
    path = write(tmp_path, b"email\tname\na@example.com\tAnn, Jr\nb@example.com\tBob\n")
    source = open_csv(path)
    assert source.columns == ("email", "name")
    assert [row.values["name"] for row in source] == ["Ann, Jr", "Bob"]


def test_doubled_quotes_after_a_sample_without_quotes(tmp_path: Path) -> None:
    # The sniffer would guess doublequote=False from a sample with no quotes; it is not trusted.
    path = write(tmp_path, b'email;name\na@example.com;Ann\nb@example.com;"Bob ""B"""\n')
    rows = list(open_csv(path))
    assert rows[1].values["name"] == 'Bob "B"'
    assert rows[1].error is None


def test_single_column_falls_back_to_excel(tmp_path: Path) -> None:
    path = write(tmp_path, b"email\na@example.com\nb@example.com\n")
    source = open_csv(path)
    assert source.dialect is csv.excel
    assert [row.values for row in source] == [
        {"email": "a@example.com"},
        {"email": "b@example.com"},
    ]


def test_quoted_newlines_and_bare_cr_line_ends(tmp_path: Path) -> None:
    path = write(tmp_path, b'email,note\r"a@example.com","two\rlines"\rb@example.com,x\r')
    rows = list(open_csv(path))
    assert [row.values for row in rows] == [
        {"email": "a@example.com", "note": "two\rlines"},
        {"email": "b@example.com", "note": "x"},
    ]


def test_ragged_rows_are_reported_and_reading_goes_on(tmp_path: Path) -> None:
    path = write(
        tmp_path, b"email,name\na@example.com\nb@example.com,Bob,extra\nc@example.com,Cy\n"
    )
    rows = list(open_csv(path))
    assert [row.number for row in rows] == [1, 2, 3]
    assert rows[0].error == "row 1: 1 cells, but the header has 2 columns"
    assert rows[0].values == {"email": "a@example.com"}
    assert rows[1].error == "row 2: 3 cells, but the header has 2 columns"
    assert rows[2].error is None
    assert rows[2].values == {"email": "c@example.com", "name": "Cy"}


def test_blank_lines_are_counted_but_not_yielded(tmp_path: Path) -> None:
    path = write(tmp_path, b"email\na@example.com\n\nb@example.com\n")
    assert [(row.number, row.values["email"]) for row in open_csv(path)] == [
        (1, "a@example.com"),
        (3, "b@example.com"),
    ]


def test_row_numbers_count_records_not_lines(tmp_path: Path) -> None:
    path = write(tmp_path, b'email,note\na@example.com,"1\n2\n3"\nb@example.com,\xff\n')
    with pytest.raises(CsvError, match=r"\(row 2\)"):
        list(open_csv(path))


def test_huge_cell_is_read_and_reported(tmp_path: Path) -> None:
    big = "é" * 40_000  # 80,000 UTF-8 bytes: over 64 KiB, though only 40,000 characters
    path = write(
        tmp_path,
        f"email,body\na@example.com,{big}\nb@example.com,{'x' * 65_536}\n".encode(),
    )
    rows = list(open_csv(path))
    assert rows[0].error == (
        "row 1: the cell in column 'body' is 80000 bytes, over the limit of 65536"
    )
    assert rows[1].error is None  # exactly at the limit is allowed
    assert len(rows[1].values["body"]) == 65_536


def test_cell_limit_is_configurable(tmp_path: Path) -> None:
    path = write(tmp_path, b"email,body\na@x.io,0123456789\n")
    assert next(iter(open_csv(path, cell_limit=10))).error is None
    row = next(iter(open_csv(path, cell_limit=9)))
    assert row.error is not None
    assert "column 'body'" in row.error
    assert "row 1" in row.error


def test_cell_over_the_stdlib_field_limit_is_a_row_error(tmp_path: Path) -> None:
    # csv.field_size_limit() defaults to 128 KiB; such a cell must not end the whole read.
    path = write(
        tmp_path, f"email,body\na@example.com,{'x' * 300_000}\nb@example.com,ok\n".encode()
    )
    rows = list(open_csv(path))
    assert rows[0].error is not None
    assert "300000 bytes" in rows[0].error
    assert rows[1].values == {"email": "b@example.com", "body": "ok"}


def test_unclosed_quote_is_bounded(tmp_path: Path) -> None:
    # A record may span at most max(256 * cell_limit, 1 MiB) bytes, not the rest of the file.
    lines = b"".join(b"x@example.com,filler %d\n" % i for i in range(60_000))
    path = write(tmp_path, b'email,note\na@example.com,"never closed\n' + lines)
    with pytest.raises(CsvError, match=r"row 1 is over 1048576 bytes; is a quote left unclosed"):
        list(open_csv(path, cell_limit=2))


def test_non_utf8_names_offset_and_row(tmp_path: Path) -> None:
    data = b"email,name\na@example.com,Ann\nb@example.com,Bj\xf6rn\n"
    path = write(tmp_path, data)
    source = open_csv(path)  # the header is fine
    with pytest.raises(CsvError) as info:
        list(source)
    offset = data.index(b"\xf6")
    assert str(info.value) == (
        f"{path}: not valid UTF-8 at byte {offset} (row 2); save the file as UTF-8"
    )
    assert isinstance(info.value, TwistmailError)
    assert isinstance(info.value, ValueError)


def test_non_utf8_offset_counts_the_bom(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbfemail\na@example.com\n\xe9@example.com\n"
    path = write(tmp_path, data)
    offset = data.index(b"\xe9")
    with pytest.raises(CsvError, match=rf"at byte {offset} \(row 2\)"):
        list(open_csv(path))


def test_non_utf8_header_is_refused_at_open(tmp_path: Path) -> None:
    path = write(tmp_path, b"email,n\xe4me\na@example.com,x\n")
    with pytest.raises(CsvError, match=r"at byte 7 \(header row\)"):
        open_csv(path)


def test_rows_before_a_bad_byte_are_delivered(tmp_path: Path) -> None:
    path = write(tmp_path, b"email\na@example.com\nb@example.com\n\xff\n")
    rows = iter(open_csv(path))
    assert [next(rows).number, next(rows).number] == [1, 2]
    with pytest.raises(CsvError, match=r"row 3"):
        next(rows)


def test_duplicate_column_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, b"email,name, email\na,b,c\n")
    with pytest.raises(CsvError, match=r"'email' appears twice .*\(columns 1 and 3\)"):
        open_csv(path)


def test_empty_column_name_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, b"email,  ,name\na,b,c\n")
    with pytest.raises(CsvError, match=r"column 2 of the header row has no name"):
        open_csv(path)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CsvError, match="empty"):
        open_csv(write(tmp_path, b""))


def test_changed_header_between_open_and_read(tmp_path: Path) -> None:
    path = write(tmp_path, b"email\na@example.com\n")
    source = open_csv(path)
    path.write_bytes(b"mail\na@example.com\n")
    with pytest.raises(CsvError, match="header changed"):
        list(source)


def test_streaming_does_not_load_the_file(tmp_path: Path) -> None:
    row = b"someone@example.com,Some Name,some more text to make the row longer\n"
    path = write(tmp_path, b"email,name,note\n" + row * 100_000)  # ~6.5 MB
    tracemalloc.start()
    try:
        count = 0
        for item in open_csv(path):
            count += 1
            assert item.error is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 100_000
    assert peak < 2_000_000


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.text(st.characters(exclude_categories=["Cs"]), max_size=20), min_size=2, max_size=2
        ),
        max_size=8,
    ),
    st.sampled_from([",", ";", "\t"]),
)
def test_round_trip_of_written_csv(
    tmp_path_factory: pytest.TempPathFactory, cells: list[list[str]], delimiter: str
) -> None:
    path = tmp_path_factory.mktemp("csv") / "r.csv"
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, delimiter=delimiter)
        writer.writerow(["email", "name"])
        writer.writerows(cells)
    expected = [(number, {"email": row[0], "name": row[1]}) for number, row in enumerate(cells, 1)]
    got = [(row.number, row.values) for row in open_csv(path) if row.error is None]
    # A row written as two empty cells reads back as a blank-looking '""'-less line only when the
    # writer leaves it empty; the csv writer quotes it, so every row comes back.
    assert got == expected


def test_count_lines_counts_line_breaks_across_read_chunks(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_bytes(b"email\n" + b"a@example.com\n" * 200_000)  # several read chunks
    assert count_lines(path) == 200_001
