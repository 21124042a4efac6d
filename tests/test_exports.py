"""The public API is what ``twistmail.__all__`` says, and each name is the real object."""

from __future__ import annotations

import subprocess
import sys

import twistmail
from twistmail import (
    _messages,
    address,
    composer,
    errors,
    mailer,
    message,
    mime,
    results,
    retry,
)
from twistmail.backends import api as backends_api
from twistmail.smtp import facade

# Every name of twistmail.__all__ and the object it must be: a name added to __all__ without
# being pinned here fails test_every_export_is_pinned.
EXPECTED: dict[str, object] = {
    "SMTP": facade.SMTP,
    "Address": address.Address,
    "parse_address": address.parse_address,
    "parse_address_list": address.parse_address_list,
    "get_backend": backends_api.get_backend,
    "send_mail": backends_api.send_mail,
    "Mailer": mailer.Mailer,
    "send": mailer.send,
    "MessageLike": message.MessageLike,
    "OnResult": _messages.OnResult,
    "Envelope": message.Envelope,
    "envelope_from_bytes": message.envelope_from_bytes,
    "envelope_from_message": message.envelope_from_message,
    "compose": composer.compose,
    "Attachment": mime.Attachment,
    "RecipientOutcome": results.RecipientOutcome,
    "RecipientStatus": results.RecipientStatus,
    "SendReport": results.SendReport,
    "SendResult": results.SendResult,
    "RetryPolicy": retry.RetryPolicy,
    "TwistmailError": errors.TwistmailError,
    "MessageError": errors.MessageError,
    "AddressError": errors.AddressError,
    "HeaderInjectionError": errors.HeaderInjectionError,
    "JournalError": errors.JournalError,
    "CampaignChangedError": errors.CampaignChangedError,
    "QueueError": errors.QueueError,
    "UnknownBackendError": errors.UnknownBackendError,
    "DeliveryError": errors.DeliveryError,
    "TransientError": errors.TransientError,
    "PermanentError": errors.PermanentError,
    "ConnectError": errors.ConnectError,
    "ConnectionLostError": errors.ConnectionLostError,
    "SMTPTimeoutError": errors.SMTPTimeoutError,
    "TLSError": errors.TLSError,
    "AuthenticationError": errors.AuthenticationError,
    "ExtensionRequiredError": errors.ExtensionRequiredError,
}


def test_all_names_are_unique() -> None:
    assert len(set(twistmail.__all__)) == len(twistmail.__all__)


def test_every_export_is_pinned() -> None:
    assert sorted(twistmail.__all__) == sorted(EXPECTED)


def test_every_name_is_the_implementation_object() -> None:
    for name, obj in EXPECTED.items():
        assert getattr(twistmail, name) is obj, name


def test_every_error_class_lives_in_errors() -> None:
    exported_errors = {
        name
        for name in twistmail.__all__
        if isinstance(getattr(twistmail, name), type)
        and issubclass(getattr(twistmail, name), Exception)
    }
    assert exported_errors <= set(errors.__all__)
    for name in exported_errors:
        assert getattr(twistmail, name).__module__ == "twistmail.errors", name


def test_moved_errors_are_the_same_class_where_they_were() -> None:
    from twistmail.backends import UnknownBackendError
    from twistmail.merge.journal import CampaignChangedError, JournalError
    from twistmail.queue import QueueError
    from twistmail.queue.records import QueueError as RecordsQueueError

    assert JournalError is errors.JournalError
    assert CampaignChangedError is errors.CampaignChangedError
    assert QueueError is RecordsQueueError is errors.QueueError
    assert UnknownBackendError is errors.UnknownBackendError
    assert issubclass(errors.CampaignChangedError, errors.JournalError)
    assert issubclass(errors.UnknownBackendError, ImportError)


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


def test_a_name_is_imported_when_first_used() -> None:
    # `import twistmail` (and so `python -m twistmail drain`) does not import the mailer, the
    # composer or the backends; each name still resolves, `dir()` lists it, and a submodule is
    # an attribute of the package as when the package imported them all.
    script = (
        "import sys, twistmail\n"
        "heavy = ('twistmail.mailer', 'twistmail.composer', 'twistmail.backends')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "print(twistmail.Mailer.__module__, set(twistmail.__all__) <= set(dir(twistmail)))\n"
        "print(twistmail.backends.configure.__module__, twistmail.retry.plan.__module__)\n"
        "try:\n"
        "    twistmail.Mailr\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == [
        "[]",
        "twistmail.mailer True",
        "twistmail.backends.api twistmail.retry",
        "module 'twistmail' has no attribute 'Mailr'",
    ], done.stderr
