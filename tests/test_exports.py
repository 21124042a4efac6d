"""The public API is what ``twistmail.__all__`` says, and each name is the real object."""

from __future__ import annotations

import twistmail
from twistmail import errors, mailer, message, results
from twistmail.backends import api as backends_api
from twistmail.smtp import facade

EXPECTED = {
    "SMTP": facade.SMTP,
    "Mailer": mailer.Mailer,
    "send": mailer.send,
    "SendResult": results.SendResult,
    "SendReport": results.SendReport,
    "RecipientOutcome": results.RecipientOutcome,
    "Envelope": message.Envelope,
    "TransientError": errors.TransientError,
    "PermanentError": errors.PermanentError,
    "SMTPTimeoutError": errors.SMTPTimeoutError,
    "ConnectionLostError": errors.ConnectionLostError,
    "TLSError": errors.TLSError,
    "AuthenticationError": errors.AuthenticationError,
    "get_backend": backends_api.get_backend,
    "send_mail": backends_api.send_mail,
}


def test_all_names_resolve_and_are_sorted_uniquely() -> None:
    for name in twistmail.__all__:
        assert getattr(twistmail, name) is not None, name
    assert len(set(twistmail.__all__)) == len(twistmail.__all__)


def test_key_names_are_the_implementation_objects() -> None:
    for name, obj in EXPECTED.items():
        assert name in twistmail.__all__
        assert getattr(twistmail, name) is obj


def test_errors_subclass_matching_builtins() -> None:
    assert issubclass(twistmail.SMTPTimeoutError, TimeoutError)
    assert issubclass(twistmail.ConnectionLostError, ConnectionError)
    assert issubclass(twistmail.ConnectError, ConnectionError)
    assert issubclass(twistmail.AddressError, ValueError)
    assert issubclass(twistmail.TLSError, twistmail.PermanentError)
    assert not issubclass(twistmail.PermanentError, twistmail.TransientError)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from twistmail import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(twistmail.__all__)
