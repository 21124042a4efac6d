"""The public unsubscribe listener (``--public-http``): only the one-click routes, no token.

``POST /unsubscribe/TOKEN`` with the form body ``List-Unsubscribe=One-Click`` (RFC 8058, what a
mailbox provider sends) adds the token's recipient to the suppression list for the token's
list and answers 200 with an empty body: no page, no redirect. ``GET /unsubscribe/TOKEN``
shows a confirmation page (Jinja2, autoescaped) whose button posts the same body. A token that
is not genuine gets 400 and changes nothing; so does a POST without the one-click body.

Meant to sit behind TLS termination on a public https URL, apart from the token-protected
``--http`` API. Responses are never cached, never framed, and send no Referer (the token is
in the URL); bodies are limited to a few KB and the page names no full address.
"""

from __future__ import annotations

from typing import Any, Final

from jinja2 import Environment, PackageLoader, select_autoescape
from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from ..interfaces import ISuppressionList
from ..suppression.records import UNSUBSCRIBED, Suppression
from .tokens import Subject, TokenBox

__all__ = ["MAX_BODY", "make_public_http", "make_public_site", "masked"]

log = Logger()

MAX_BODY: Final = 4096

_ENV = Environment(
    loader=PackageLoader("twistmail.unsubscribe", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
)

_HEADERS: Final = {
    b"Cache-Control": b"no-store",
    b"Referrer-Policy": b"no-referrer",
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Content-Security-Policy": (
        b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'"
    ),
}


def masked(address: str) -> str:
    """``address`` shown without most of its local part (``a***@example.org``): enough for
    its owner to recognise, little for whoever a link was forwarded to."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"


def _page(request: IRequest, state: str, subject: Subject | None, status: int = 200) -> bytes:
    request.setResponseCode(status)
    for name, value in _HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    titles = {"confirm": "Unsubscribe", "done": "You are unsubscribed", "invalid": "Invalid link"}
    html = _ENV.get_template("page.html").render(
        state=state,
        title=titles[state],
        list_id=subject.list_id if subject else "",
        masked=masked(subject.address) if subject else "",
    )
    return html.encode("utf-8")


def _empty(request: IRequest, status: int) -> bytes:
    request.setResponseCode(status)
    for name, value in _HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return b""


def make_public_http(tokens: TokenBox, store: ISuppressionList) -> Klein:
    """The Klein app of the unsubscribe routes: tokens checked by ``tokens``, recipients
    added to ``store``."""
    app = Klein()

    @app.route("/unsubscribe/<string:token>", methods=["GET", "HEAD"])
    def confirm(request: IRequest, token: str) -> bytes:
        subject = tokens.open(token)
        if subject is None:
            return _page(request, "invalid", None, 400)
        return _page(request, "confirm", subject)

    @app.route("/unsubscribe/<string:token>", methods=["POST"])
    def unsubscribe(request: IRequest, token: str) -> defer.Deferred[bytes] | bytes:
        subject = tokens.open(token)
        args: dict[bytes, list[bytes]] = request.args or {}
        one_click = args.get(b"List-Unsubscribe") == [b"One-Click"]
        if subject is None or not one_click:
            log.info(
                "unsubscribe refused: {why}",
                why="not a genuine token" if subject is None else "no one-click body",
            )
            return _empty(request, 400)
        confirmed = args.get(b"confirmed") == [b"1"]  # the page's own button
        entry = Suppression(subject.address, UNSUBSCRIBED, subject.list_id, detail="one-click")
        d = store.add([entry])

        def done(new: int) -> bytes:
            log.info(
                "unsubscribed {masked} from {list}",
                masked=masked(subject.address),
                list=subject.list_id or "all mail",
            )
            return _page(request, "done", subject) if confirmed else _empty(request, 200)

        def failed(failure: Failure) -> bytes:
            log.failure("could not record an unsubscribe", failure)
            return _empty(request, 503)

        return d.addCallbacks(done, failed)

    @app.handle_errors
    def not_here(request: IRequest, failure: Failure) -> bytes:
        from werkzeug.exceptions import MethodNotAllowed, NotFound

        if failure.check(NotFound):
            return _empty(request, 404)
        if failure.check(MethodNotAllowed):
            return _empty(request, 405)
        log.failure("the unsubscribe listener failed", failure)
        return _empty(request, 500)

    return app


def make_public_site(tokens: TokenBox, store: ISuppressionList, **kwargs: Any) -> Site:
    """The ``Site`` for ``--public-http``: the routes of :func:`make_public_http`, small
    bodies only, idle connections closed."""
    from ..relay.http import make_site

    return make_site(make_public_http(tokens, store), max_body=MAX_BODY, timeout=30.0, **kwargs)
