"""One-click unsubscribe (RFC 2369 + RFC 8058): signed per-recipient tokens, the headers that
carry them, and the public listener that honours them."""

from .headers import ONE_CLICK, Unsubscribe, UnsubscribeError
from .tokens import NOMINAL_LIFETIME, SecretError, Subject, TokenBox, load_secret_file

__all__ = [
    "NOMINAL_LIFETIME",
    "ONE_CLICK",
    "SecretError",
    "Subject",
    "TokenBox",
    "Unsubscribe",
    "UnsubscribeError",
    "load_secret_file",
]
