"""DKIM signatures checked by dkimpy, an independent verifier, for every kind of message."""

from __future__ import annotations

import hashlib
import os
from email.message import EmailMessage
from pathlib import Path

import pytest
from dkimcheck import DOMAIN, ed_key, rsa_key, signer, verify, write_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twistmail.composer import compose
from twistmail.dkim import (
    _SIGNED,
    DkimError,
    DkimKeyError,
    DkimSigner,
    _body_digest,
    _relaxed_fields,
    _split_fields,
    load_key,
    parse_dkim_option,
    relaxed_body,
    relaxed_header,
)
from twistmail.message import Envelope, reflatten_7bit, to_envelope, unstuff
from twistmail.mime import Attachment


def signed_bytes(envelope: Envelope, ed25519: bool = False) -> bytes:
    signed = signer(ed25519).sign(envelope)
    assert signed.payload.startswith(b"DKIM-Signature:")
    assert signed.size == len(unstuff(signed.payload))
    return unstuff(signed.payload)


def plain() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Shop <shop@{DOMAIN}>"
    msg["To"] = "Ann <ann@example.org>"
    msg["Subject"] = "Hello"
    msg.set_content("Dear Ann,\n.a dot line\nbye  \n\n\n")
    return msg


def test_plain_message_verifies() -> None:
    data = signed_bytes(to_envelope(plain()))
    assert verify(data)


def test_tampered_body_fails() -> None:
    data = signed_bytes(to_envelope(plain()))
    assert not verify(data.replace(b"Dear Ann", b"Dear Bob"))


def test_added_from_fails_because_from_is_over_signed() -> None:
    data = signed_bytes(to_envelope(plain()))
    assert b"h=from:from:" in data
    # On top: without over-signing, a verifier would check the original (bottom) From only.
    assert not verify(b"From: evil@example.net\r\n" + data)


def test_html_message_verifies() -> None:
    msg = plain()
    msg.add_alternative("<p>Dear Ann</p>\n", subtype="html")
    assert verify(signed_bytes(to_envelope(msg)))


def test_attachment_and_both_signatures_verify() -> None:
    envelope = compose(
        f"shop@{DOMAIN}",
        "ann@example.org",
        cc="bo@example.org",
        reply_to="help@example.com",
        subject="Invoice",
        text="See attached.\n",
        html="<p>See attached.</p>",
        attachments=[Attachment.named("a.bin", bytes(range(256)) * 20)],
        headers={
            "List-Unsubscribe": "<https://example.com/u/1>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    )
    data = signed_bytes(envelope, ed25519=True)
    assert b"a=rsa-sha256" in data
    assert b"a=ed25519-sha256" in data
    assert verify(data, 0)
    assert verify(data, 1)
    head = data[: data.index(b"\r\n\r\n")].replace(b"\r\n\t", b"")
    assert b"list-unsubscribe:list-unsubscribe-post" in head
    assert b"h=from:from:to:cc:subject:date:message-id:mime-version:content-type:reply-to" in head


def test_eight_bit_message_verifies_and_resigns_as_seven_bit() -> None:
    msg = plain()
    msg.set_content("Grüße aus Köln\n", cte="8bit")
    envelope = to_envelope(msg)
    assert envelope.eight_bit
    signed = signer().sign(envelope)
    assert verify(unstuff(signed.payload))
    seven = reflatten_7bit(signed)
    assert seven is not None
    assert not seven.eight_bit
    assert seven.payload.count(b"DKIM-Signature:") == 1
    assert verify(unstuff(seven.payload))


def test_smtputf8_message_verifies() -> None:
    msg = plain()
    del msg["From"]
    msg["From"] = f"José <josé@{DOMAIN}>"
    msg.replace_header("Subject", "Añejo")
    envelope = to_envelope(msg)
    assert envelope.smtputf8
    assert verify(signed_bytes(envelope))


def test_caller_bytes_verify_and_dot_stuffing_is_kept() -> None:
    raw = (
        b"From: shop@example.com\nTo: a@example.org\nSubject: x\n\n"
        b".leading dot\n..two dots\nend \t \n\n\n"
    )
    envelope = to_envelope((f"shop@{DOMAIN}", ["a@example.org"], raw))
    signed = signer().sign(envelope)
    assert b"\r\n...two dots\r\n" in signed.payload  # still stuffed on the wire
    assert signed.payload.endswith(envelope.payload)
    assert verify(unstuff(signed.payload))


def test_subdomain_uses_parent_key_and_missing_domain_is_unsigned_or_refused() -> None:
    msg = plain()
    del msg["From"]
    msg["From"] = f"news@mail.{DOMAIN}"
    assert verify(signed_bytes(to_envelope(msg)))
    other = plain()
    del other["From"]
    other["From"] = "x@elsewhere.test"
    envelope = to_envelope(other)
    assert signer().sign(envelope) is envelope
    with pytest.raises(DkimError, match=r"elsewhere\.test"):
        DkimSigner([rsa_key()], missing="refuse").sign(envelope)


def test_relaxed_body_edge_cases() -> None:
    assert relaxed_body(b"") == b""
    assert relaxed_body(b"\r\n\r\n") == relaxed_body(b" \r\n") == b""
    assert relaxed_body(b"a \t b \r\n\r\n") == b"a b\r\n"
    assert relaxed_body(b"a") == b"a\r\n"


header_text = st.text(
    st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from(" \t"), max_size=200
)
body_line = st.one_of(
    st.sampled_from(["", ".", "..", ". ", " ", "\t"]),
    st.text(
        st.characters(min_codepoint=32, max_codepoint=0x24F, exclude_characters="\r\n")
        | st.sampled_from(" \t."),
        max_size=90,
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=header_text,
    lines=st.lists(body_line, max_size=12),
    trailing=st.sampled_from(["", "\n", "\n\n\n", " \n", "\t\n \n"]),
    fold=st.booleans(),
)
def test_generated_messages_verify(
    subject: str, lines: list[str], trailing: str, fold: bool
) -> None:
    folded = subject + ("\n\t" + "w" * 70 + " " + subject if fold else "")
    body = "\n".join(lines) + trailing
    raw = (
        f"From: Shop <shop@{DOMAIN}>\nTo: a@example.org\nSubject: {folded}\n"
        f"X-Long: {'x ' * 60}\n\n{body}"
    ).encode()
    envelope = to_envelope((f"shop@{DOMAIN}", ["a@example.org"], raw))
    signed = signer(ed25519=True).sign(envelope)
    data = unstuff(signed.payload)
    assert verify(data, 0)
    assert verify(data, 1)


def test_keys_are_loaded_and_bad_ones_refused(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k.pem", ed_key())
    key = parse_dkim_option(f"Example.COM:ed1:{path}")
    assert key.domain == "example.com"
    assert key.algorithm == "ed25519-sha256"
    (tmp_path / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
    with pytest.raises(DkimKeyError, match=r"bad\.pem.*not an unencrypted PEM"):
        load_key("example.com", "s", tmp_path / "bad.pem")
    with pytest.raises(DkimKeyError, match="cannot read"):
        load_key("example.com", "s", tmp_path / "missing.pem")
    with pytest.raises(DkimKeyError, match="DOMAIN:SELECTOR:KEYFILE"):
        parse_dkim_option("example.com:k.pem")
    assert os.path.exists(path)


def test_missing_domain_is_reported_once() -> None:
    warnings: list[str] = []
    quiet = DkimSigner([rsa_key()], warn=warnings.append)
    for _ in range(3):
        msg = plain()
        msg.replace_header("From", "x@elsewhere.test")
        quiet.sign(to_envelope(msg))
    assert warnings == ["no DKIM key for the From domain elsewhere.test: sending unsigned"]


white_text = st.text(st.sampled_from("ab. \t\r\n:"), max_size=60).map(lambda t: t.encode())
body_text = st.one_of(  # mostly single spaces (the fast path), sometimes any white space
    st.text(st.sampled_from("aab. "), max_size=12), st.text(st.sampled_from("a \t\r"), max_size=6)
).map(lambda t: t.encode())


@settings(max_examples=500, deadline=None)
@given(
    lines=st.lists(body_text, max_size=8),
    end=st.sampled_from([b"", b"\r\n", b"\r\n\r\n", b" \r\n", b"\r\n \r\n"]),
    lead=white_text,
    tail=white_text,
)
def test_the_body_hash_where_it_lies_equals_hashing_the_relaxed_body(
    lines: list[bytes], end: bytes, lead: bytes, tail: bytes
) -> None:
    body = b"\r\n".join(lines) + end
    data = lead + body + tail
    start, stop = len(lead), len(lead) + len(body)
    assert _body_digest(data, start, stop) == hashlib.sha256(relaxed_body(body)).digest()


field_name = st.sampled_from(
    ["From", "FROM", "from ", "To", "to\t", "Cc", "Subject", "SUBJECT", "X-Other", "Date",
     "Message-ID", "List-Unsubscribe", "List-Unsubscribe-Post", "Content-Type"]
)  # fmt: skip
field_value = st.text(st.sampled_from("ab<>@. \t:"), max_size=30)


@settings(max_examples=400, deadline=None)
@given(
    fields=st.lists(
        st.tuples(field_name, field_value, st.sampled_from(["", "\r\n ", "\r\n\t", " \r\n  "])),
        max_size=10,
    )
)
def test_signed_fields_are_canonicalized_as_field_by_field(
    fields: list[tuple[str, str, str]],
) -> None:
    head = b"\r\n".join(f"{n}:{v}{fold}{v}".encode() for n, v, fold in fields)
    names, values = _relaxed_fields(head)
    expected = [relaxed_header(f) for f in _split_fields(head)]
    expected = [f for f in expected if f[: f.index(b":")] in _SIGNED]
    assert [n + v + b"\r\n" for n, v in zip(names, values, strict=True)] == expected


def test_one_signer_on_several_threads_at_once_makes_good_signatures() -> None:
    """Threads signing at once with one signer (as the Mailer's signing threads do), while the
    clock moves on every call: each signature's t= must be the one it was made over."""
    import itertools
    import threading
    import time

    seconds = itertools.count(int(time.time()) - 100_000)  # a new second at every call
    shared = DkimSigner([rsa_key(), ed_key()], clock=lambda: next(seconds))
    envelopes = [
        to_envelope(compose(f"shop@{DOMAIN}", [f"u{n}@example.org"], subject=f"n{n}", text="hi"))
        for n in range(120)
    ]
    signed: list[bytes | None] = [None] * len(envelopes)
    start = threading.Barrier(3)

    def sign_every_third(first: int) -> None:
        start.wait()
        for n in range(first, len(envelopes), 3):
            signed[n] = unstuff(shared.sign(envelopes[n]).payload)

    threads = [threading.Thread(target=sign_every_third, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bad = [n for n, data in enumerate(signed) if not (data and verify(data, 0) and verify(data, 1))]
    assert bad == []
