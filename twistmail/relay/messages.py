"""What ``POST /v1/messages`` accepts: a JSON message or a raw RFC 5322 one, made an envelope.

Pure functions: bytes in, an :class:`~twistmail.message.Envelope` out, or a :class:`Problem`
naming the field at fault. A JSON message is built by :func:`twistmail.compose`, so it is
checked exactly as the library checks (addresses, header injection, body); a raw one by
:func:`twistmail.message.to_envelope`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ..composer import compose
from ..errors import AddressError, HeaderInjectionError, MessageError
from ..message import Envelope, to_envelope
from ..mime import Attachment

__all__ = [
    "FORBIDDEN_HEADERS",
    "Problem",
    "envelope_from_json",
    "envelope_from_raw",
    "json_object",
]

FIELDS: Final = frozenset(
    {"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "headers", "attachments"}
)
ADDRESS_FIELDS: Final = ("to", "cc", "bcc", "reply_to")

FORBIDDEN_HEADERS: Final = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "received",
        "dkim-signature",
    }
)
"""Header names ``headers`` may not set (nor any ``Content-*``): the message's own fields,
what the MIME structure writes, and what only servers add."""

_MIME_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")
# The library's error field (a header name) -> the request's field.
_FIELD_OF_HEADER: Final = {
    "from": "from",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
    "reply-to": "reply_to",
    "subject": "subject",
}


class Problem(Exception):
    """A request that cannot be accepted: its HTTP status, what is wrong, and the field."""

    def __init__(self, status: int, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field


def _invalid(detail: str, field: str | None) -> Problem:
    return Problem(422, detail, field)


def _text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(f"{name} must be a string", name)
    return value


def _addresses(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise _invalid(f"{name} must be a string or a list of strings", name)


def _headers(value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise _invalid("headers must be an object of header names to strings", "headers")
    headers = []
    for name, text in value.items():
        field = f"headers.{name}"
        lowered = name.lower()
        if lowered in FORBIDDEN_HEADERS or lowered.startswith("content-"):
            raise _invalid(f"header {name} may not be set in headers", field)
        if not isinstance(text, str):
            raise _invalid(f"header {name}: the value must be a string", field)
        headers.append((name, text))
    return headers


def _attachments(value: Any) -> list[Attachment]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _invalid("attachments must be a list", "attachments")
    attached = []
    for i, item in enumerate(value):
        field = f"attachments[{i}]"
        if not isinstance(item, Mapping):
            raise _invalid("an attachment must be an object", field)
        unknown = set(item) - {"filename", "content_type", "content"}
        if unknown:
            raise _invalid(f"unknown attachment field {min(unknown)!r}", f"{field}.{min(unknown)}")
        filename, content_type, content = (
            item.get(k) for k in ("filename", "content_type", "content")
        )
        if not isinstance(filename, str) or not filename or "/" in filename:
            raise _invalid("filename must be a non-empty name without '/'", f"{field}.filename")
        if not isinstance(content, str):
            raise _invalid("content must be a base64 string", f"{field}.content")
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid("content is not valid base64", f"{field}.content") from None
        if content_type is None:
            attached.append(Attachment.named(filename, data))
            continue
        if not isinstance(content_type, str) or _MIME_TYPE.fullmatch(content_type) is None:
            raise _invalid(
                "content_type must be a MIME type such as text/csv", f"{field}.content_type"
            )
        maintype, subtype = content_type.lower().split("/", 1)
        attached.append(Attachment(data, maintype, subtype, filename))
    return attached


def _field_of(error: MessageError, headers: Sequence[tuple[str, str]]) -> str | None:
    """The request field a library error is about."""
    named = getattr(error, "field", None)
    if isinstance(named, str):
        lowered = named.lower()
        if lowered in _FIELD_OF_HEADER:
            return _FIELD_OF_HEADER[lowered]
        return f"headers.{named}"
    text = str(error)
    if "needs a body" in text:
        return "text"
    for name, _ in headers:
        if f"header {name}" in text:
            return f"headers.{name}"
    return None


def json_object(body: bytes) -> dict[str, Any]:
    """``body`` parsed as a JSON object; :class:`Problem` (400) otherwise."""
    try:
        parsed = json.loads(body)
    except UnicodeDecodeError:
        raise Problem(400, "the body is not UTF-8") from None
    except ValueError as e:
        raise Problem(400, f"the body is not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise Problem(400, "the body must be a JSON object")
    return parsed


def envelope_from_json(body: bytes) -> Envelope:
    """The envelope of a JSON message request; :class:`Problem` (400 or 422) otherwise."""
    parsed = json_object(body)
    unknown = set(parsed) - FIELDS
    if unknown:
        name = min(unknown)
        raise _invalid(f"unknown field {name!r}", name)
    sender = parsed.get("from")
    if not isinstance(sender, str) or not sender:
        raise _invalid("from is required: the sender's address", "from")
    headers = _headers(parsed.get("headers"))
    try:
        return compose(
            sender,
            _addresses(parsed, "to"),
            cc=_addresses(parsed, "cc"),
            bcc=_addresses(parsed, "bcc"),
            reply_to=_addresses(parsed, "reply_to"),
            subject=_text(parsed, "subject") or "",
            text=_text(parsed, "text"),
            html=_text(parsed, "html"),
            headers=headers,
            attachments=_attachments(parsed.get("attachments")),
        )
    except (AddressError, HeaderInjectionError, MessageError) as e:
        raise _invalid(str(e), _field_of(e, headers)) from None


def envelope_from_raw(body: bytes, sender: str | None, recipients: Sequence[str]) -> Envelope:
    """The envelope of a raw message with its envelope from the query (``from``, ``to``)."""
    if not sender:
        raise _invalid("a raw message needs the envelope sender: ?from=", "from")
    if not recipients:
        raise _invalid("a raw message needs its recipients: ?to= (one or more)", "to")
    try:
        return to_envelope(body, sender, recipients)
    except AddressError as e:
        field = "from" if (e.field or "").lower() in ("from", "sender") else "to"
        raise _invalid(str(e), field) from None
    except MessageError as e:
        raise _invalid(str(e), "body") from None
