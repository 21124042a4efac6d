"""Reading bounces and complaints (pure, no I/O): RFC 3464 delivery status notifications and
RFC 5965 feedback reports, with the :mod:`email` package.

:func:`parse_report` takes a whole message (bytes) and returns a :class:`Report`, or None when
the message is neither a ``multipart/report; report-type=delivery-status`` (nor its RFC 6533
``global`` form) nor a ``multipart/report; report-type=feedback-report``. It never raises, whatever
the bytes: a bounce intake reads mail from anyone.

Each recipient block of a DSN becomes a :class:`RecipientReport` with the fields RFC 3464 names
(Action, Status, Final-Recipient, Original-Recipient, Diagnostic-Code, Remote-MTA) and a
classification: ``hard`` (Action ``failed`` with a 5.x.x status), ``soft`` (``delayed``, or a
4.x.x status) or ``other`` (``delivered``, ``relayed``, ``expanded``). When the Status is only a
class (``5.0.0``, as Exim writes it) and the Diagnostic-Code carries the remote server's more
precise enhanced code (``550 5.1.1 ...``), that code is used.

Whether a hard bounce is about the recipient decides whether the address may be suppressed:
5.1.1 (no such mailbox), 5.1.3 (bad address syntax), 5.1.6 (mailbox moved) and 5.1.10 (the
domain accepts no mail, RFC 7505; Exchange Online's ``RecipientNotFound``) are; 5.1.0, 5.1.7
and 5.1.8 are about *our* sender, and nothing else of class 5 names the recipient's mailbox.
"""

from __future__ import annotations

import email
import email.message
import email.parser
import email.policy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Literal, TypeGuard

from ..suppression.policy import RECIPIENT_HARD_BOUNCES, SENDER_PROBLEMS

__all__ = [
    "MAX_RECIPIENTS",
    "RECIPIENT_STATUSES",
    "SENDER_STATUSES",
    "RecipientReport",
    "Report",
    "parse_report",
]

Kind = Literal["hard", "soft", "other"]

RECIPIENT_STATUSES: Final = RECIPIENT_HARD_BOUNCES
"""Hard-bounce statuses that are about the recipient's address: it may be suppressed (the
suppression policy's list, the same for a refusal at RCPT and for a DSN)."""
SENDER_STATUSES: Final = SENDER_PROBLEMS
"""Statuses about the sender's address (ours): never a reason to suppress a recipient."""
MAX_RECIPIENTS: Final = 1000
"""Recipient blocks read from one report; the rest are ignored."""
COMPLAINT_TYPES: Final = frozenset({"abuse", "fraud", "other"})
"""RFC 5965 Feedback-Types that are a recipient's complaint (not ``not-spam``, ``virus`` or
RFC 6591's ``auth-failure``)."""

_MAX_FIELD: Final = 1000
_STATUS = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\d)")
_ENHANCED_IN_TEXT = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_CONTROL = re.compile(r"[\s\x00-\x1f\x7f\x85\u2028\u2029]+")
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_DSN_TYPES: Final = frozenset({"message/delivery-status", "message/global-delivery-status"})
_FEEDBACK_TYPE: Final = "message/feedback-report"
_ORIGINAL_TYPES: Final = frozenset(
    {"message/rfc822", "message/global", "text/rfc822-headers", "message/global-headers"}
)
_POLICY = email.policy.compat32  # raw header strings: nothing is interpreted that could fail


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What a report says about one recipient."""

    final_recipient: str | None
    """The address the reporting server tried (Final-Recipient, without its ``rfc822;``)."""
    original_recipient: str | None
    """The address as the sender gave it (Original-Recipient), when reported."""
    action: str
    """``failed``, ``delayed``, ``delivered``, ``relayed`` or ``expanded`` (lower-case; as
    written when it is none of them); ``complained`` for a feedback report."""
    status: str
    """The enhanced status code (``5.1.1``), the Diagnostic-Code's when the Status is only a
    class; ``""`` when there is none."""
    diagnostic_code: str | None
    """The remote server's reply as reported (``smtp; 550 5.1.1 ...``), on one line."""
    remote_mta: str | None
    """The server that gave it (Remote-MTA, without its ``dns;``)."""
    kind: Kind
    """``hard``, ``soft`` or ``other`` (see the module's docstring); a complaint is ``hard``."""

    @property
    def about_recipient(self) -> bool:
        """Whether the status says the recipient's address itself is bad (5.1.1, 5.1.3, 5.1.6,
        5.1.10), never our sender's."""
        return self.status in RECIPIENT_STATUSES

    @property
    def suppress(self) -> bool:
        """Whether this recipient should be suppressed: a hard bounce about the recipient, or
        a complaint."""
        return self.kind == "hard" and (self.about_recipient or self.action == "complained")

    @property
    def address(self) -> str | None:
        """The address to act on: Original-Recipient (what we sent to) or Final-Recipient."""
        return self.original_recipient or self.final_recipient


@dataclass(frozen=True, slots=True)
class Report:
    """A delivery status notification or a feedback report, as far as it could be read."""

    type: Literal["delivery-status", "feedback"]
    recipients: tuple[RecipientReport, ...]
    """One per recipient block (a DSN) or complained-about address (a feedback report)."""
    reporting_mta: str | None = None
    envelope_id: str | None = None
    """Original-Envelope-Id (the ENVID the original was sent with), when reported."""
    message_id: str | None = None
    """The original message's Message-ID (from the returned headers, else X-Original-Message-ID)."""
    feedback_type: str | None = None
    """A feedback report's Feedback-Type (``abuse``, ``fraud``, ``not-spam``...)."""
    addressed_to: tuple[str, ...] = ()
    """Where the report itself was delivered (Delivered-To, X-Original-To, To): the VERP
    return path, when mail was sent with one."""

    @property
    def complaint(self) -> bool:
        """Whether this is a recipient's complaint (a feedback report of a complaint type)."""
        return self.type == "feedback" and self.feedback_type in COMPLAINT_TYPES


def parse_report(data: bytes) -> Report | None:
    """The report in ``data`` (a whole message), or None if it is not a DSN or feedback report.

    Never raises: a broken part or field is skipped, and a message whose report part cannot be
    found is None.
    """
    try:
        message = email.message_from_bytes(data, policy=_POLICY)
    except Exception:  # the parser is lenient, but it reads bytes from strangers
        return None
    if message.get_content_type() != "multipart/report":
        return None
    parts = message.get_payload()
    if not isinstance(parts, list):
        return None
    report_type = (_param(message, "report-type") or "").lower()
    status_part = next(
        (p for p in parts if _is_message(p) and p.get_content_type() in _DSN_TYPES), None
    )
    feedback_part = next(
        (p for p in parts if _is_message(p) and p.get_content_type() == _FEEDBACK_TYPE), None
    )
    original = next(
        (p for p in parts if _is_message(p) and p.get_content_type() in _ORIGINAL_TYPES), None
    )
    addressed_to = _addressed_to(message)
    if report_type == "feedback-report" or (status_part is None and feedback_part is not None):
        if feedback_part is None:
            return None
        return _feedback(feedback_part, original, addressed_to)
    if status_part is None:
        return None
    blocks = _blocks(status_part)
    if not blocks:
        return None
    per_message, recipient_blocks = blocks[0], blocks[1:]
    if "action" in per_message or "final-recipient" in per_message:
        # No per-message block (a non-conforming writer): every block is a recipient's.
        per_message, recipient_blocks = {}, blocks
    recipients = tuple(
        _recipient(block)
        for block in recipient_blocks[:MAX_RECIPIENTS]
        if "final-recipient" in block or "action" in block
    )
    return Report(
        type="delivery-status",
        recipients=recipients,
        reporting_mta=_typed_value(per_message.get("reporting-mta")),
        envelope_id=_clean(per_message.get("original-envelope-id")),
        message_id=_original_message_id(original)
        or _clean(
            per_message.get("x-original-message-id") or per_message.get("original-message-id")
        ),
        addressed_to=addressed_to,
    )


# ---------------------------------------------------------------------------------------- parts


def _is_message(part: object) -> TypeGuard[email.message.Message]:
    return isinstance(part, email.message.Message)


def _param(message: email.message.Message, name: str) -> str | None:
    try:
        value = message.get_param(name)
    except Exception:
        return None
    if isinstance(value, tuple):  # an RFC 2231 value: (charset, language, text)
        value = value[2]
    return value if isinstance(value, str) else None


def _text(value: object) -> str:
    """A raw header value as text: bytes the parser kept as surrogates (UTF-8 in a
    ``message/global-delivery-status``, RFC 6533) decoded as UTF-8."""
    if not isinstance(value, str):
        try:
            value = str(value)
        except Exception:
            return ""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        return value.encode("utf-8", "replace").decode("utf-8")


def _clean(value: str | None) -> str | None:
    """``value`` on one line (runs of white space and control characters as one space), at
    most ~1,000 characters; None when empty."""
    if value is None:
        return None
    text = _CONTROL.sub(" ", value).strip()[:_MAX_FIELD]
    return text or None


def _part_text(part: email.message.Message) -> str:
    """A non-multipart part's content as text (transfer encoding undone)."""
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "replace")
    raw = part.get_payload()
    return raw if isinstance(raw, str) else ""


def _fields(text: str) -> Iterator[dict[str, str]]:
    """The header blocks of ``text`` (blocks separated by blank lines), names lower-cased,
    the first of repeated names kept."""
    for block in re.split(r"\r?\n[ \t]*\r?\n", text):
        if block.strip():
            yield _block_fields(email.parser.HeaderParser(policy=_POLICY).parsestr(block.lstrip()))


def _block_fields(block: email.message.Message) -> dict[str, str]:
    fields: dict[str, str] = {}
    for name, value in block.raw_items():
        fields.setdefault(name.strip().lower(), _text(value))
    return fields


def _blocks(part: email.message.Message) -> list[dict[str, str]]:
    """The field blocks of a ``message/delivery-status`` or ``message/feedback-report`` part."""
    try:
        payload = part.get_payload()
        encoding = _text(part.get("content-transfer-encoding", "")).strip().lower()
        if isinstance(payload, list) and encoding not in ("base64", "quoted-printable"):
            blocks = []
            for block in payload:
                if _is_message(block):
                    blocks.append(_block_fields(block))
                    # A type the parser does not know (message/global-delivery-status) is read
                    # as one message: its first block as headers, the other blocks as a body.
                    body = _part_text(block) if isinstance(block.get_payload(), str) else ""
                    if body.strip():
                        blocks.extend(_fields(body))
            return blocks
        if isinstance(payload, list):  # encoded: the parser's blocks are of the encoded text
            payload = "\n\n".join(b.as_string() for b in payload if _is_message(b))
            payload = _decoded(payload, encoding)
        elif isinstance(payload, str):
            payload = _part_text(part)
        else:
            return []
        return list(_fields(payload))
    except Exception:
        return []


def _decoded(text: str, encoding: str) -> str:
    import base64
    import quopri

    data = text.encode("ascii", "replace")
    try:
        raw = base64.b64decode(data) if encoding == "base64" else quopri.decodestring(data)
    except Exception:
        return ""
    return raw.decode("utf-8", "replace")


def _typed_value(value: str | None) -> str | None:
    """The value of an RFC 3464 typed field (``rfc822; addr``, ``dns; host``) without its
    type; RFC 6533's ``\\x{HEX}`` escapes of a ``utf-8`` address decoded."""
    if value is None:
        return None
    kind, semicolon, rest = value.partition(";")
    text = rest if semicolon else kind
    if semicolon and kind.strip().lower() == "utf-8":
        text = _UTF8_ESCAPE.sub(_unescape, text)
    return _clean(text)


def _unescape(match: re.Match[str]) -> str:
    code = int(match.group(1), 16)
    return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else match.group(0)


def _address(value: str | None) -> str | None:
    text = _typed_value(value)
    if text is None:
        return None
    text = text.strip().removeprefix("<").removesuffix(">").strip()
    return text or None


def _status(text: str | None) -> tuple[str, str, str] | None:
    if text is None:
        return None
    match = _STATUS.match(text)
    return None if match is None else (match.group(1), match.group(2), match.group(3))


def _recipient(block: dict[str, str]) -> RecipientReport:
    action = (_clean(block.get("action")) or "").split()[0:1]
    action_text = action[0].lower() if action else ""
    diagnostic = _clean(block.get("diagnostic-code"))
    status = _status(block.get("status"))
    detailed = None
    if diagnostic is not None:
        found = _ENHANCED_IN_TEXT.search(diagnostic.partition(";")[2] or diagnostic)
        detailed = None if found is None else (found.group(1), found.group(2), found.group(3))
    if detailed is not None and (
        status is None or (status[1:] == ("0", "0") and detailed[0] == status[0])
    ):
        status = detailed
    status_text = ".".join(status) if status is not None else ""
    kind: Kind
    if action_text == "delayed" or (status is not None and status[0] == "4"):
        kind = "soft"
    elif action_text == "failed":
        kind = "hard"
    else:
        kind = "other"
    return RecipientReport(
        final_recipient=_address(block.get("final-recipient")),
        original_recipient=_address(block.get("original-recipient")),
        action=action_text,
        status=status_text,
        diagnostic_code=diagnostic,
        remote_mta=_typed_value(block.get("remote-mta")),
        kind=kind,
    )


def _original_headers(part: email.message.Message | None) -> email.message.Message | None:
    """The returned original message's headers (a ``message/rfc822`` or headers part)."""
    if part is None:
        return None
    payload = part.get_payload()
    if isinstance(payload, list):
        inner = payload[0] if payload else None
        if _is_message(inner):
            assert isinstance(inner, email.message.Message)
            encoding = _text(part.get("content-transfer-encoding", "")).strip().lower()
            if encoding not in ("base64", "quoted-printable"):
                return inner
            payload = _decoded(inner.as_string(), encoding)
        else:
            return None
    else:
        payload = _part_text(part)
    return email.parser.HeaderParser(policy=_POLICY).parsestr(payload.lstrip())


def _original_message_id(part: email.message.Message | None) -> str | None:
    try:
        headers = _original_headers(part)
        return None if headers is None else _clean(_text(headers.get("message-id")) or None)
    except Exception:
        return None


def _addressed_to(message: email.message.Message) -> tuple[str, ...]:
    found: list[str] = []
    for name in ("delivered-to", "x-original-to", "to"):
        for value in message.get_all(name) or ():
            text = _clean(_text(value))
            for address in _addresses(text or ""):
                if address not in found:
                    found.append(address)
    return tuple(found[:20])


def _addresses(text: str) -> list[str]:
    """The addresses of a simple address-list header (``a@x, Name <b@y>``), unchecked."""
    found = []
    for item in text.split(","):
        address = item.strip()
        if "<" in address and ">" in address:
            address = address[address.rfind("<") + 1 : address.rfind(">")]
        if address.strip():
            found.append(address.strip())
    return found


def _feedback(
    part: email.message.Message,
    original: email.message.Message | None,
    addressed_to: tuple[str, ...],
) -> Report | None:
    blocks = _blocks(part)
    if not blocks:
        return None
    fields = blocks[0]
    feedback_type = (_clean(fields.get("feedback-type")) or "").lower() or None
    addresses: list[str] = []
    for block in blocks:
        address = _address(block.get("original-rcpt-to"))
        if address is not None and address not in addresses:
            addresses.append(address)
    headers = None
    try:
        headers = _original_headers(original)
    except Exception:
        headers = None
    if not addresses and headers is not None:
        # Many feedback loops redact the recipient; when they do not, the To of the original.
        to = _clean(_text(headers.get("to")) or None)
        if to is not None:
            addresses.extend(a for a in _addresses(to) if "@" in a)
    complaint = feedback_type in COMPLAINT_TYPES
    recipients = tuple(
        RecipientReport(
            final_recipient=address,
            original_recipient=None,
            action="complained",
            status="",
            diagnostic_code=_clean(f"feedback; {feedback_type}") if feedback_type else None,
            remote_mta=None,
            kind="hard" if complaint else "other",
        )
        for address in addresses[:MAX_RECIPIENTS]
    )
    message_id = None
    if headers is not None:
        message_id = _clean(_text(headers.get("message-id")) or None)
    return Report(
        type="feedback",
        recipients=recipients,
        reporting_mta=_typed_value(fields.get("reporting-mta")),
        envelope_id=None,
        message_id=message_id,
        feedback_type=feedback_type,
        addressed_to=addressed_to,
    )
