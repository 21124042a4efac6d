"""Delivery status notifications for messages the relay failed to deliver (pure, no I/O).

:func:`notification` turns one failed attempt into the RFC 3464 report
(:func:`~twistmail.relay.dsn.make_dsn`) to the message's envelope sender, as an envelope with
the null sender ``<>`` for the relay's own queue, or None when none may be sent: a message
from ``<>`` or from one of our own bounce addresses (no loops, no backscatter).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..message import Envelope, envelope_from_bytes
from ..queue.records import ClaimedMessage, Outcome
from .dsn import FailedRecipient, make_dsn, should_bounce

__all__ = ["bounce_address", "notification"]

_ENHANCED = re.compile(r"\A([245]\.\d{1,3}\.\d{1,3})\b")


def bounce_address(hostname: str) -> str:
    """The From address of our notifications (never bounced to)."""
    return f"MAILER-DAEMON@{hostname}"


def notification(
    claimed: ClaimedMessage,
    outcome: Outcome,
    hostname: str,
    arrived: float,
    enhanced: Mapping[str, str | None] | None = None,
) -> Envelope | None:
    """The notification for the recipients ``outcome`` failed, or None if none is due.

    ``enhanced`` gives the upstream's enhanced status code per recipient, when it sent one.
    """
    enhanced = enhanced or {}
    sender = str(claimed.envelope.sender)
    if outcome.state != "failed" or not should_bounce(sender, [bounce_address(hostname)]):
        return None
    by_position = dict(zip(claimed.positions, claimed.envelope.recipients, strict=True))
    failed = [
        _failed(str(by_position[position]), code, text, enhanced.get(str(by_position[position])))
        for position, state, code, text in outcome.recipients
        if state == "failed" and position in by_position
    ]
    if not failed:
        return None
    report = make_dsn(
        claimed.envelope.payload,
        sender,
        failed,
        hostname,
        arrived,
        f"Mail Delivery System <{bounce_address(hostname)}>",
    )
    return envelope_from_bytes("", [sender], report)


def _failed(recipient: str, code: int | None, text: str, enhanced: str | None) -> FailedRecipient:
    match = _ENHANCED.match(text)
    if enhanced is None and match is not None:
        enhanced = match.group(1)
    if "(expired:" in text:
        status = "5.4.7"  # delivery time expired
    elif enhanced is not None:
        status = "5" + enhanced[1:]  # a failure is reported as permanent (5.x.y)
    else:
        status = "5.0.0" if code is None or code >= 500 else "5.4.0"
    reply = f"{enhanced} {text}" if enhanced is not None and match is None else text
    return FailedRecipient(recipient, status, f"{code} {reply}" if code is not None else reply)
