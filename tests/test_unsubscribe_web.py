"""The public unsubscribe routes in process, over a real TCP port (treq): the page is
autoescaped, the limits and headers hold. The relay's own end-to-end tests are in
``test_suppression_relay.py``."""

from __future__ import annotations

import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from twistmail.testing import MemorySuppressionList
from twistmail.unsubscribe import TokenBox
from twistmail.unsubscribe.web import MAX_BODY, make_public_site, masked

TOKENS = TokenBox([("k1", b"z" * 40)])


async def serve(store: MemorySuppressionList) -> tuple[object, str]:
    port = reactor.listenTCP(0, make_public_site(TOKENS, store), interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}"


@pytest_twisted.ensureDeferred
async def test_the_page_escapes_what_it_shows_and_the_body_is_limited() -> None:
    store = MemorySuppressionList()
    port, base = await serve(store)
    treq = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    try:
        token = TOKENS.make("ann@example.org", '<b>x</b>&"y')
        response = await treq.get(f"{base}/unsubscribe/{token}")
        page = (await response.content()).decode()
        assert response.code == 200
        assert "&lt;b&gt;x&lt;/b&gt;&amp;&#34;y" in page
        assert "<b>x</b>" not in page
        assert response.headers.getRawHeaders("content-security-policy")[0].startswith(
            "default-src 'none'"
        )
        big = await treq.post(
            f"{base}/unsubscribe/{token}",
            data=b"List-Unsubscribe=One-Click&pad=" + b"x" * MAX_BODY,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert big.code == 413
        await big.content()
        assert await store.entries() == []
        # The page's own button: a short page saying it is done.
        done = await treq.post(
            f"{base}/unsubscribe/{TOKENS.make('ann@example.org')}",
            data=b"List-Unsubscribe=One-Click&confirmed=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert done.code == 200
        assert "a***@example.org" in (await done.content()).decode()
        assert [(e.address, e.list_id) for e in await store.entries()] == [("ann@example.org", "")]
        missing = await treq.get(f"{base}/other")
        assert missing.code == 404
        await missing.content()
    finally:
        await port.stopListening()  # type: ignore[attr-defined]


def test_masked_addresses_show_little() -> None:
    assert masked("ann@example.org") == "a***@example.org"
