"""The delivery options the ``send`` and ``drain`` commands share, and the Mailer they make."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._twisted import Reactor
from .mailer import Mailer

if TYPE_CHECKING:
    from .dkim import DkimSigner
    from .ratelimit import DomainLimiter, SharedDomainLimiter
    from .smtp._protocol import Throttle

__all__ = ["DeliveryOptions"]


@dataclass(kw_only=True)
class DeliveryOptions:
    """Where and how a command delivers: the SMTP server, security, pace and retry rules."""

    smtp_url: str
    password: str | None = None
    ca_file: str | None = None
    insecure: bool = False
    concurrency: int = 10
    rate: float | None = None
    max_attempts: int = 5
    retry_delay: float = 5.0
    timeout: float = 60.0
    server_patience: float = 60.0
    """Seconds of backoff, in a row, spent waiting for a server that cannot be reached."""
    dkim: DkimSigner | None = None
    """Signs every message (``--dkim``)."""

    def mailer(
        self,
        reactor: Reactor,
        throttle: Throttle | None = None,
        domain_limiter: DomainLimiter | SharedDomainLimiter | None = None,
    ) -> Mailer:
        """The Mailer the command's delivery loop drives (the loop keeps attempts and backoff).

        ``throttle`` paces it instead of a token bucket of ``rate`` (a rate shared by workers);
        ``domain_limiter`` caps the messages in flight per recipient domain.
        Raises ``ValueError`` or ``OSError`` for a bad URL or an unreadable ``ca_file``.
        """
        return Mailer(
            self.smtp_url,
            concurrency=self.concurrency,
            rate=self.rate,
            ca_file=self.ca_file,
            insecure=self.insecure,
            password=self.password,
            timeout=self.timeout,
            max_attempts=1,
            dkim=self.dkim,
            throttle=throttle,
            domain_limiter=domain_limiter,
            reactor=reactor,
        )
