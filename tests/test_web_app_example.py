"""The README's test example: examples/web_app.py served by a real Site, posted to by a real
HTTP client, with the locmem backend (README "Delivery backends" shows this file verbatim)."""

from io import BytesIO

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from examples.web_app import ContactForm
from twistmail import get_backend


# Twisted's readBody warns about its own Agent's transport when the body is still arriving.
@pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_contact_form_sends_one_mail(mail_outbox):
    site = Site(ContactForm(get_backend("locmem")))
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/".encode()
    form = b"email=ann%40example.org&message=Hello+there"
    try:
        response = await Agent(reactor).request(
            b"POST",
            url,
            Headers({b"Content-Type": [b"application/x-www-form-urlencoded"]}),
            FileBodyProducer(BytesIO(form)),
        )
        body = await readBody(response)
    finally:
        await port.stopListening()
    assert response.code == 200
    assert body == b"Thanks, your message was sent.\n"
    assert len(mail_outbox) == 1
    assert mail_outbox[0]["Subject"] == "Contact form: ann@example.org"
    assert mail_outbox[0].recipients == ["team@example.com"]
    assert mail_outbox[0].body == "Hello there\n"
