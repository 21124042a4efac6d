"""An aiosmtpd server that misbehaves on cue, for end-to-end tests of the twistmail client.

aiosmtpd is an implementation independent of Twisted's, so it catches mistakes a same-library
peer would share. It runs in its own asyncio loop in a thread (aiosmtpd's ``Controller``), so it
never blocks the Twisted reactor in the main thread, and :meth:`CueServer.stop` tears it down
promptly even while clients are connected or the server is stalling on purpose.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = ["STALL_STEPS", "CueServer", "Received"]

STALL_STEPS = frozenset({"greeting", "EHLO", "MAIL", "RCPT", "DATA", "DOT"})
_STOP_TIMEOUT = 5.0


@dataclass
class Received:
    """One message as the server saw it."""

    sender: str  # "" for the null sender <>
    recipients: list[str]
    data: bytes  # exact bytes after dot-unstuffing, CRLF, without the final ".\r\n"
    mail_options: list[str]  # upper-cased by aiosmtpd, e.g. ["BODY=8BITMIME", "SMTPUTF8"]
    rcpt_options: list[str]
    connection: int  # index of the connection it came on (0 for the first)


class CueServer:
    """An SMTP server on 127.0.0.1 (port chosen by the OS) that misbehaves as told.

    Replies (full lines such as ``"451 4.2.1 mailbox busy"``):

    - ``rcpt_replies``: local part -> reply to every ``RCPT TO`` for it.
    - ``rcpt_replies_once``: the same, but only the first time the local part is seen.
    - ``mail_reply`` / ``data_reply``: reply to every ``MAIL FROM`` / final dot instead of 250.
      A refused message is recorded in :attr:`rejected`.
    - ``data_replies``: local part -> reply to the final dot of every message with a recipient
      of that local part (before ``data_reply``).

    Failures:

    - ``drop_after_data_count``: for the first N messages, close the connection after the final
      dot without replying; they go to :attr:`dropped`, not :attr:`received`.
    - ``stall_on``: one of :data:`STALL_STEPS`; never answer that step (``"EHLO"`` covers HELO,
      ``"DOT"`` is the final dot), keep the socket open until :meth:`stop`. A message stalled at
      its dot is recorded in :attr:`stalled` (its data has arrived, no reply will).
    - ``close_421_after``: once K messages were accepted on a connection, answer the next
      command with ``421 4.7.0 closing`` and close.
    - ``close_after``: close the connection right after the 250 of its Nth message, without
      421; later (pipelined) commands on it are never answered. Counted in :attr:`closed`.
    - ``max_connections``: with K sessions open, greet another one with
      ``421 4.7.0 too many connections`` and close it. Counted in :attr:`refused`.

    Extensions: ``auth`` (username -> password; AUTH PLAIN and LOGIN offered, MAIL/RCPT/DATA
    refused with 530 until authenticated), ``starttls_context`` (+ ``require_starttls``),
    ``implicit_tls_context`` (TLS from the first byte), ``smtputf8``, ``pipelining``,
    ``line_length_limit`` (aiosmtpd's 1001 by default). ``port``: bind this one, not a free one.
    8BITMIME and SIZE are always advertised by aiosmtpd.
    """

    def __init__(
        self,
        *,
        rcpt_replies: dict[str, str] | None = None,
        rcpt_replies_once: dict[str, str] | None = None,
        mail_reply: str | None = None,
        data_reply: str | None = None,
        data_replies: dict[str, str] | None = None,
        drop_after_data_count: int = 0,
        stall_on: str | None = None,
        close_421_after: int | None = None,
        close_after: int | None = None,
        max_connections: int | None = None,
        auth: dict[str, str] | None = None,
        starttls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        implicit_tls_context: ssl.SSLContext | None = None,
        smtputf8: bool = True,
        pipelining: bool = False,
        line_length_limit: int = 1001,
        port: int = 0,
        data_delay: float = 0.0,
    ) -> None:
        if stall_on is not None and stall_on not in STALL_STEPS:
            raise ValueError(f"stall_on must be one of {sorted(STALL_STEPS)}, not {stall_on!r}")
        self.rcpt_replies = dict(rcpt_replies or {})
        self.rcpt_replies_once = dict(rcpt_replies_once or {})
        self.mail_reply = mail_reply
        self.data_reply = data_reply
        self.data_replies = dict(data_replies or {})
        self.drop_after_data_count = drop_after_data_count
        self.stall_on = stall_on
        self.close_421_after = close_421_after
        self.close_after = close_after
        self.max_connections = max_connections
        self.auth = dict(auth) if auth is not None else None
        self.starttls_context = starttls_context
        self.require_starttls = require_starttls
        self.implicit_tls_context = implicit_tls_context
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.line_length_limit = line_length_limit

        self.host = "127.0.0.1"
        self.port = port
        self.received: list[Received] = []
        self.dropped: list[Received] = []
        self.rejected: list[Received] = []
        self.stalled: list[Received] = []
        self.stop_forced = False  # stop() had to give up waiting for a session to end
        self.connections = 0
        self.commands: list[str] = []
        self.closed = 0  # connections ended by close_after
        self.refused = 0  # connections refused by max_connections
        self.mail_times: list[float] = []  # time.time() of each MAIL FROM received
        self.data_delay = data_delay  # seconds before the reply to each final dot
        self.in_flight = 0  # transactions between their MAIL and their final dot's reply
        self.most_in_flight = 0

        self._seen_once: set[str] = set()
        self._sessions: set[_CueSMTP] = set()
        self._controller: _CueController | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None  # made inside the server's loop

    # Lifecycle.

    def start(self) -> None:
        """Bind 127.0.0.1 on a free port and serve in a thread; returns once listening."""
        if self._controller is not None:
            raise RuntimeError("CueServer already started")
        controller = _CueController(self)
        controller.start()
        self._controller = controller
        self._thread = controller._thread
        self.port = controller.port

    def stop(self) -> None:
        """Close every connection, stop the loop and join its thread."""
        controller, self._controller = self._controller, None
        if controller is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), controller.loop)
        # On timeout, Controller.stop() below cancels whatever is left.
        try:
            future.result(_STOP_TIMEOUT)
        except concurrent.futures.TimeoutError:
            self.stop_forced = True
        controller.stop()

    @property
    def running(self) -> bool:
        return self._controller is not None

    @property
    def thread_alive(self) -> bool:
        """Whether the server's thread still runs (False once stop() returned)."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> CueServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        assert self._stopping is not None
        handlers = []
        for session in list(self._sessions):
            # Abort first: connection_lost() then cancels the session before stalls wake up.
            if session.transport is not None:
                session.transport.abort()
            if session._handler_coroutine is not None:
                handlers.append(session._handler_coroutine)
        self._stopping.set()
        if handlers:
            done, pending = await asyncio.wait(handlers, timeout=_STOP_TIMEOUT)
            self.stop_forced = self.stop_forced or bool(pending)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: a reset connection is expected here

    async def _wait_until_stopped(self) -> None:
        assert self._stopping is not None
        await self._stopping.wait()

    # aiosmtpd hooks (run in the server's loop).

    async def handle_EHLO(
        self,
        server: _CueSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must do this itself
        if self.auth is None:
            responses = [line for line in responses if not line[4:].startswith("AUTH")]
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self,
        server: _CueSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self.mail_times.append(time.time())
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.mail_reply is not None and not self.mail_reply.startswith("2"):
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return self.mail_reply or "250 OK"

    async def handle_RCPT(
        self,
        server: _CueSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        local_part = address.rpartition("@")[0] if "@" in address else address
        reply = self.rcpt_replies.get(local_part)
        if reply is None and local_part not in self._seen_once:
            reply = self.rcpt_replies_once.get(local_part)
            if reply is not None:
                self._seen_once.add(local_part)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return reply or "250 OK"

    async def handle_DATA(self, server: _CueSMTP, session: Session, envelope: Envelope) -> str:
        assert envelope.original_content is not None
        message = Received(
            sender="" if envelope.mail_from in (None, "<>") else str(envelope.mail_from),
            recipients=list(envelope.rcpt_tos),
            data=envelope.original_content,
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            connection=server.index,
        )
        if self.stall_on == "DOT":
            self.stalled.append(message)
            await self._wait_until_stopped()
            return "421 4.3.2 shutting down"
        if len(self.dropped) < self.drop_after_data_count:
            self.dropped.append(message)
            assert server.transport is not None
            server.transport.close()
            # connection_lost() cancels this coroutine; no reply is ever sent.
            await self._wait_until_stopped()
            return "421 4.3.2 shutting down"
        data_reply = next(
            (
                self.data_replies[local]
                for local in (r.rpartition("@")[0] for r in message.recipients)
                if local in self.data_replies
            ),
            self.data_reply,
        )
        if data_reply is not None and not data_reply.startswith("2"):
            self.rejected.append(message)
            return data_reply
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        self.in_flight -= 1
        self.received.append(message)
        server.accepted += 1
        if self.close_after is not None and server.accepted >= self.close_after:
            # Closed once the 250 below is written; nothing after it is answered.
            server.closing = True
            self.closed += 1
            assert server.transport is not None
            asyncio.get_running_loop().call_soon(server.transport.close)
        return self.data_reply or "250 OK"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if self.auth is not None and isinstance(data, LoginPassword):
            username = data.login.decode("utf-8", "replace")
            expected = self.auth.get(username)
            if expected is not None and hmac.compare_digest(
                expected.encode("utf-8"), bytes(data.password)
            ):
                return AuthResult(success=True, auth_data=username)
        return AuthResult(success=False, handled=False)


_COMMANDS_NEEDING_AUTH = frozenset({"MAIL", "RCPT", "DATA"})
_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "HELO", "STARTTLS", "QUIT"})


class _CueSMTP(SMTP):
    """aiosmtpd's session, with every command dispatch passing through :meth:`_on_command`."""

    def __init__(self, cue: CueServer, **kwargs: Any) -> None:
        self.line_length_limit = cue.line_length_limit  # read by aiosmtpd's __init__
        super().__init__(cue, **kwargs)
        self.cue = cue
        self.index = -1
        self.accepted = 0  # messages accepted on this connection
        self.closing = False  # close_after: answer nothing more
        self._smtp_methods = {
            name: self._cued(name, method) for name, method in self._smtp_methods.items()
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.index < 0:  # called again after STARTTLS with the TLS transport
            self.index = self.cue.connections
            self.cue.connections += 1
            self.cue._sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.cue._sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        limit = self.cue.max_connections
        if limit is not None and len(self.cue._sessions) > limit:
            self.cue.refused += 1
            await self.push("421 4.7.0 too many connections")
            assert self.transport is not None
            self.transport.close()
            return
        if self.cue.stall_on == "greeting":
            await self.cue._wait_until_stopped()
            return
        await super()._handle_client()

    async def challenge_auth(self, *args: Any, **kwargs: Any) -> Any:
        response = await super().challenge_auth(*args, **kwargs)
        self.cue.commands.append("<redacted>")
        return response

    def _cued(
        self, name: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def on_command(arg: str | None) -> None:
            await self._on_command(name, arg, method)

        return on_command

    async def _on_command(
        self, name: str, arg: str | None, method: Callable[[str | None], Awaitable[None]]
    ) -> None:
        cue = self.cue
        if self.closing:
            return
        if name == "AUTH":
            cue.commands.append("AUTH <redacted>")
        else:
            cue.commands.append(f"{name} {arg}" if arg else name)
        if cue.close_421_after is not None and self.accepted >= cue.close_421_after:
            await self.push("421 4.7.0 closing")
            assert self.transport is not None
            self.transport.close()
            return
        if cue.stall_on == name or (cue.stall_on == "EHLO" and name == "HELO"):
            await cue._wait_until_stopped()
            return
        assert self.session is not None
        if cue.require_starttls and self._tls_protocol is None and name not in _BEFORE_STARTTLS:
            # aiosmtpd would refuse these before dispatch, where we could not record them.
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return
        needs_auth = cue.auth is not None and name in _COMMANDS_NEEDING_AUTH
        if needs_auth and not self.session.authenticated:
            await self.push("530 5.7.0 Authentication required")
            return
        await method(arg)


class _CueController(Controller):
    """aiosmtpd's threaded Controller, bound to port 0 with the real port read back."""

    def __init__(self, cue: CueServer) -> None:
        super().__init__(
            cue,
            hostname=cue.host,
            port=0,
            ssl_context=cue.implicit_tls_context,
            server_hostname="cue.test",
            enable_SMTPUTF8=cue.smtputf8,
            tls_context=cue.starttls_context,
            # We enforce AUTH ourselves: aiosmtpd's auth_required without TLS warns per session.
            auth_require_tls=False,
            authenticator=cue.authenticate if cue.auth is not None else None,
        )
        self.cue = cue

    def factory(self) -> _CueSMTP:
        return _CueSMTP(self.cue, **self.SMTP_kwargs)

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        return self._bind()

    async def _bind(self) -> asyncio.AbstractServer:
        self.cue._stopping = asyncio.Event()
        # Controller.start() normally checks factory() by connecting to the server; that would
        # count as a client connection (and hang on stall_on="greeting"), so check it here.
        self._factory_invoker()
        server = await self.loop.create_server(
            self._factory_invoker, host=self.hostname, port=self.cue.port, ssl=self.ssl_context
        )
        self.port = server.sockets[0].getsockname()[1]
        return server

    def _trigger_server(self) -> None:
        """factory() already ran in _bind()."""
