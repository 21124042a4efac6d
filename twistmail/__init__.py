"""twistmail: bulk mail on Twisted — pooled ESMTP delivery with retries and rate limits.

The public API is re-exported here; the modules behind it are implementation details. The
errors are imported with the package; every other name when first used, so that a command
(``twistmail drain``, run from cron) starts without the modules it has no use for.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import (
    AddressError,
    AuthenticationError,
    CampaignChangedError,
    ConnectError,
    ConnectionLostError,
    DeliveryError,
    ExtensionRequiredError,
    HeaderInjectionError,
    JournalError,
    MessageError,
    PermanentError,
    QueueError,
    SMTPTimeoutError,
    TLSError,
    TransientError,
    TwistmailError,
    UnknownBackendError,
)

if TYPE_CHECKING:
    from .address import Address, parse_address, parse_address_list
    from .backends.api import get_backend, send_mail
    from .composer import compose
    from .mailer import Mailer, MessageLike, OnResult, send
    from .message import Envelope, envelope_from_bytes, envelope_from_message
    from .mime import Attachment
    from .results import RecipientOutcome, RecipientStatus, SendReport, SendResult
    from .retry import RetryPolicy
    from .smtp.facade import SMTP

# The module each name not imported above comes from.
_LAZY: dict[str, str] = {
    "Address": ".address",
    "parse_address": ".address",
    "parse_address_list": ".address",
    "get_backend": ".backends.api",
    "send_mail": ".backends.api",
    "compose": ".composer",
    "Mailer": ".mailer",
    "MessageLike": ".mailer",
    "OnResult": ".mailer",
    "send": ".mailer",
    "Envelope": ".message",
    "envelope_from_bytes": ".message",
    "envelope_from_message": ".message",
    "Attachment": ".mime",
    "RecipientOutcome": ".results",
    "RecipientStatus": ".results",
    "SendReport": ".results",
    "SendResult": ".results",
    "RetryPolicy": ".retry",
    "SMTP": ".smtp.facade",
}

__all__ = [
    "SMTP",
    "Address",
    "AddressError",
    "Attachment",
    "AuthenticationError",
    "CampaignChangedError",
    "ConnectError",
    "ConnectionLostError",
    "DeliveryError",
    "Envelope",
    "ExtensionRequiredError",
    "HeaderInjectionError",
    "JournalError",
    "Mailer",
    "MessageError",
    "MessageLike",
    "OnResult",
    "PermanentError",
    "QueueError",
    "RecipientOutcome",
    "RecipientStatus",
    "RetryPolicy",
    "SMTPTimeoutError",
    "SendReport",
    "SendResult",
    "TLSError",
    "TransientError",
    "TwistmailError",
    "UnknownBackendError",
    "compose",
    "envelope_from_bytes",
    "envelope_from_message",
    "get_backend",
    "parse_address",
    "parse_address_list",
    "send",
    "send_mail",
]


# Hidden from type checkers: they see the imports above, and a module __getattr__ would let a
# misspelt name pass as an object.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        """A public name, imported from its module on first use; or a submodule
        (``twistmail.backends``, ``twistmail.retry``), as importing the package once gave."""
        module = _LAZY.get(name)
        if module is None:
            try:
                return import_module(f".{name}", __name__)
            except ModuleNotFoundError as e:
                if e.name != f"{__name__}.{name}":
                    raise
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        value = getattr(import_module(module, __name__), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(__all__))
