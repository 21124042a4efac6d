"""Turning CSV rows into envelopes: shared by ``send``, ``check``, ``preview`` and dry runs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from twistmail.address import parse_address_list, parse_sender
from twistmail.errors import MessageError
from twistmail.message import Envelope, envelope_from_message

from .csvsource import CsvSource, Row, open_csv
from .identity import RowIdentity, message_token, row_id
from .template import MessageTemplate, RowError
from .wire import MessageIdFor, render_direct

__all__ = [
    "Duplicates",
    "Prepared",
    "Problem",
    "guess_email",
    "load_inputs",
    "prepare_row",
    "preview_message_id",
    "problems",
    "render_full",
]


@dataclass(frozen=True, slots=True)
class Prepared:
    """One row ready to send; ``key`` (its id) and ``fingerprint`` as :mod:`.identity` makes
    them."""

    row: int
    email: str
    envelope: Envelope
    message_id: str
    key: int = 0
    fingerprint: int | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    """Why one row cannot be sent; ``key`` and ``fingerprint`` as for :class:`Prepared`."""

    row: int
    email: str
    reason: str
    key: int = 0
    fingerprint: int | None = None


def load_inputs(
    csv_path: str | os.PathLike[str], template_path: str | os.PathLike[str]
) -> tuple[CsvSource, MessageTemplate]:
    """Open the CSV and the template and check that every template variable has a column.

    Raises :class:`~twistmail.errors.CsvError` or :class:`~twistmail.errors.TemplateError`.
    """
    template = MessageTemplate.load(template_path)
    source = open_csv(csv_path)
    template.check_columns(source.columns)
    return source, template


def prepare_row(
    template: MessageTemplate,
    row: Row,
    message_id_for: MessageIdFor,
    envelope_from: str | None = None,
    key: int | None = None,
    fingerprint: int | None = None,
) -> Prepared | Problem:
    """Render ``row`` into an envelope, or say why it cannot be sent (naming the field).

    ``key`` (default: the row number) is what ``message_id_for`` makes the Message-ID from.
    """
    if key is None:
        key = row.number
    if row.error is not None:
        return Problem(row.number, guess_email(row), row.error, key, fingerprint)
    date = _this_second()
    try:
        direct = render_direct(
            template,
            row.values,
            row_key=key,
            message_id_for=message_id_for,
            envelope_from=envelope_from,
            date=date,
        )
        if direct is not None:
            envelope, email, message_id = direct
            return Prepared(row.number, email, envelope, message_id, key, fingerprint)
        return render_full(template, row, message_id_for, envelope_from, date, key, fingerprint)
    except (RowError, MessageError) as e:
        return Problem(row.number, guess_email(row), f"row {row.number}: {e}", key, fingerprint)


_second: list[tuple[int, datetime]] = [(0, datetime.fromtimestamp(0, UTC))]


def _this_second() -> datetime:
    """Now, in whole seconds (as a Date header has them); rows in the same second share it."""
    now = int(time.time())
    second, date = _second[0]
    if now != second:
        date = datetime.fromtimestamp(now, UTC)
        _second[0] = (now, date)
    return date


def render_full(
    template: MessageTemplate,
    row: Row,
    message_id_for: MessageIdFor,
    envelope_from: str | None,
    date: datetime,
    key: int,
    fingerprint: int | None = None,
) -> Prepared:
    """``row`` rendered through the email package (any message the template can describe).

    Raises :class:`RowError` or :class:`MessageError` when the row cannot be sent.
    """
    rendered = template.render(row.values, message_id=message_id_for(key, "invalid"), date=date)
    msg = rendered.message
    domain = _from_domain(msg.get("From", ""))
    message_id = message_id_for(key, domain)
    msg.replace_header("Message-ID", message_id)
    sender = parse_sender(envelope_from, field="--from") if envelope_from else None
    envelope = envelope_from_message(msg, sender=sender)
    return Prepared(row.number, rendered.email, envelope, message_id, key, fingerprint)


def problems(
    source: CsvSource,
    template: MessageTemplate,
    envelope_from: str | None = None,
    *,
    first: Callable[[Prepared], None] | None = None,
    each: Callable[[Prepared], None] | None = None,
) -> Iterator[Problem]:
    """Every problem in the campaign, row by row; ``first`` sees the first good message and
    ``each`` every good one (with its :mod:`.identity` key)."""
    identity = RowIdentity.of(template, source.columns)
    for row in source:
        key = row_id(identity.key(row)[0])
        result = prepare_row(template, row, preview_message_id, envelope_from, key)
        if isinstance(result, Problem):
            yield result
            continue
        if first is not None:
            first(result)
            first = None
        if each is not None:
            each(result)


class Duplicates:
    """Finds rows whose recipient (their :mod:`.identity` key, as ``send`` compares them) an
    earlier row already has."""

    def __init__(self) -> None:
        self._first: dict[int, int] = {}

    def earlier_row(self, prepared: Prepared) -> int | None:
        """The first row with the same recipient as ``prepared``, or None if it is the first
        (a row without a usable address is keyed by its number: it has no earlier row)."""
        first = self._first.setdefault(prepared.key, prepared.row)
        return None if first == prepared.row else first


def preview_message_id(key: int, domain: str) -> str:
    """The Message-ID of a message rendered only to be shown or checked."""
    return f"<preview.{message_token(key)}@{domain}>"


def _from_domain(value: str) -> str:
    try:
        addresses = parse_address_list(str(value), field="From")
    except MessageError:
        return "twistmail.invalid"
    return addresses[0].ascii_domain if addresses else "twistmail.invalid"


def guess_email(row: Row) -> str:
    """The row's recipient address as far as the CSV alone tells, for reports."""
    values = row.values
    for key in _EMAIL_COLUMNS:
        value = values.get(key)
        if value:
            return value[:200]
    # A spreadsheet's "E-mail Address" or "Work email": the first such column with an "@".
    for key, value in values.items():
        if "@" in value and "mail" in key.lower():
            return value[:200]
    return ""


_EMAIL_COLUMNS = ("email", "Email", "EMAIL", "to", "To", "address", "mail")
