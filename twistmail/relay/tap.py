"""``twistd twistmail``: the relay's command-line options and the service they make.

:class:`Options` is what ``twistd twistmail --help`` (and ``twistmail serve --help``) lists;
:func:`makeService` turns parsed options into the relay's
:class:`~twisted.application.service.MultiService`. A bad value or combination is a
:class:`~twisted.python.usage.UsageError` naming the option.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twisted.application.service import MultiService
from twisted.python import usage

from ..queue.url import parse_queue_url
from ..smtp.client import parse_url
from .config import DAY, RelayConfig

if TYPE_CHECKING:
    from ..bounces.verp import VerpSigner
    from ..dkim import DkimSigner
    from ..unsubscribe.headers import Unsubscribe
    from ..unsubscribe.tokens import TokenBox

__all__ = ["Options", "makeService"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_LOOPBACK = "127.0.0.0/8,::1/128"


def _number(
    convert: Callable[[str], float], what: str, *, minimum: float, strict: bool = False
) -> Callable[[str], Callable[[str], Any]]:
    """Coercers for ``usage.Options``: a number of ``what`` of at least (or above) ``minimum``,
    made per option so that the error names it."""

    def for_option(name: str) -> Callable[[str], Any]:
        def coerce(text: str) -> Any:
            try:
                value = convert(text)
            except ValueError:
                value = math.nan
            if (
                math.isnan(value)
                or math.isinf(value)
                or value < minimum
                or (strict and value == minimum)
            ):
                bound = f"above {minimum:g}" if strict else f"at least {minimum:g}"
                raise ValueError(f"--{name}: expected {what} {bound}, got {text!r}")
            return value

        coerce.coerceDoc = f"({what})"  # type: ignore[attr-defined]
        return coerce

    return for_option


_SUFFIXES = {"s": 1, "m": 60, "h": 3600, "d": DAY}
_SIZES = {"k": 1024, "m": 1024**2, "g": 1024**3}


def _duration(text: str) -> float:
    """Seconds, with an optional unit: ``90``, ``300s``, ``30m``, ``12h``, ``5d``."""
    text = text.strip().lower()
    scale = _SUFFIXES.get(text[-1:], 0)
    return float(text[:-1]) * scale if scale else float(text)


def _size(text: str) -> int:
    """Bytes, with an optional unit: ``26214400``, ``512k``, ``25m``, ``1g``."""
    text = text.strip().lower()
    scale = _SIZES.get(text[-1:], 0)
    return int(float(text[:-1]) * scale) if scale else int(text)


_count = _number(int, "a whole number", minimum=1)
_seconds = _number(_duration, "a duration such as 300, 30m, 12h or 5d", minimum=0, strict=True)
_bytes = _number(_size, "a size such as 26214400, 512k or 25m", minimum=1024)
_rate = _number(float, "messages per second", minimum=0, strict=True)


def parse_networks(text: str) -> tuple[Network, ...]:
    """``CIDR,CIDR,...`` as networks; ValueError naming the entry that is not one."""
    networks = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or network (e.g. 10.0.0.0/8)") from None
    return tuple(networks)


class Options(usage.Options):
    """The relay's options (``twistd twistmail --help``)."""

    synopsis = "[options]"
    longdesc = (
        "A durable local mail relay: applications submit mail over SMTP, each message is "
        "committed to the queue (fsync'd) before the 250 reply, and a worker delivers it to "
        "the upstream server with retries (Postfix's schedule by default). Example:\n"
        "  TWISTMAIL_SMTP_PASSWORD=... twistd -n twistmail --smtp "
        "smtp+tls://alice@mail.example.com:587 --queue sqlite:/var/spool/twistmail/queue.db"
    )

    optFlags = [
        ["insecure", None, "do not verify the upstream's certificate (testing only)"],
        ["no-bounces", None, "send no delivery status notification for a failed message"],
        [
            "verp",
            None,
            "send each recipient's message from its own signed return path at "
            "--bounce-domain, so its bounce names it (one transaction, and one copy of a "
            "message with several recipients, per recipient)",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["dkim"] = []

    def opt_dkim(self, value: str) -> None:
        """DKIM-sign mail From DOMAIN (or a subdomain) with the PEM key KEYFILE, published at
        SELECTOR._domainkey.DOMAIN (repeatable), e.g. --dkim example.com:mail2026:dkim.pem"""
        self["dkim"].append(value)

    optParameters = [
        [
            "dkim-missing",
            None,
            "send",
            "with --dkim, mail From a domain with no key is sent unsigned (send, logged once "
            "per domain) or failed unsent (refuse)",
        ],
        [
            "smtp",
            None,
            None,
            "the upstream: smtp://host[:port], smtp+tls://user@host (STARTTLS required) or "
            "smtp+ssl://user@host, e.g. --smtp smtp+tls://alice@mail.example.com:587; the "
            "password comes from $TWISTMAIL_SMTP_PASSWORD or --password-file, never the URL",
        ],
        ["password-file", None, None, "read the upstream password from this file"],
        ["ca-file", None, None, "trust this CA for the upstream, e.g. --ca-file ca.pem"],
        [
            "queue",
            None,
            "sqlite:twistmail-queue.db",
            "the queue, e.g. --queue sqlite:/var/spool/twistmail/queue.db (one relay per file) "
            "or --queue postgresql://mail@db.example.com/mail (any number of relays and workers "
            "on any machines; ?schema=NAME picks the schema)",
        ],
        [
            "lease",
            None,
            300.0,
            "how long a claimed message stays reserved for this relay if it dies (renewed "
            "while it runs; on PostgreSQL, how soon the other relays take over its messages), "
            "e.g. --lease 60",
            _seconds("lease"),
        ],
        [
            "submission",
            None,
            "tcp:2525:interface=127.0.0.1",
            "where applications submit mail (a Twisted endpoint, or none), e.g. "
            "--submission tcp:587:interface=0.0.0.0",
        ],
        [
            "http",
            None,
            "tcp:8025:interface=127.0.0.1",
            "health and metrics (a Twisted endpoint, or none), e.g. --http tcp:9025",
        ],
        [
            "public-http",
            None,
            "none",
            "the one-click unsubscribe routes only (no API token; put it behind TLS "
            "termination at the https URL of send --unsubscribe-url), e.g. "
            "--public-http tcp:8026:interface=127.0.0.1 (needs --secret-file)",
        ],
        [
            "secret-file",
            None,
            None,
            "the unsubscribe token and VERP return path keys (KEY_ID:SECRET a line, the first "
            "signs), shared with twistmail send and twistmail bounces --secret-file",
        ],
        [
            "unsubscribe-url",
            None,
            None,
            "the campaigns posted to the API get a one-click List-Unsubscribe with each "
            "recipient's token at this https URL (holding {token}; where --public-http is "
            "reached through TLS termination; needs --secret-file), e.g. --unsubscribe-url "
            "'https://mail.example.com/unsubscribe/{token}'",
        ],
        [
            "unsubscribe-mailto",
            None,
            None,
            "the campaigns posted to the API also (or only) offer unsubscribing by mail to "
            "this address, e.g. --unsubscribe-mailto unsubscribe@example.com",
        ],
        [
            "bounce-domain",
            None,
            None,
            "accept bounces from anyone, without AUTH, at the signed VERP return paths "
            "bounces+TOKEN@DOMAIN (any other address there is refused) and apply them: fail "
            "the recipient, suppress it (needs --secret-file), e.g. --bounce-domain "
            "bounces.example.com",
        ],
        [
            "concurrency",
            None,
            10,
            "upstream connections, e.g. --concurrency 20",
            _count("concurrency"),
        ],
        [
            "rate",
            None,
            None,
            "at most R messages per second upstream (on a PostgreSQL queue, for all its "
            "relays and workers together: give each the same R), e.g. --rate 50",
            _rate("rate"),
        ],
        [
            "per-domain",
            None,
            None,
            "at most N messages in flight per recipient domain, e.g. --per-domain 5",
            _count("per-domain"),
        ],
        [
            "retry-delay",
            None,
            300.0,
            "first retry after a 4xx, e.g. --retry-delay 5m",
            _seconds("retry-delay"),
        ],
        [
            "max-retry-delay",
            None,
            4000.0,
            "the retry delay doubles up to this, e.g. --max-retry-delay 1h",
            _seconds("max-retry-delay"),
        ],
        [
            "max-attempts",
            None,
            None,
            "fail a message after N attempts (default: no limit, --max-age decides)",
            _count("max-attempts"),
        ],
        [
            "max-age",
            None,
            5 * DAY,
            "fail a message still undelivered this long after it came in, e.g. --max-age 2d",
            _seconds("max-age"),
        ],
        ["hostname", None, None, "the name in the greeting and Received: (default: the FQDN)"],
        [
            "allow-from",
            None,
            _LOOPBACK,
            "clients that may submit without AUTH, e.g. --allow-from 127.0.0.1,10.0.0.0/8",
        ],
        ["users-file", None, None, "AUTH users (written by `twistmail users add NAME`)"],
        [
            "api-token-file",
            None,
            None,
            "HTTP API bearer tokens (written by `twistmail tokens add NAME`); required for "
            "--http on an interface other than loopback",
        ],
        [
            "http-hosts",
            None,
            "",
            "extra names the HTTP API answers to in the Host header (besides --hostname, "
            "localhost and IP addresses), e.g. --http-hosts relay.internal,mail-api",
        ],
        ["tls-cert", None, None, "certificate (PEM) for STARTTLS, e.g. --tls-cert cert.pem"],
        ["tls-key", None, None, "private key (PEM) for STARTTLS, e.g. --tls-key key.pem"],
        [
            "max-message-size",
            None,
            25 * 1024 * 1024,
            "the largest message accepted, e.g. --max-message-size 10m",
            _bytes("max-message-size"),
        ],
        [
            "max-recipients",
            None,
            1000,
            "recipients per message, e.g. --max-recipients 100",
            _count("max-recipients"),
        ],
        [
            "max-connections",
            None,
            100,
            "SMTP sessions at once, e.g. --max-connections 200",
            _count("max-connections"),
        ],
        [
            "max-connections-per-client",
            None,
            20,
            "SMTP sessions at once from one client address, e.g. --max-connections-per-client 50",
            _count("max-connections-per-client"),
        ],
        [
            "idle-timeout",
            None,
            300.0,
            "close an SMTP session silent this long, e.g. --idle-timeout 60",
            _seconds("idle-timeout"),
        ],
        [
            "data-timeout",
            None,
            600.0,
            "the longest a message's DATA may take, e.g. --data-timeout 10m",
            _seconds("data-timeout"),
        ],
        [
            "shutdown-timeout",
            None,
            30.0,
            "on SIGTERM, how long deliveries in flight may take, e.g. --shutdown-timeout 60",
            _seconds("shutdown-timeout"),
        ],
    ]

    def postOptions(self) -> None:
        """Check the values together; the result is :attr:`config`."""
        self.config = config_from(self, os.environ)


def loopback_only(endpoint: str) -> bool:
    """Whether a server endpoint string listens on loopback only (or on a UNIX socket)."""
    parts = re.split(r"(?<!\\):", endpoint)
    kind = parts[0].lower()
    if kind == "unix":
        return True
    interface = next((p[10:] for p in parts[1:] if p.lower().startswith("interface=")), "")
    interface = interface.replace("\\:", ":").strip("[]")
    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:  # "" (every interface) or a name
        return False


def config_from(opts: Options, environ: os._Environ[str] | dict[str, str]) -> RelayConfig:
    """The :class:`RelayConfig` of parsed ``opts``; UsageError naming the option at fault."""
    url = opts["smtp"]
    if not url:
        raise usage.UsageError("--smtp URL is required (the upstream server)")
    try:
        if urlsplit(url).password is not None:
            raise usage.UsageError(
                "--smtp must not contain the password (other users can read the process list): "
                "set TWISTMAIL_SMTP_PASSWORD or use --password-file PATH"
            )
    except ValueError:
        pass  # parse_url below names the problem
    password = None
    if opts["password-file"]:
        try:
            password = Path(opts["password-file"]).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise usage.UsageError(f"--password-file: cannot read it ({e.strerror})") from None
    try:
        parse_url(url, password=password, environ=dict(environ))
    except ValueError as e:
        raise usage.UsageError(f"--smtp: {e}") from None
    try:
        parse_queue_url(opts["queue"])
    except ValueError as e:
        raise usage.UsageError(f"--queue: {e}") from None
    try:
        allow_from = parse_networks(opts["allow-from"])
    except ValueError as e:
        raise usage.UsageError(f"--allow-from: {e}") from None
    cert, key = opts["tls-cert"], opts["tls-key"]
    if bool(cert) != bool(key):
        raise usage.UsageError("--tls-cert and --tls-key go together: give both or neither")
    for name in ("tls-cert", "tls-key", "users-file", "ca-file", "api-token-file"):
        value = opts[name]
        if value and not os.path.isfile(value):
            raise usage.UsageError(f"--{name}: no such file {value!r}")
    if opts["max-retry-delay"] < opts["retry-delay"]:
        raise usage.UsageError("--max-retry-delay must be at least --retry-delay")
    if opts["max-connections-per-client"] > opts["max-connections"]:
        raise usage.UsageError("--max-connections-per-client must be at most --max-connections")
    dkim = _dkim_signer(opts["dkim"], opts["dkim-missing"])
    verp = _verp_signer(opts["bounce-domain"], opts["secret-file"])
    if opts["verp"] and verp is None:
        raise usage.UsageError("--verp needs --bounce-domain (where the bounces come back)")
    endpoints = {}
    for name in ("submission", "http", "public-http"):
        value = opts[name].strip()
        endpoints[name] = None if value.lower() == "none" else value
    unsubscribe_tokens = _unsubscribe_tokens(endpoints["public-http"], opts["secret-file"])
    unsubscribe = _unsubscribe(
        opts["unsubscribe-url"], opts["unsubscribe-mailto"], opts["secret-file"]
    )
    http = endpoints["http"]
    if http is not None and not opts["api-token-file"] and not loopback_only(http):
        raise usage.UsageError(
            f"--http {endpoints['http']} listens beyond loopback: give --api-token-file "
            "(see twistmail tokens add), or add interface=127.0.0.1"
        )
    return RelayConfig(
        smtp_url=url,
        password=password,
        ca_file=opts["ca-file"],
        insecure=bool(opts["insecure"]),
        queue_url=opts["queue"],
        lease=opts["lease"],
        submission=endpoints["submission"],
        http=endpoints["http"],
        concurrency=opts["concurrency"],
        rate=opts["rate"],
        per_domain=opts["per-domain"],
        retry_delay=opts["retry-delay"],
        max_retry_delay=opts["max-retry-delay"],
        max_attempts=opts["max-attempts"],
        max_age=opts["max-age"],
        hostname=opts["hostname"] or socket.getfqdn(),
        allow_from=allow_from,
        users_file=opts["users-file"],
        api_token_file=opts["api-token-file"],
        http_hosts=tuple(h.strip().lower() for h in opts["http-hosts"].split(",") if h.strip()),
        tls_cert=cert,
        tls_key=key,
        max_message_size=opts["max-message-size"],
        max_recipients=opts["max-recipients"],
        max_connections=opts["max-connections"],
        max_connections_per_client=opts["max-connections-per-client"],
        idle_timeout=opts["idle-timeout"],
        data_timeout=opts["data-timeout"],
        shutdown_timeout=opts["shutdown-timeout"],
        bounces=not opts["no-bounces"],
        dkim=dkim,
        verp=verp,
        verp_send=bool(opts["verp"]),
        public_http=endpoints["public-http"],
        unsubscribe_tokens=unsubscribe_tokens,
        unsubscribe=unsubscribe,
    )


def _verp_signer(domain: str | None, secret_file: str | None) -> VerpSigner | None:
    """The VERP signer of ``--bounce-domain`` (keys read now); UsageError naming the problem."""
    if not domain:
        return None
    if not secret_file:
        raise usage.UsageError("--bounce-domain needs --secret-file (the keys of the return paths)")
    from ..bounces.verp import VerpSigner, read_verp_keys

    try:
        return VerpSigner(read_verp_keys(secret_file), domain)
    except ValueError as e:
        raise usage.UsageError(f"--bounce-domain/--secret-file: {e}") from None


def _unsubscribe_tokens(public_http: str | None, secret_file: str | None) -> TokenBox | None:
    """The token keys of ``--secret-file`` (read now); UsageError naming what is wrong."""
    if public_http is None:
        return None
    if not secret_file:
        raise usage.UsageError("--public-http needs --secret-file (the unsubscribe token keys)")
    from ..unsubscribe.tokens import SecretError, TokenBox

    try:
        return TokenBox.from_file(secret_file)
    except SecretError as e:
        raise usage.UsageError(f"--secret-file: {e}") from None


def _unsubscribe(
    url: str | None, mailto: str | None, secret_file: str | None
) -> Unsubscribe | None:
    """The List-Unsubscribe headers of campaigns posted to the API (None: none); UsageError
    naming what is wrong, as ``twistmail send`` words it."""
    if url is None and mailto is None:
        return None
    from ..unsubscribe.headers import Unsubscribe, UnsubscribeError
    from ..unsubscribe.tokens import SecretError

    try:
        return Unsubscribe.from_options(url, mailto, secret_file)
    except (SecretError, UnsubscribeError) as e:
        raise usage.UsageError(str(e)) from None


def _dkim_signer(options: list[str], missing: str) -> DkimSigner | None:
    """The signer of the ``--dkim`` options (keys read now); UsageError naming what is wrong."""
    if missing not in ("send", "refuse"):
        raise usage.UsageError(f"--dkim-missing: expected send or refuse, got {missing!r}")
    if not options:
        return None
    from ..dkim import DkimKeyError, DkimSigner, parse_dkim_option

    try:
        keys = [parse_dkim_option(option) for option in options]
        return DkimSigner(keys, missing="refuse" if missing == "refuse" else "send")
    except DkimKeyError as e:
        raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> MultiService:
    """The relay: submission listener, HTTP listener and delivery worker over one queue.

    Refuses to start (exit status 1, one line on stderr) when another process already
    delivers from the same queue file (a SQLite queue has one deliverer; a PostgreSQL one any
    number).
    """
    from .. import _dispatch as dispatch
    from .._heap import settle
    from .logs import twistd_observer
    from .service import RelayService, StartError

    try:
        service = RelayService.make(options.config)
    except StartError as e:
        sys.exit(f"twistmail: {e}")
    service.log_observer = twistd_observer(getattr(options, "parent", None), service.reactor)
    dispatch.install(service.reactor)
    settle()
    return service
