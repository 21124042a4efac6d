"""The command line's DKIM parts: ``--dkim`` / ``--dkim-missing`` and ``twistmail dkim keygen``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from .errors import MessageError, TwistmailError

__all__ = ["add_dkim_options", "add_dkim_parser", "dkim_main", "signer_from_args"]

EXIT_OK = 0
EXIT_USAGE = 2


def add_dkim_options(parser: argparse.ArgumentParser, *, missing: bool) -> None:
    """``--dkim DOMAIN:SELECTOR:KEYFILE`` (repeatable) and, with ``missing``, ``--dkim-missing``."""
    parser.add_argument(
        "--dkim",
        action="append",
        default=[],
        metavar="DOMAIN:SELECTOR:KEYFILE",
        help="DKIM-sign mail From DOMAIN (or a subdomain) with the PEM key KEYFILE, published "
        "at SELECTOR._domainkey.DOMAIN; repeat for more domains, or for a second (Ed25519) "
        "key, e.g. --dkim example.com:mail2026:dkim.pem",
    )
    if missing:
        parser.add_argument(
            "--dkim-missing",
            choices=("send", "refuse"),
            default="send",
            help="with --dkim, a message From a domain with no key is sent unsigned (send, "
            "logged once per domain; the default) or failed unsent (refuse)",
        )


def signer_from_args(args: argparse.Namespace, template_path: str | None = None) -> Any:
    """The :class:`~twistmail.dkim.DkimSigner` the ``--dkim`` options ask for, or None.

    Every key is loaded now. For ``send`` (a ``template_path``), messages From a domain with no
    key are refused, and a template whose From is not templated must have a key: otherwise
    this prints why and exits with status 2.
    """
    if not args.dkim:
        return None
    from .dkim import DkimSigner, parse_dkim_option

    try:
        keys = [parse_dkim_option(option) for option in args.dkim]
        refuse = template_path is not None or getattr(args, "dkim_missing", "") == "refuse"
        signer = DkimSigner(keys, missing="refuse" if refuse else "send", warn=_warning_on_stderr)
        if template_path is not None:
            domain = template_from_domain(template_path)
            if domain is not None and not signer.keys_for(domain):
                raise MessageError(
                    f"{template_path}: no --dkim key for the From domain {domain} "
                    f"(keys for: {', '.join(signer.domains)})"
                )
    except TwistmailError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    return signer


def _warning_on_stderr(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def template_from_domain(template_path: str) -> str | None:
    """The domain of a template's From header, when it is not templated (None otherwise, or
    when the file cannot be read: the campaign reports that itself)."""
    from .address import parse_address_list

    try:
        text = Path(template_path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeError):
        return None
    value: str | None = None
    for line in text.splitlines():
        if not line.strip():
            break
        if value is not None and line[:1] in (" ", "\t"):
            value += " " + line.strip()
            continue
        if value is not None:
            break
        name, colon, rest = line.partition(":")
        if colon and name.strip().lower() == "from":
            value = rest.strip()
    if value is None or "{" in value:
        return None
    try:
        addresses = parse_address_list(value, field="From")
    except MessageError:
        return None
    return next((a.ascii_domain for a in addresses if not a.is_null), None)


def add_dkim_parser(sub: Any) -> None:
    """The ``dkim`` command and its ``keygen`` action."""
    dkim = sub.add_parser("dkim", help="DKIM keys", description="Make DKIM signing keys.")
    actions = dkim.add_subparsers(dest="dkim_action", required=True, metavar="ACTION")
    keygen = actions.add_parser(
        "keygen",
        help="write a new private key and print the DNS TXT record to publish",
        description="Write a new DKIM private key (PEM, mode 0600) and print the TXT record "
        "to publish at SELECTOR._domainkey.DOMAIN.",
    )
    keygen.add_argument("--domain", required=True, metavar="D", help="e.g. example.com")
    keygen.add_argument("--selector", required=True, metavar="S", help="e.g. mail2026")
    keygen.add_argument("--key-file", required=True, metavar="PATH", help="must not exist yet")
    keygen.add_argument(
        "--algorithm",
        choices=("rsa", "ed25519"),
        default="rsa",
        help="rsa (2048 bits, the default; every receiver checks it) or ed25519 (RFC 8463, as "
        "a second signature)",
    )


def dkim_main(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run ``twistmail dkim keygen``: write the key (never over an existing file)."""
    from .dkim import (
        DkimKeyError,
        check_domain,
        check_selector,
        dns_record,
        generate_key,
        private_pem,
    )

    try:
        domain = check_domain(args.domain, "--domain")
        selector = check_selector(args.selector, "--selector")
    except DkimKeyError as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    key = generate_key(args.algorithm)
    try:
        fd = os.open(args.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        print(f"error: cannot create --key-file {args.key_file}: {e.strerror}", file=err)
        return EXIT_USAGE
    with os.fdopen(fd, "wb") as file:
        file.write(private_pem(key))
    print(f"wrote {args.key_file} (mode 0600); publish this TXT record:\n", file=out)
    print(f'{selector}._domainkey.{domain}. IN TXT "{_txt_chunks(dns_record(key))}"', file=out)
    print(f"\nthen sign with: --dkim {domain}:{selector}:{args.key_file}", file=out)
    return EXIT_OK


def _txt_chunks(record: str) -> str:
    """``record`` split into quoted strings of at most 255 characters (a TXT string's limit)."""
    return '" "'.join(record[i : i + 255] for i in range(0, len(record), 255))
