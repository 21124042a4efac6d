"""Reading DSNs (RFC 3464) and feedback reports (RFC 5965): twistmail.bounces.parse.

The fixtures in tests/fixtures/dsn/ are written in the shapes real servers send (each cites
its source in its MIME preamble).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twistmail.bounces.parse import RecipientReport, Report, parse_report
from twistmail.relay.dsn import FailedRecipient, make_dsn

FIXTURES = Path(__file__).parent / "fixtures" / "dsn"


def fixture(name: str) -> Report:
    report = parse_report((FIXTURES / name).read_bytes())
    assert report is not None, name
    return report


def only(report: Report) -> RecipientReport:
    assert len(report.recipients) == 1
    return report.recipients[0]


def test_postfix_user_unknown_is_a_hard_bounce_about_the_recipient() -> None:
    report = fixture("postfix-5.1.1-user-unknown.eml")
    assert report.type == "delivery-status"
    assert report.reporting_mta == "mail.example.net"
    assert report.message_id == "<feb-news.42@example.com>"  # from text/rfc822-headers
    assert report.addressed_to == ("newsletter@example.com",)
    entry = only(report)
    assert entry.final_recipient == "nobody@example.org"
    assert entry.original_recipient == "nobody@example.org"
    assert entry.action == "failed"
    assert entry.status == "5.1.1"
    assert entry.kind == "hard"
    assert entry.remote_mta == "mx.example.org"
    # Folded over two lines in the report, one line here.
    assert entry.diagnostic_code == (
        "smtp; 550 5.1.1 <nobody@example.org>: Recipient address rejected: "
        "User unknown in local recipient table"
    )
    assert entry.about_recipient
    assert entry.suppress


def test_postfix_delay_warning_is_soft_and_never_suppresses() -> None:
    entry = only(fixture("postfix-4.4.1-delayed.eml"))
    assert (entry.action, entry.status, entry.kind) == ("delayed", "4.4.1", "soft")
    assert entry.final_recipient == "slow@example.org"
    assert not entry.suppress


def test_exim_status_5_0_0_takes_the_remote_servers_code_from_the_diagnostic() -> None:
    report = fixture("exim-5.0.0-user-unknown.eml")
    entry = only(report)
    assert entry.final_recipient == "nobody@example.org"
    assert entry.original_recipient is None
    assert entry.status == "5.1.1"  # Exim writes 5.0.0; the diagnostic says 550 5.1.1
    assert entry.kind == "hard"
    assert entry.suppress
    assert report.message_id == "<feb-news.44@example.com>"  # from message/rfc822


def test_microsoft_365_recipient_not_found_5_1_10_suppresses() -> None:
    report = fixture("m365-5.1.10-recipient-not-found.eml")
    entry = only(report)
    assert entry.final_recipient == "nobody@contoso.com"
    assert entry.status == "5.1.10"
    assert "RESOLVER.ADR.RecipientNotFound" in (entry.diagnostic_code or "")
    assert entry.suppress
    assert report.reporting_mta == "DM6PR12MB3456.namprd12.prod.outlook.com"
    assert report.message_id == "<june-news.7@example.com>"


def test_microsoft_365_bad_outbound_sender_5_1_8_is_hard_but_never_suppresses() -> None:
    entry = only(fixture("m365-5.1.8-bad-outbound-sender.eml"))
    assert (entry.kind, entry.status) == ("hard", "5.1.8")
    assert not entry.about_recipient
    assert not entry.suppress


def test_gmail_no_such_user_with_a_multi_line_reply() -> None:
    report = fixture("gmail-5.1.1-no-such-user.eml")
    entry = only(report)
    assert entry.final_recipient == "nobody@gmail.com"
    assert entry.status == "5.1.1"
    assert entry.suppress
    assert entry.remote_mta is not None
    assert entry.remote_mta.startswith("gmail-smtp-in.l.google.com.")
    assert "\n" not in (entry.diagnostic_code or "")
    assert report.message_id == "<july-news.3@example.com>"


def test_gmail_over_quota_delay_is_soft() -> None:
    report = fixture("gmail-4.2.2-over-quota.eml")
    entry = only(report)
    assert (entry.action, entry.status, entry.kind) == ("delayed", "4.2.2", "soft")
    assert not entry.suppress
    # No original message part with a Message-ID: the per-message field is used.
    assert report.message_id == "<july-news.4@example.com>"


def test_rfc3464_simple_dsn_failed_with_a_4xx_status_is_soft() -> None:
    entry = only(fixture("rfc3464-10.1-simple.eml"))
    assert (entry.action, entry.status) == ("failed", "4.0.0")
    assert entry.kind == "soft"
    assert not entry.suppress


def test_rfc3464_multi_recipient_dsn_keeps_every_block_and_suppresses_none() -> None:
    report = fixture("rfc3464-10.2-multi-recipient.eml")
    assert [(r.final_recipient, r.action, r.status, r.kind) for r in report.recipients] == [
        ("arathib@vnet.ibm.com", "failed", "5.0.0", "hard"),
        ("johnh@hpnjld.njd.hp.com", "delayed", "4.0.0", "soft"),
        ("wsnell@sdcc13.ucsd.edu", "failed", "5.0.0", "hard"),
    ]
    # "550 user unknown" has no enhanced code: not proof that the address itself is bad.
    assert not any(r.suppress for r in report.recipients)
    assert report.recipients[0].diagnostic_code == (
        "smtp; 550 'arathib@vnet.IBM.COM' is not a registered gateway user"
    )


def test_arf_complaint_names_the_recipient_who_complained() -> None:
    report = fixture("rfc5965-b2-arf-complete.eml")
    assert report.type == "feedback"
    assert report.feedback_type == "abuse"
    assert report.complaint
    entry = only(report)
    assert entry.address == "user@example.com"
    assert entry.action == "complained"
    assert entry.suppress


def test_arf_complaint_with_the_recipient_redacted_names_nobody() -> None:
    report = fixture("rfc5965-b1-arf-minimal.eml")
    assert report.complaint
    assert report.recipients == ()
    assert report.message_id == "8787KJKJ3K4J3K4J3K4J3.mail@example.net"


def test_a_not_spam_feedback_report_is_no_complaint() -> None:
    data = (FIXTURES / "rfc5965-b2-arf-complete.eml").read_bytes()
    report = parse_report(data.replace(b"Feedback-Type: abuse", b"Feedback-Type: not-spam"))
    assert report is not None
    assert not report.complaint
    assert not any(r.suppress for r in report.recipients)


@pytest.mark.parametrize(
    ("status", "suppressed"),
    [
        ("5.1.1", True),
        ("5.1.3", True),
        ("5.1.6", True),
        ("5.1.10", True),
        ("5.1.0", False),
        ("5.1.7", False),
        ("5.1.8", False),
        ("5.7.1", False),
        ("5.2.2", False),
    ],
)
def test_which_hard_statuses_suppress(status: str, suppressed: bool) -> None:
    data = (FIXTURES / "postfix-5.1.1-user-unknown.eml").read_bytes()
    data = data.replace(b"Status: 5.1.1", b"Status: " + status.encode())
    data = data.replace(b"550 5.1.1 <nobody", b"550 " + status.encode() + b" <nobody")
    entry = only(parse_report(data) or Report("delivery-status", ()))
    assert entry.status == status
    assert entry.kind == "hard"
    assert entry.suppress is suppressed


def test_what_the_relay_writes_is_read_back() -> None:
    original = (
        b"From: app@example.com\r\nTo: x@example.org\r\nSubject: caf\xc3\xa9\r\n"
        b"Message-ID: <orig.1@example.com>\r\n\r\nbody\r\n"
    )
    data = make_dsn(
        original,
        "app@example.com",
        [
            FailedRecipient("x@example.org", "5.1.1", "550 5.1.1 no such user"),
            FailedRecipient("jos\u00e9@example.org", "5.2.2", "552 5.2.2 mailbox full"),
            FailedRecipient("later@example.org", "4.4.1", "timed out", "delayed"),
        ],
        "relay.example.com",
        1_700_000_000.0,
        "Mail Delivery System <MAILER-DAEMON@relay.example.com>",
    )
    report = parse_report(data)
    assert report is not None
    assert report.reporting_mta == "relay.example.com"
    # The headers part is base64 (it holds 8-bit bytes): still read.
    assert report.message_id == "<orig.1@example.com>"
    assert [(r.final_recipient, r.status, r.kind, r.suppress) for r in report.recipients] == [
        ("x@example.org", "5.1.1", "hard", True),
        ("jos\u00e9@example.org", "5.2.2", "hard", False),  # RFC 6533 \x{E9} decoded
        ("later@example.org", "4.4.1", "soft", False),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"Subject: hello\r\n\r\nnot a report\r\n",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\nhi\r\n--x--\r\n",
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n",
        b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno boundary\r\n",
        b"Content-Type: text/plain\r\n\r\nAction: failed\r\nStatus: 5.1.1\r\n",
    ],
)
def test_messages_that_are_not_reports_are_none(data: bytes) -> None:
    assert parse_report(data) is None


# -------------------------------------------------------------------------------- properties

_FIELD_NAMES = [
    "Reporting-MTA",
    "Final-Recipient",
    "Original-Recipient",
    "Action",
    "Status",
    "Diagnostic-Code",
    "Remote-MTA",
    "Original-Envelope-Id",
    "Feedback-Type",
    "Original-Rcpt-To",
    "Content-Transfer-Encoding",
]
_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from("\r\n\t;:<>@.5"),
    max_size=60,
)
_field = st.tuples(st.sampled_from(_FIELD_NAMES) | _text, _text).map(lambda f: f"{f[0]}: {f[1]}")
_block = st.lists(_field, max_size=6).map("\r\n".join)
_part_type = st.sampled_from(
    [
        "message/delivery-status",
        "message/global-delivery-status",
        "message/feedback-report",
        "message/rfc822",
        "text/rfc822-headers",
        "text/plain",
        "multipart/alternative",
    ]
)
_encoding = st.sampled_from(["", "base64", "quoted-printable", "8bit", "x-bogus"])


@st.composite
def reports(draw: st.DrawFn) -> bytes:
    """multipart/report messages with arbitrary parts, fields and encodings."""
    kind = draw(st.sampled_from(["delivery-status", "feedback-report", "", "x"]))
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        encoding = draw(_encoding)
        headers = f"Content-Type: {draw(_part_type)}\r\n"
        if encoding:
            headers += f"Content-Transfer-Encoding: {encoding}\r\n"
        body = "\r\n\r\n".join(draw(st.lists(_block, max_size=4)))
        parts.append(headers + "\r\n" + body)
    head = f'Content-Type: multipart/report; report-type={kind}; boundary="b"\r\n'
    head += draw(_block) + "\r\n\r\n"
    text = (
        head
        + "".join(f"--b\r\n{part}\r\n" for part in parts)
        + draw(st.sampled_from(["--b--\r\n", ""]))
    )
    return text.encode("utf-8", "surrogateescape")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reports())
def test_the_parser_never_raises_on_report_shaped_messages(data: bytes) -> None:
    report = parse_report(data)
    if report is not None:
        for entry in report.recipients:
            assert entry.kind in ("hard", "soft", "other")
            for value in (entry.final_recipient, entry.diagnostic_code, entry.remote_mta):
                assert value is None or ("\n" not in value and "\r" not in value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_the_parser_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    parse_report(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400), st.binary(max_size=400))
def test_the_parser_never_raises_on_a_real_report_with_bytes_spliced_in(
    head: bytes, tail: bytes
) -> None:
    data = (FIXTURES / "postfix-5.1.1-user-unknown.eml").read_bytes()
    cut = len(data) // 2
    parse_report(data[:cut] + head + data[cut:] + tail)


def test_the_original_envelope_id_and_a_global_delivery_status_part() -> None:
    data = (FIXTURES / "postfix-5.1.1-user-unknown.eml").read_bytes()
    data = data.replace(
        b"Reporting-MTA: dns; mail.example.net\n",
        b"Reporting-MTA: dns; mail.example.net\nOriginal-Envelope-Id: campaign-7.row-42\n",
    )
    data = data.replace(
        b"Content-Type: message/delivery-status", b"Content-Type: message/global-delivery-status"
    )
    data = data.replace(b"rfc822;nobody@example.org", "utf-8;jos\u00e9@example.org".encode())
    report = parse_report(data)
    assert report is not None
    assert report.envelope_id == "campaign-7.row-42"
    entry = only(report)
    assert entry.original_recipient == "jos\u00e9@example.org"
    assert entry.address == "jos\u00e9@example.org"
    assert entry.final_recipient == "nobody@example.org"
