"""What the relay was asked to do: the checked values of its options."""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .._twisted import Reactor
from ..mailer import Mailer
from ..retry import RetryPolicy

if TYPE_CHECKING:
    from ..bounces.verp import VerpSigner
    from ..dkim import DkimSigner
    from ..ratelimit import DomainLimiter, SharedDomainLimiter
    from ..smtp._protocol import Throttle
    from ..unsubscribe.headers import Unsubscribe
    from ..unsubscribe.tokens import TokenBox

__all__ = ["DAY", "RelayConfig"]

DAY: Final = 86400.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """Every setting of one relay (see ``twistd twistmail --help`` for each)."""

    smtp_url: str
    password: str | None = None
    ca_file: str | None = None
    insecure: bool = False
    queue_url: str = "sqlite:twistmail-queue.db"
    lease: float = 300.0
    submission: str | None = "tcp:2525:interface=127.0.0.1"
    http: str | None = "tcp:8025:interface=127.0.0.1"
    concurrency: int = 10
    rate: float | None = None
    per_domain: int | None = None
    retry_delay: float = 300.0
    max_retry_delay: float = 4000.0
    max_attempts: int | None = None
    max_age: float = 5 * DAY
    hostname: str = "localhost"
    allow_from: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    users_file: str | None = None
    api_token_file: str | None = None
    http_hosts: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 1000
    max_connections: int = 100
    max_connections_per_client: int = 20
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    shutdown_timeout: float = 30.0
    bounces: bool = True
    dkim: DkimSigner | None = None
    verp: VerpSigner | None = None
    """``--bounce-domain`` with the ``--secret-file`` keys: bounces to its return paths are
    accepted from anyone and consumed."""
    verp_send: bool = False
    """``--verp``: each recipient's message (a copy each, for a message with several) goes
    out from its own return path at ``verp``."""
    public_http: str | None = None
    """Where the one-click unsubscribe routes listen (no API token; behind TLS termination)."""
    unsubscribe_tokens: TokenBox | None = None
    """The keys of ``--secret-file`` that unsubscribe tokens are checked with."""
    unsubscribe: Unsubscribe | None = None
    """``--unsubscribe-url``/``--unsubscribe-mailto``: the ``List-Unsubscribe`` headers of
    the campaigns posted to the API."""

    def retry_policy(self) -> RetryPolicy:
        """Postfix's schedule by default: 300 s doubling to 4,000 s, no attempt limit."""
        return RetryPolicy(
            max_attempts=self.max_attempts or sys.maxsize,
            initial_delay=self.retry_delay,
            max_delay=self.max_retry_delay,
        )

    def mailer(
        self,
        reactor: Reactor,
        throttle: Throttle | None = None,
        domain_limiter: DomainLimiter | SharedDomainLimiter | None = None,
    ) -> Mailer:
        """The pooled sender to the upstream (the worker's loop keeps attempts), paced by
        ``throttle`` (``rate`` shared with other relays) or else by a token bucket of ``rate``."""
        return Mailer(
            self.smtp_url,
            concurrency=self.concurrency,
            rate=self.rate,
            per_domain=self.per_domain,
            ca_file=self.ca_file,
            insecure=self.insecure,
            password=self.password,
            max_attempts=1,
            dkim=self.dkim,
            throttle=throttle,
            domain_limiter=domain_limiter,
            reactor=reactor,
        )
