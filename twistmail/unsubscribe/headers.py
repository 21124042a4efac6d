"""The RFC 2369 / RFC 8058 headers of a campaign message: ``List-Unsubscribe`` (an https URL
carrying the recipient's token, and/or a mailto) and ``List-Unsubscribe-Post``.

Added to a rendered message's header block before it is signed, so the DKIM signature covers
them (:mod:`twistmail.dkim` signs both whenever present, as RFC 8058 asks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, urlsplit

from ..address import parse_address
from ..errors import AddressError, TwistmailError
from ..message import Envelope
from .tokens import TokenBox

__all__ = ["ONE_CLICK", "Unsubscribe", "UnsubscribeError", "prepend_headers"]

ONE_CLICK: Final = "List-Unsubscribe=One-Click"
"""The ``List-Unsubscribe-Post`` value, and the body of the one-click POST (RFC 8058)."""
PLACEHOLDER: Final = "{token}"


class UnsubscribeError(TwistmailError, ValueError):
    """An ``--unsubscribe-url`` or ``--unsubscribe-mailto`` that cannot be used."""


@dataclass(frozen=True)
class Unsubscribe:
    """What to put in each recipient's ``List-Unsubscribe``: ``url`` (an https URL template
    holding ``{token}``) and/or ``mailto`` (an address), tokens made by ``tokens``."""

    tokens: TokenBox | None
    url: str | None = None
    mailto: str | None = None

    def __post_init__(self) -> None:
        if self.url is None and self.mailto is None:
            raise UnsubscribeError("give --unsubscribe-url, --unsubscribe-mailto or both")
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme != "https" or not parts.netloc:
                raise UnsubscribeError(
                    f"--unsubscribe-url {self.url!r}: one-click unsubscribe needs an https:// URL "
                    "(RFC 8058)"
                )
            if self.url.count(PLACEHOLDER) != 1 or any(c in self.url for c in "<>, \r\n\t"):
                raise UnsubscribeError(
                    f"--unsubscribe-url {self.url!r}: expected a URL holding {PLACEHOLDER} once "
                    "(where each recipient's token goes), without spaces, commas or <>"
                )
            if self.tokens is None:
                raise UnsubscribeError("--unsubscribe-url needs --secret-file (to sign tokens)")
        if self.mailto is not None:
            try:
                address = parse_address(self.mailto, field="--unsubscribe-mailto")
            except AddressError as e:
                raise UnsubscribeError(str(e)) from None
            if not str(address).isascii():
                raise UnsubscribeError(f"--unsubscribe-mailto {self.mailto!r}: an ASCII address")

    @classmethod
    def from_options(
        cls, url: str | None, mailto: str | None, secret_file: str | None
    ) -> Unsubscribe:
        """The headers the ``--unsubscribe-url``/``--unsubscribe-mailto``/``--secret-file``
        options ask for (the keys read now); :class:`UnsubscribeError` or
        :class:`~twistmail.unsubscribe.tokens.SecretError` saying what is wrong."""
        tokens = TokenBox.from_file(secret_file) if secret_file else None
        return cls(tokens, url, mailto)

    def headers(self, address: str, list_id: str = "") -> bytes:
        """The header lines (CRLF-ended, folded between the two URIs) for ``address``."""
        uris = []
        token = None
        if self.url is not None:
            assert self.tokens is not None
            token = self.tokens.make(address, list_id)
            uris.append(f"<{self.url.replace(PLACEHOLDER, token)}>")
        if self.mailto is not None:
            subject = "unsubscribe" if token is None else f"unsubscribe {token}"
            uris.append(f"<mailto:{self.mailto}?subject={quote(subject)}>")
        lines = "List-Unsubscribe: " + ",\r\n ".join(uris) + "\r\n"
        if self.url is not None:
            lines += f"List-Unsubscribe-Post: {ONE_CLICK}\r\n"
        return lines.encode("ascii")

    def add_to(self, envelope: Envelope, address: str, list_id: str = "") -> Envelope:
        """``envelope`` with the headers for ``address`` prepended to its header block."""
        return prepend_headers(envelope, self.headers(address, list_id))


def prepend_headers(envelope: Envelope, lines: bytes) -> Envelope:
    """``envelope`` with header ``lines`` (CRLF-ended) put first in its header block."""
    return dataclasses.replace(
        envelope,
        payload=lines + envelope.payload,
        size=envelope.size + len(lines),
        source=None,  # the payload is now the message (a 7-bit re-rendering reads it)
    )
