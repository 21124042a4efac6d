"""The relay's campaign endpoints over real HTTP on 127.0.0.1, with an in-memory queue behind
it: a campaign posted is checked as ``twistmail check`` checks it, then stored; a claim
renders its rows in the sandbox from the uploaded files."""

from __future__ import annotations

import base64
import csv
import email
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from test_relay_api import (  # noqa: F401 - fixtures
    TOKEN,
    Api,
    _serve,
    api,
    get,
    headers,
    http,
    post,
)
from treq.client import HTTPClient

from twistmail.queue import Outcome
from twistmail.unsubscribe import TokenBox
from twistmail.unsubscribe.headers import Unsubscribe

BOX = TokenBox([("k1", b"k" * 43)])

TEMPLATE = """\
From: Shop <shop@example.com>
To: {{ name|mailbox(email) }}
Subject: Hello {{ name }}
Attachment: terms.txt

Dear {{ name }}, your code is {{ code }}.
"""
TERMS = b"the terms and conditions\n"
CSV = "email,name,code\nann@example.org,Ann,A1\nbob@example.org,Bob,B2\ncat@example.org,Cat,C3\n"


def campaign(**changes: Any) -> dict[str, Any]:
    body = {
        "name": "spring",
        "template": TEMPLATE,
        "csv": CSV,
        "attachments": [{"filename": "terms.txt", "content": base64.b64encode(TERMS).decode()}],
    }
    body.update(changes)
    return body


async def _get_csv(client: HTTPClient, url: str) -> list[dict[str, str]]:
    response = await client.get(url, headers={b"Authorization": [f"Bearer {TOKEN}".encode()]})
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/csv; charset=utf-8"]
    return list(csv.DictReader(io.StringIO((await response.content()).decode())))


@pytest_twisted.ensureDeferred
async def test_a_campaign_with_bad_rows_is_refused_listing_every_one_nothing_queued(
    api: Api,  # noqa: F811
    http: HTTPClient,  # noqa: F811
) -> None:
    bad = CSV + "not-an-address,Dan,D4\neve@example.org,Eve,E5\n,Fay,F6\n"
    code, body, _ = await post(http, api.base + "/v1/campaigns", campaign(csv=bad))
    assert code == 422, body
    assert body["problem_count"] == 2
    assert [(p["row"], p["email"]) for p in body["problems"]] == [(4, "not-an-address"), (6, "")]
    assert "missing '@'" in body["problems"][0]["detail"]
    assert await api.queue.campaign_status() == []
    assert await api.queue.claim("w", 10, lease=60) == []
    assert api.wakes == []


@pytest_twisted.ensureDeferred
async def test_a_file_path_and_an_escape_from_the_sandbox_are_refused(
    api: Api,  # noqa: F811
    http: HTTPClient,  # noqa: F811
) -> None:
    code, body, _ = await post(http, api.base + "/v1/campaigns", campaign(attachments=[]))
    assert code == 422, body
    assert body["field"] == "template"
    assert "'terms.txt' was not uploaded" in body["detail"]
    escape = TEMPLATE + "{{ name.__class__.__mro__[1].__subclasses__() }}\n"
    code, body, _ = await post(http, api.base + "/v1/campaigns", campaign(template=escape))
    assert code == 422, body
    assert body["problem_count"] == 3
    assert "unsafe" in body["problems"][0]["detail"]
    assert await api.queue.campaign_status() == []


@pytest_twisted.ensureDeferred
async def test_a_posted_campaign_is_stored_rendered_when_claimed_followed_and_reported(
    api: Api,  # noqa: F811
    http: HTTPClient,  # noqa: F811
) -> None:
    code, body, hdrs = await post(http, api.base + "/v1/campaigns", campaign())
    assert code == 202, body
    assert (body["name"], body["queued"]) == ("spring", 3)
    assert hdrs.getRawHeaders(b"location") == [b"/v1/campaigns/spring"]
    assert api.wakes == [1]
    claimed = await api.queue.claim("w", 10, lease=60)
    assert len(claimed) == 3
    payload = claimed[0].envelope.payload
    assert b"your code is A1." in payload
    assert base64.b64encode(TERMS) in payload
    first = claimed[0]
    await api.queue.record(
        "w",
        Outcome(
            id=first.id,
            fence=first.fence,
            state="sent",
            attempts=1,
            code=250,
            response="ok",
            recipients=((0, "sent", 250, "ok"),),
        ),
    )
    code, shown = await get(http, api.base + "/v1/campaigns/spring")
    assert code == 200, shown
    assert shown["counts"] == {"sent": 1, "pending": 2}
    assert (shown["total"], shown["id"]) == (3, body["id"])
    assert shown["rate_per_second"] > 0
    assert shown["eta_seconds"] == 120.0
    lines = await _get_csv(http, api.base + "/v1/campaigns/spring/report")
    assert [(r["row"], r["email"], r["status"]) for r in lines] == [
        ("1", "ann@example.org", "sent"),
        ("2", "bob@example.org", "pending"),
        ("3", "cat@example.org", "pending"),
    ]
    assert lines[0]["message_id"] == first.envelope.message_id

    # Posted again: nothing queued twice; another template under the name is refused.
    code, again, _ = await post(http, api.base + "/v1/campaigns", campaign())
    assert code == 202, again
    assert (again["queued"], again["already_queued"], again["settled_before"]) == (0, 2, 1)
    changed = TEMPLATE.replace("Hello", "Hi")
    code, refused, _ = await post(http, api.base + "/v1/campaigns", campaign(template=changed))
    assert code == 409, refused
    code, missing = await get(http, api.base + "/v1/campaigns/autumn")
    assert code == 404, missing


@pytest.fixture
def one_click_api(tmp_path: Path) -> Iterator[Api]:
    unsubscribe = Unsubscribe(BOX, "https://m.example.com/u/{token}", "unsub@example.com")
    yield from _serve(tmp_path, tokens=True, unsubscribe=unsubscribe)


@pytest_twisted.ensureDeferred
async def test_with_unsubscribe_options_each_row_gets_its_own_one_click_headers(
    one_click_api: Api,
    http: HTTPClient,  # noqa: F811
) -> None:
    listed = TEMPLATE.replace("Subject:", "List-Id: Shop news <news.example.com>\nSubject:")
    code, body, _ = await post(
        http, one_click_api.base + "/v1/campaigns", campaign(template=listed)
    )
    assert code == 202, body
    claimed = await one_click_api.queue.claim("w", 10, lease=60)
    assert len(claimed) == 3
    for message in claimed:
        parsed = email.message_from_bytes(message.envelope.payload)
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url, mailto = " ".join(parsed["List-Unsubscribe"].split()).split(", ")
        token = url.removeprefix("<https://m.example.com/u/").removesuffix(">")
        assert mailto == f"<mailto:unsub@example.com?subject=unsubscribe%20{token}>"
        subject = BOX.open(token)
        assert subject is not None
        rcpt = str(message.envelope.recipients[0])
        assert (subject.address, subject.list_id) == (rcpt, "news.example.com")
        # First in the header block, as send puts them, before the template's own.
        assert message.envelope.payload.startswith(b"List-Unsubscribe: <https://")


@pytest_twisted.ensureDeferred
async def test_requests_that_are_not_a_campaign_are_refused_naming_the_field(
    api: Api,  # noqa: F811
    http: HTTPClient,  # noqa: F811
) -> None:
    url = api.base + "/v1/campaigns"
    for body, status, field in [
        (campaign(name="../x"), 422, "name"),
        (campaign(csv=""), 422, "csv"),
        (campaign(extra=1), 422, "extra"),
        (campaign(attachments=[{"filename": "a", "content": "%%"}]), 422, "attachments[0].content"),
        (campaign(template="no headers\n"), 422, "template"),
        (campaign(csv="email\nann@example.org\n"), 422, "template"),  # no name, code columns
    ]:
        code, answer, _ = await post(http, url, body)
        assert (code, answer.get("field")) == (status, field), answer
    code, answer, _ = await post(http, url, b"[1]")
    assert code == 400
    code, answer, _ = await post(http, url, b"x", headers(kind=b"text/csv"))
    assert code == 415
