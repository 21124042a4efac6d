"""The ``twistd twistmail`` plugin: a durable local mail relay (see twistmail.relay.tap)."""

from twisted.application.service import ServiceMaker

twistmail = ServiceMaker(
    "twistmail",
    "twistmail.relay.tap",
    "A durable local mail relay: SMTP submission in, a queue, delivery upstream.",
    "twistmail",
)
