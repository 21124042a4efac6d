"""The campaign operations of the queue contract, on every store (the contract suite's stores).

A campaign's rows are stored with their cells and no rendered message; a claim renders each
one, in Jinja2's sandbox, from the template and the files stored with the campaign.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
import pytest_twisted
from test_queue_contract import OpenQueue, sent
from test_queue_contract import clock as _clock  # noqa: F401 - the contract suite's fixtures
from test_queue_contract import open_queue as _stores  # noqa: F401

from twistmail.merge.attachments import StoredAttachments
from twistmail.merge.csvsource import Row
from twistmail.merge.identity import campaign_message_id, row_id
from twistmail.merge.prepare import Prepared, prepare_row
from twistmail.merge.template import MessageTemplate
from twistmail.queue.campaigns import CampaignChanged, CampaignRow, CampaignSpec

TEMPLATE = """\
From: News <news@example.com>
To: {{ name|mailbox(email) }}
Subject: Hello {{ name }}

Dear {{ name }}, your code is {{ code }}.
"""
COLUMNS = ("email", "name", "code")


def spec(text: str = TEMPLATE) -> CampaignSpec:
    return CampaignSpec(
        text, "message.txt", COLUMNS, None, hashlib.sha256(text.encode()).hexdigest()
    )


def to_send(
    campaign: str,
    number: int,
    email: str,
    name: str,
    code: str,
    text: str = TEMPLATE,
    files: dict[str, bytes] | None = None,
) -> CampaignRow:
    """Row ``number`` to send, its envelope rendered as ``twistmail send`` renders it."""
    cells = {"email": email, "name": name, "code": code}
    template = MessageTemplate(text, sandboxed=True, attachments=StoredAttachments(files or {}))
    template.check_columns(COLUMNS)
    key = row_id(email)
    prepared = prepare_row(
        template,
        Row(number, cells),
        lambda key, domain: campaign_message_id(campaign, key, domain),
        None,
        key,
    )
    assert isinstance(prepared, Prepared), prepared
    return CampaignRow(key, number, email, "queued", 7, envelope=prepared.envelope, cells=cells)


@pytest_twisted.ensureDeferred
async def test_a_campaign_is_made_once_and_refuses_another_template(
    open_queue: OpenQueue,
) -> None:
    queue = await open_queue()
    first = await queue.campaign_open("spring", spec())
    again = await queue.campaign_open("spring", spec())
    assert (again.id, again.name, again.spec) == (first.id, "spring", spec())
    assert (await queue.campaign(first.id)).name == "spring"
    assert await queue.campaign("autumn") is None
    with pytest.raises(CampaignChanged, match="another template"):
        await queue.campaign_open("spring", spec(TEMPLATE + "P.S.\n"))
    other = await queue.campaign_open("autumn", spec())
    assert other.id != first.id


@pytest_twisted.ensureDeferred
async def test_a_claim_renders_the_row_with_its_message_id(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    campaign = await queue.campaign_open("spring", spec())
    rows = [
        to_send(campaign.id, 1, "ann@example.org", "Ann", "A1"),
        to_send(campaign.id, 2, "bob@example.org", "Bob", "B2"),
    ]
    assert await queue.campaign_add(campaign.id, rows, {}) == 2
    claimed = await queue.claim("w", 10, lease=60)
    assert len(claimed) == 2
    for claim, row in zip(claimed, rows, strict=True):
        env = claim.envelope
        expected_id = campaign_message_id(campaign.id, row.id, "example.com")
        assert env.message_id == expected_id
        assert f"Message-ID: {expected_id}".encode() in env.payload
        assert f"your code is {row.cells['code']}".encode() in env.payload  # type: ignore[index]
        assert [str(r) for r in env.recipients] == [row.email]
        assert env.payload.endswith(b"\r\n.\r\n")
        assert env.size == len(env.payload) - 3  # as rendered, before the final dot
    status = (await queue.campaign_status("spring"))[0]
    assert status.counts == {"pending": 2}
    await queue.record("w", sent(claimed[0]))
    status = (await queue.campaign_status())[0]
    assert status.counts == {"pending": 1, "sent": 1}
    assert [line[1] for line in status.unsent] == ["bob@example.org"]
    lines, after = await queue.campaign_report(campaign.id)
    assert [(line[0], line[1], line[2], line[3]) for line in lines] == [
        (1, "ann@example.org", "sent", 250),
        (2, "bob@example.org", "pending", None),
    ]
    assert lines[0][6] == campaign_message_id(campaign.id, rows[0].id, "example.com")
    assert await queue.campaign_report(campaign.id, after) == ([], after)


@pytest_twisted.ensureDeferred
async def test_a_row_on_its_way_or_sent_is_not_queued_again(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    campaign = await queue.campaign_open("spring", spec())
    ann = to_send(campaign.id, 1, "ann@example.org", "Ann", "A1")
    assert await queue.campaign_add(campaign.id, [ann], {}) == 1
    assert await queue.campaign_add(campaign.id, [ann], {}) == 0  # queued: left alone
    (claim,) = await queue.claim("w", 10, lease=60)
    await queue.record("w", sent(claim))
    assert await queue.campaign_add(campaign.id, [ann], {}) == 0  # sent: left alone
    known = await queue.campaign_lookup(campaign.id, [ann.id, row_id("nobody@example.org")])
    assert known == {ann.id: (1, "sent", 7, 0)}
    assert await queue.claim("w", 10, lease=60) == []


@pytest_twisted.ensureDeferred
async def test_invalid_and_duplicate_rows_are_kept_until_forgotten(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    campaign = await queue.campaign_open("spring", spec())
    ann = to_send(campaign.id, 1, "ann@example.org", "Ann", "A1")
    bad = CampaignRow(row_id("#2"), 2, "", "invalid", None, "row 2: To: no address")
    dup = CampaignRow(row_id("#3"), 3, "ann@example.org", "duplicate", None, "an earlier row")
    await queue.campaign_add(campaign.id, [ann, bad, dup], {})
    moved = CampaignRow(ann.id, 5, "ann@example.org", "seen", 7, changed=True)
    await queue.campaign_add(campaign.id, [moved], {})
    status = (await queue.campaign_status("spring"))[0]
    assert status.counts == {"pending": 1, "invalid": 1, "duplicate": 1}
    assert status.changed == 1
    lines, _ = await queue.campaign_report(campaign.id)
    assert [(line[0], line[2], line[4], line[7]) for line in lines] == [
        (2, "invalid", "row 2: To: no address", ""),
        (3, "duplicate", "an earlier row", ""),
        (5, "pending", "", "yes"),
    ]
    assert await queue.campaign_forget(campaign.id) == 2
    assert (await queue.campaign_status("spring"))[0].counts == {"pending": 1}


@pytest_twisted.ensureDeferred
async def test_attachments_come_from_the_campaigns_files_never_a_path(
    open_queue: OpenQueue,
) -> None:
    queue = await open_queue()
    text = TEMPLATE.replace("Subject:", "Attachment: terms.pdf\nSubject:")
    pdf = b"%PDF-1.4 the terms"
    campaign = await queue.campaign_open("spring", spec(text))
    ann = to_send(
        campaign.id, 1, "ann@example.org", "Ann", "A1", text=text, files={"terms.pdf": pdf}
    )
    await queue.campaign_add(campaign.id, [ann], {"terms.pdf": pdf})
    (claim,) = await queue.claim("w", 10, lease=60)
    assert base64.b64encode(pdf) in claim.envelope.payload
    assert b'filename="terms.pdf"' in claim.envelope.payload

    # A template naming a file that was not uploaded fails its rows when claimed.
    other = await queue.campaign_open("summer", spec(text))
    bob = to_send(other.id, 1, "bob@example.org", "Bob", "B1", text=text, files={"terms.pdf": pdf})
    await queue.campaign_add(other.id, [bob], {})
    assert await queue.claim("w", 10, lease=60) == []
    lines, _ = await queue.campaign_report(other.id)
    assert lines[0][2] == "failed"
    assert "'terms.pdf' was not uploaded with the campaign" in lines[0][4]


@pytest_twisted.ensureDeferred
async def test_a_stored_template_renders_in_the_sandbox(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    # Harmless outside the sandbox (it renders a class's name); refused inside it.
    text = TEMPLATE + "{{ name.__class__.__mro__[1].__subclasses__()|length }}\n"
    campaign = await queue.campaign_open("spring", spec(text))
    unsafe = to_send(
        campaign.id, 1, "ann@example.org", "Ann", "A1"
    )  # rendered as the plain template
    await queue.campaign_add(campaign.id, [unsafe], {})
    assert await queue.claim("w", 10, lease=60) == []
    lines, _ = await queue.campaign_report(campaign.id)
    assert lines[0][2] == "failed"
    assert "unsafe" in lines[0][4] or "not safely" in lines[0][4]
