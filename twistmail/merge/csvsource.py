"""The recipients CSV of a mail merge, read as a stream of rows.

The file is UTF-8 (a byte order mark is allowed) with a header row naming the columns. The
delimiter (comma, semicolon, tab or pipe) is sniffed from the header row and the first 64 KiB;
quoting is always the spreadsheet convention (``"`` with doubled quotes inside). Rows are read
one at a time, so a file of millions of rows costs little memory.

Problems confined to one row (a wrong number of cells, an oversized cell) are reported on that
:class:`Row` and reading goes on. Problems with the file itself (bytes that are not UTF-8, a bad
header, a cell so large it suggests an unclosed quote) raise :class:`CsvError`.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from twistmail.errors import CsvError

__all__ = [
    "DEFAULT_CELL_LIMIT",
    "CsvError",
    "CsvSource",
    "Row",
    "count_lines",
    "open_csv",
]

DEFAULT_CELL_LIMIT = 64 * 1024
"""The largest cell, in UTF-8 bytes, a row may hold before it is reported as an error."""

_SNIFF_BYTES = 64 * 1024
_BOM = b"\xef\xbb\xbf"
_DELIMITERS = ",;\t|"
# Bytes one record may span before the file is refused: far beyond any sane cell, so reaching it
# almost always means an unclosed quote swallowing the rest of the file.
_RECORD_HARD_LIMIT_FACTOR = 256
_MIN_RECORD_HARD_LIMIT = 1024 * 1024
# Splits a line holding bare CR line ends (old Mac spreadsheets) into lines; keeps the ends.
_CR_LINES = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n|$)")
_READ_CHUNK = 1024 * 1024
_QUOTED = re.compile(r'"[^"]*"?')


@dataclass(frozen=True, slots=True)
class Row:
    """One data row.

    ``number`` is 1-based and counts records after the header (blank lines included, so numbers
    stay stable). ``values`` maps column names to cells; when ``error`` is set the row must not be
    used and ``values`` holds whatever cells could be matched to columns, for reporting.
    """

    number: int
    values: dict[str, str]
    error: str | None = None


class _LineReader:
    """Decoded lines of a binary file, with the byte offset and size of the current record."""

    def __init__(self, raw: BinaryIO, name: str, hard_limit: int) -> None:
        self._raw = raw
        self._name = name
        self._hard_limit = hard_limit
        self.offset = 0
        self.record_bytes = 0
        self.row_number = 0  # the data row being read; 0 while reading the header

    def __iter__(self) -> Iterator[str]:
        first = True
        for raw_line in self._raw:
            if first:
                first = False
                if raw_line.startswith(_BOM):
                    self.offset += len(_BOM)
                    raw_line = raw_line[len(_BOM) :]
            cr = raw_line.count(b"\r")
            if cr and (cr > 1 or not raw_line.endswith(b"\r\n")):
                pieces = [piece for piece in _CR_LINES.findall(raw_line) if piece]
            else:
                pieces = [raw_line]
            for piece in pieces:
                yield self._decode(piece)

    def _decode(self, piece: bytes) -> str:
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError as exc:
            where = f"row {self.row_number}" if self.row_number else "header row"
            raise CsvError(
                f"{self._name}: not valid UTF-8 at byte {self.offset + exc.start} ({where}); "
                "save the file as UTF-8"
            ) from None
        self.offset += len(piece)
        self.record_bytes += len(piece)
        if self.record_bytes > self._hard_limit:
            raise CsvError(
                f"{self._name}: row {self.row_number} is over {self._hard_limit} bytes; "
                "is a quote left unclosed?"
            )
        return text


class CsvSource:
    """A recipients CSV: its columns, and its rows as an iterable read afresh on each pass.

    Build one with :func:`open_csv`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        columns: tuple[str, ...],
        dialect: type[csv.Dialect],
        cell_limit: int,
    ) -> None:
        self.path = path
        self.name = os.fspath(path)
        self.columns = columns
        self.dialect = dialect
        self.cell_limit = cell_limit
        self._hard_limit = max(cell_limit * _RECORD_HARD_LIMIT_FACTOR, _MIN_RECORD_HARD_LIMIT)

    def __iter__(self) -> Iterator[Row]:
        return self.rows()

    def rows(self) -> Iterator[Row]:
        """The data rows in file order; a changed header raises :class:`CsvError`."""
        _raise_field_size_limit()
        columns = self.columns
        width = len(columns)
        limit = self.cell_limit
        # A character is at most 4 UTF-8 bytes: cells shorter than this need no byte count.
        safe_chars = limit // 4
        with open(self.path, "rb") as raw:
            lines = _LineReader(raw, self.name, self._hard_limit)
            reader = csv.reader(iter(lines), self.dialect)
            try:
                header = next(reader, None)
                if header is None or _header_columns(header, self.name) != columns:
                    raise CsvError(f"{self.name}: the header changed since the file was opened")
                number = 1
                lines.row_number = 1
                lines.record_bytes = 0
                for cells in reader:
                    if not cells:  # a blank line: counted, not yielded
                        pass
                    elif len(cells) != width:
                        yield Row(
                            number,
                            dict(zip(columns, cells, strict=False)),
                            f"row {number}: {len(cells)} cells, but the header has {width} columns",
                        )
                    elif max(map(len, cells)) <= safe_chars:
                        yield Row(number, dict(zip(columns, cells, strict=True)))
                    else:
                        yield self._checked_row(number, cells)
                    number += 1
                    lines.row_number = number
                    lines.record_bytes = 0
            except csv.Error as exc:
                where = f"row {lines.row_number}" if lines.row_number else "header row"
                raise CsvError(f"{self.name}: {where}: {exc}") from None

    def _checked_row(self, number: int, cells: list[str]) -> Row:
        values = dict(zip(self.columns, cells, strict=True))
        for column, cell in values.items():
            if len(cell) > self.cell_limit // 4:
                size = len(cell.encode("utf-8", "surrogatepass"))
                if size > self.cell_limit:
                    return Row(
                        number,
                        values,
                        f"row {number}: the cell in column {column!r} is {size} bytes, over the "
                        f"limit of {self.cell_limit}",
                    )
        return Row(number, values)


def open_csv(path: str | os.PathLike[str], *, cell_limit: int = DEFAULT_CELL_LIMIT) -> CsvSource:
    """Open the recipients CSV at ``path``: sniff its dialect and read its header.

    Raises :class:`CsvError` when the file cannot be read, or its header is missing, has an
    empty or a repeated column name, or is not UTF-8.
    """
    name = os.fspath(path)
    try:
        with open(path, "rb") as raw:
            sample = raw.read(_SNIFF_BYTES)
    except OSError as exc:
        raise CsvError(f"{name}: cannot read the recipients CSV: {exc.strerror}") from None
    dialect = _sniff(sample)
    hard_limit = max(cell_limit * _RECORD_HARD_LIMIT_FACTOR, _MIN_RECORD_HARD_LIMIT)
    _raise_field_size_limit()
    with open(path, "rb") as raw:
        lines = _LineReader(raw, name, hard_limit)
        try:
            header = next(csv.reader(iter(lines), dialect), None)
        except csv.Error as exc:
            raise CsvError(f"{name}: header row: {exc}") from None
    if header is None:
        raise CsvError(f"{name}: the file is empty; the first row must name the columns")
    return CsvSource(path, _header_columns(header, name), dialect, cell_limit)


def count_lines(path: str | os.PathLike[str]) -> int:
    """The number of line breaks in the file (for a progress estimate)."""
    lines = 0
    with open(path, "rb") as raw:
        while chunk := raw.read(_READ_CHUNK):
            lines += chunk.count(b"\n")
    return lines


# -- internals -------------------------------------------------------------------------------


def _header_columns(header: list[str], name: str) -> tuple[str, ...]:
    columns = tuple(cell.strip() for cell in header)
    seen: dict[str, int] = {}
    for position, column in enumerate(columns, 1):
        if not column:
            raise CsvError(f"{name}: column {position} of the header row has no name")
        if column in seen:
            raise CsvError(
                f"{name}: column name {column!r} appears twice in the header row "
                f"(columns {seen[column]} and {position})"
            )
        seen[column] = position
    return columns


class _Semicolon(csv.excel):
    """Spreadsheet quoting with semicolons, as spreadsheets write CSV in comma-decimal locales."""

    delimiter = ";"


class _Pipe(csv.excel):
    """Spreadsheet quoting with a pipe delimiter."""

    delimiter = "|"


# Sniffer's quoting guesses (doublequote, skipinitialspace) depend on what the sample happens to
# contain; only its delimiter is trusted.
_DIALECTS: dict[str, type[csv.Dialect]] = {
    ",": csv.excel,
    "\t": csv.excel_tab,
    ";": _Semicolon,
    "|": _Pipe,
}


def _sniff(sample: bytes) -> type[csv.Dialect]:
    """The dialect of a file starting with ``sample``: its delimiter, spreadsheet quoting.

    Only delimiters found in the header row are candidates (column names seldom hold one);
    csv.Sniffer chooses among several, and the first in ``,;<tab>|`` order wins if it cannot.
    """
    if sample.startswith(_BOM):
        sample = sample[len(_BOM) :]
    # Only whole lines: a cut-off last line would skew the delimiter counts.
    cut = max(sample.rfind(b"\n"), sample.rfind(b"\r"))
    if cut > 0:
        sample = sample[:cut]
    text = sample.decode("utf-8", "replace")
    header = _QUOTED.sub("", text.splitlines()[0] if text else "")
    candidates = "".join(delimiter for delimiter in _DELIMITERS if delimiter in header)
    if len(candidates) > 1:
        try:
            sniffed = csv.Sniffer().sniff(text, delimiters=candidates).delimiter
        except csv.Error:
            sniffed = candidates[0]
        candidates = sniffed if sniffed in candidates else candidates[0]
    return _DIALECTS.get(candidates, csv.excel)


def _raise_field_size_limit() -> None:
    """Let the csv module read cells of any size, so oversized cells are reported, not fatal.

    Record size is bounded separately, by the line reader.
    """
    limit = sys.maxsize
    while limit > csv.field_size_limit():
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # a C long narrower than sys.maxsize (Windows)
            limit //= 2
