"""The README's web example: a twisted.web contact form that sends mail through a backend."""

import sys
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from twistmail import get_backend, send_mail
from twistmail.interfaces import IBackend


class ContactForm(Resource):
    isLeaf = True

    def __init__(self, backend: IBackend) -> None:
        super().__init__()
        self.backend = backend

    def render_POST(self, request: Request) -> object:
        args = request.args or {}
        reply_to = args.get(b"email", [b""])[0].decode("utf-8", "replace")
        text = args.get(b"message", [b""])[0].decode("utf-8", "replace")
        d = send_mail(
            f"Contact form: {reply_to}",
            text,
            "website@example.com",
            ["team@example.com"],
            backend=self.backend,
        )

        def sent(count: int) -> None:
            request.write(b"Thanks, your message was sent.\n")
            request.finish()

        def failed(reason: Failure) -> None:
            request.setResponseCode(502)
            request.write(b"Sorry, the message could not be sent.\n")
            request.finish()

        d.addCallbacks(sent, failed)
        return NOT_DONE_YET


def main(reactor: Any, smtp_url: str = "smtp://localhost:25") -> Deferred[None]:
    backend = get_backend("smtp", url=smtp_url, concurrency=5)  # one pool for the whole app
    reactor.addSystemEventTrigger("before", "shutdown", backend.close)
    reactor.listenTCP(8080, Site(ContactForm(backend)), interface="127.0.0.1")
    return Deferred()  # serve until stopped


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
