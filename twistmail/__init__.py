"""twistmail: bulk mail on Twisted — pooled ESMTP delivery with retries and rate limits.

The public API is re-exported here; the modules behind it are implementation details.
"""

from .address import Address, parse_address, parse_address_list
from .backends.api import get_backend, send_mail
from .composer import compose
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
from .mailer import Mailer, MessageLike, OnResult, send
from .message import Envelope, envelope_from_bytes, envelope_from_message
from .mime import Attachment
from .results import RecipientOutcome, RecipientStatus, SendReport, SendResult
from .retry import RetryPolicy
from .smtp.facade import SMTP

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
