"""The relay's SMTP submission sessions, on Twisted's ESMTP server.

:class:`~twistmail.relay.listener.SubmissionFactory` makes one :class:`Submission` per
connection. A message is
answered ``250 2.0.0 Ok: queued as ID`` only once ``accept(envelope)`` fired, i.e. once the
queue committed (and fsync'd) it; a failed commit is answered 451 and nothing of it stays.

What a client may do is bounded: connections (in all, and per client address), the message
size (``SIZE``, enforced on the bytes whatever the client declared), recipients per message,
the length of a line, the idle time between commands and the time a message's DATA may take.
Without AUTH only clients in ``allow_from`` may submit (530 at ``MAIL``: no open relay). A
first line that looks like HTTP is dropped. A bare CR or LF inside DATA is refused (550
5.6.11), never forwarded.

Replies keep their order under PIPELINING: while a message's commit is pending, no further
command is read.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import tcp
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from ..address import Address
from .incoming import Incoming, LineTooLong, PathError, parse_path, received_header

__all__ = ["Submission"]

if TYPE_CHECKING:
    from .listener import SubmissionFactory

log = Logger()

# A first line an HTTP client would send (a browser tricked into talking to the port, or a
# cross-protocol attack): never answered as SMTP.
_HTTP = re.compile(
    rb"\A(?:(?:GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH|CONNECT|TRACE) \S|[A-Za-z-]+: )"
)
_COMMAND_LINE_MAX = 2048  # RFC 5321 allows 512; ESMTP parameters make it a bit longer
_DATA_LINE_MAX = 65536  # Twisted's line reader stops at 16 KB; real mail has longer lines
_WAITING_INPUT_MAX = 65536  # input kept while a reply is pending; then the socket is not read
# The commands handled by a method of Submission (or smtp.ESMTP) of this name.
_COMMANDS = {
    command: "do_" + command.decode()
    for command in (b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT")
}


class Submission(smtp.ESMTP):
    """One SMTP submission session (see the module's docstring)."""

    factory: SubmissionFactory
    transport: Any  # a TCP (or TLS) transport: ITransport lacks pause/abort/getHost
    noisy = False

    def __init__(self, factory: SubmissionFactory) -> None:
        super().__init__(chal=factory.challengers(), contextFactory=factory.tls)
        self.factory = factory
        config = factory.config
        self.host = factory.host
        self.timeout = config.idle_timeout  # type: ignore[assignment]  # float seconds
        self._buffer = b""
        self._waiting = False  # a reply is pending: read no further command
        self._paused = False  # the transport was paused too (too much input meanwhile)
        self._lines_seen = 0
        self._incoming: Incoming | None = None
        self._params_smtputf8 = False
        self._now = factory.clock.seconds
        # When the session is idle too long / its DATA took too long (None: not timed);
        # checked by the factory's periodic sweep (check_deadlines).
        self._idle_deadline: float | None = None
        self._data_deadline: float | None = None
        self._closing = False
        self._tls_started_here = False
        self._data_is_bounce = False
        self.client_ip = ""

    # ------------------------------------------------------------------ connection

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_ip = str(getattr(peer, "host", peer))
        refusal = self.factory.opened(self)
        if refusal is not None:
            self.sendLine(b"421 " + refusal.encode())
            self.transport.loseConnection()
            return
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_data_timer()
        self.factory.closed(self)
        super().connectionLost(reason)
        self._idle_deadline = None
        self.factory.unwatch(self)

    def sendCode(self, code: int, message: bytes = b"") -> None:
        if b"\n" in message or b"\r" in message:  # a multi-line reply (EHLO): one write
            *lines, last = message.splitlines() or [b""]
            reply = b"".join(b"%03d-%s\r\n" % (code, line) for line in lines)
            self._send(reply + b"%03d %s\r\n" % (code, last))
            return
        self._send(b"%03d %s\r\n" % (code, message))

    def _send(self, data: bytes) -> None:
        """Write a reply: on a plain TCP connection with nothing waiting to go out, straight to
        the socket (one syscall, instead of registering for writability and a reactor turn)."""
        transport = self.transport
        if (
            type(transport) is tcp.Server
            and not transport.TLS
            and transport.connected
            and not transport.disconnecting
            and not transport._aborting  # (an aborted connection says nothing more)
            and not transport._tempDataBuffer
            and len(transport.dataBuffer) == transport.offset
        ):
            try:
                sent = transport.socket.send(data)
            except OSError:  # EAGAIN, or a broken connection the reactor will report
                sent = 0
            data = data[sent:]
            if not data:
                return
        transport.write(data)

    def greeting(self) -> bytes:
        host: bytes = self.host
        return host + b" ESMTP twistmail"

    @property
    def busy(self) -> bool:
        """Whether a message is being received or committed (a stop lets it finish)."""
        return self._incoming is not None or self._waiting

    def shut_down(self) -> None:
        """The relay stops: 421 now, or once the message being received is answered."""
        self._closing = True
        if not self.busy:
            self._say_goodbye()

    def _say_goodbye(self) -> None:
        self.sendCode(421, self.host + b" 4.3.2 Service shutting down, try again later")
        self.transport.loseConnection()

    # Timeouts: deadlines checked by the factory's sweep, not a DelayedCall per session that
    # every line would reset (TimeoutMixin's API, as twisted.mail.smtp uses it).

    def setTimeout(self, period: float | None) -> float | None:
        previous: float | None = self.timeOut
        self.timeOut = period  # type: ignore[assignment]
        if period is None:
            self._idle_deadline = None
        else:
            self._idle_deadline = self._now() + period
            self.factory.watch(self)
        return previous

    def resetTimeout(self) -> None:
        if self._idle_deadline is not None:
            self._idle_deadline = self._now() + self.timeOut

    def check_deadlines(self, now: float) -> None:
        """Close the session (421) if its DATA took too long or it was idle too long."""
        if self._data_deadline is not None and now >= self._data_deadline:
            self._data_too_slow()
        elif self._idle_deadline is not None and now >= self._idle_deadline:
            self._idle_deadline = None
            self.timeoutConnection()

    def timeoutConnection(self) -> None:
        self.sendCode(421, b"4.4.2 " + self.host + b" Idle too long, closing the connection")
        self.transport.loseConnection()

    # ------------------------------------------------------------------ line reading

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._waiting:
            self._read_input()
        elif len(self._buffer) > _WAITING_INPUT_MAX and not self._paused:
            # Pipelined input beyond this waits in the kernel until the reply is sent.
            self._paused = True
            self.transport.pauseProducing()

    def _read_input(self) -> None:
        """Handle what was received: command lines, or a message's DATA as a whole."""
        while not self._waiting and not self.transport.disconnecting:
            incoming = self._incoming
            if incoming is None:
                self._read_lines()
                if self._incoming is None:
                    return
            elif not self._buffer:
                return
            else:
                data, self._buffer = self._buffer, b""
                self._read_data(incoming, data)

    def _read_data(self, incoming: Incoming, data: bytes) -> None:
        self.resetTimeout()
        try:
            used = incoming.feed(data)
        except LineTooLong:
            self._line_too_long()
            return
        if used is not None:
            self._buffer = data[used:]
            self._end_of_data(incoming)

    def _read_lines(self) -> None:
        """Command lines, up to the end of what was received or to a DATA command."""
        lines = self._buffer.split(b"\r\n")
        rest = lines.pop()
        if lines:
            self.resetTimeout()  # once for the complete lines of this read
        for i, line in enumerate(lines):
            if self._tls_started_here:
                break
            if self._waiting or self.transport.disconnecting or self._incoming is not None:
                self._buffer = b"\r\n".join([*lines[i:], rest])
                return
            if len(line) > _COMMAND_LINE_MAX:
                self._line_too_long()
                continue
            self.lineReceived(line)
        if self._tls_started_here:
            # What followed STARTTLS in the same plaintext read was sent before the
            # handshake: dropped, never run inside the TLS session (CVE-2011-0411).
            self._tls_started_here = False
            self._buffer = b""
            return
        self._buffer = rest
        if self._incoming is None and len(rest) > _COMMAND_LINE_MAX:
            self._buffer = b""
            self._line_too_long()

    def _line_too_long(self) -> None:
        if self._incoming is not None:
            # The rest of this message cannot be trusted to be framed as the client meant.
            self._incoming = None
            self._cancel_data_timer()
            self.sendCode(500, b"5.5.6 Line too long (the limit is 64 KB); closing")
        else:
            self.sendCode(500, b"5.5.2 Command line too long; closing")
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        self._lines_seen += 1
        if self._lines_seen == 1 and _HTTP.match(line):
            log.info("dropped a connection from {client} that spoke HTTP", client=self.client_ip)
            self.transport.abortConnection()
            return
        if self.mode == "COMMAND":
            # The usual commands straight to their handlers: what Twisted's state_COMMAND and
            # lookupMethod do for them, without building the method's name each time. The
            # idle timeout was reset for the lines of this read (_read_lines).
            parts = line.strip().split(None, 1)
            if parts:
                name = _COMMANDS.get(parts[0].upper())
                if name is not None:
                    getattr(self, name)(parts[1] if len(parts) == 2 else b"")
                    return
        super().lineReceived(line)

    def pause(self) -> None:
        """Read no further command until :meth:`resume` (a reply is pending)."""
        self._waiting = True

    def resume(self) -> None:
        """Reading goes on (the pending reply was sent)."""
        self._waiting = False
        if self.transport.disconnecting:
            return
        if self._closing and not self.busy:
            self._say_goodbye()
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._read_input()

    # ------------------------------------------------------------------ commands

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {
            b"SIZE": [str(self.factory.config.max_message_size).encode()],
            b"PIPELINING": None,
            b"8BITMIME": None,
            b"SMTPUTF8": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        if self.challengers and self._may_authenticate():
            ext[b"AUTH"] = list(self.challengers)
        return ext

    def _may_authenticate(self) -> bool:
        """AUTH only over TLS, or on a loopback listener: a password never crosses in clear."""
        return self.startedTLS or _is_loopback(getattr(self.transport.getHost(), "host", ""))

    def ext_STARTTLS(self, rest: bytes) -> None:
        was = self.startedTLS
        super().ext_STARTTLS(rest)
        if self.startedTLS and not was:
            # RFC 3207: the client starts again with EHLO; nothing said before counts.
            self._tls_started_here = True
            self._helo = None
            self._reset()

    def ext_AUTH(self, rest: bytes) -> None:
        if not self.challengers:
            self.sendCode(502, b"5.5.1 AUTH not available")
            return
        if not self._may_authenticate():
            self.sendCode(538, b"5.7.11 Encryption required: use STARTTLS first")
            return
        if self.factory.login_blocked(self.client_ip):
            self._too_many_failures()
            return
        super().ext_AUTH(rest)

    def _ebAuthenticated(self, reason: Failure) -> None:
        if not reason.check(UnauthorizedLogin):
            super()._ebAuthenticated(reason)
            return
        # Never the name or password in a log line: the address and the count only.
        self.factory.login_failed(self.client_ip)
        log.info("failed AUTH from {client}", client=self.client_ip)
        self.pause()  # the 535 comes after a delay, and nothing is read meanwhile

        def answer() -> None:
            if self.transport.disconnecting:
                return
            if self.factory.login_blocked(self.client_ip):
                self._too_many_failures()
                return
            self.sendCode(535, b"5.7.8 Authentication credentials invalid")
            self.resume()

        self.factory.clock.callLater(self.factory.auth_failure_delay, answer)

    def _too_many_failures(self) -> None:
        self.sendCode(421, b"4.7.0 Too many failed logins from your address, try again later")
        self.transport.loseConnection()

    def do_HELO(self, rest: bytes) -> None:
        self._reset()
        super().do_HELO(rest)

    def do_EHLO(self, rest: bytes) -> None:
        # What smtp.ESMTP.do_EHLO answers, with the extension lines made once per listener
        # for each combination of what they depend on (STARTTLS offered, AUTH offered).
        self._reset()
        peer = self.client_ip.encode("idna")
        self._helo = (rest, peer)
        offers = (
            bool(self.canStartTLS and not self.startedTLS),
            bool(self.challengers) and self._may_authenticate(),
        )
        extensions = self.factory.ehlo_extensions.get(offers)
        if extensions is None:
            lines = self.listExtensions().split(b"\n")
            extensions = b"".join(b"250-%s\r\n" % line for line in lines[:-1])
            extensions += b"250 %s\r\n" % lines[-1]
            self.factory.ehlo_extensions[offers] = extensions
        self._send(b"250-%s Hello %s, nice to meet you\r\n%s" % (self.host, peer, extensions))

    def do_RSET(self, rest: bytes) -> None:
        self._reset()
        self.sendCode(250, b"2.0.0 Ok")

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(250, b"2.0.0 Ok")

    def do_QUIT(self, rest: bytes) -> None:
        # The session no longer counts against the limits: the client may connect again as
        # soon as it has the 221, before this side has seen the connection close.
        self.factory.closed(self)
        self.sendCode(221, b"2.0.0 Bye")
        self.transport.loseConnection()

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.sendCode(502, b"5.5.2 Command not recognized")

    def _reset(self) -> None:
        self._from: Address | None = None
        self._to: list[Address] = []
        self._params_smtputf8 = False
        self._bounce: bool | None = None  # the recipients are --bounce-domain return paths

    def do_MAIL(self, rest: bytes) -> None:
        if self._closing:
            self._say_goodbye()
            return
        if self._from is not None:
            self.sendCode(503, b"5.5.1 Error: nested MAIL command")
            return
        if (
            not self.authenticated
            and self.factory.bounces is None  # with a bounce domain, RCPT decides
            and not self.factory.allowed(self.client_ip)
        ):
            self.sendCode(530, b"5.7.0 Authentication required")
            return
        try:
            sender, params = parse_path(rest, b"FROM", null_ok=True)
        except PathError as e:
            self.sendCode(e.code, e.text.encode("utf-8", "replace"))
            return
        limit = self.factory.config.max_message_size
        declared = params.pop("SIZE", None)
        if declared is not None:
            if not declared.isdigit():
                self.sendCode(501, b"5.5.4 Bad SIZE parameter")
                return
            if int(declared) > limit:
                self.sendCode(552, b"5.3.4 Message size exceeds fixed limit of %d" % limit)
                return
        body = params.pop("BODY", "7BIT")
        if (body or "").upper() not in ("7BIT", "8BITMIME"):
            self.sendCode(501, b"5.5.4 BODY must be 7BIT or 8BITMIME")
            return
        smtputf8 = "SMTPUTF8" in params
        params.pop("SMTPUTF8", None)
        params.pop("AUTH", None)
        if params:
            unknown = ", ".join(sorted(params)).encode("ascii", "replace")
            self.sendCode(555, b"5.5.4 Unsupported MAIL parameter: " + unknown)
            return
        self._from = sender
        self._to = []
        self._params_smtputf8 = smtputf8
        self.sendCode(250, b"2.1.0 Ok")

    def do_RCPT(self, rest: bytes) -> None:
        if self._from is None:
            self.sendCode(503, b"5.5.1 Error: need MAIL command")
            return
        try:
            recipient, params = parse_path(rest, b"TO", null_ok=False)
        except PathError as e:
            self.sendCode(e.code, e.text.encode("utf-8", "replace"))
            return
        if params:
            unknown = ", ".join(sorted(params)).encode("ascii", "replace")
            self.sendCode(555, b"5.5.4 Unsupported RCPT parameter: " + unknown)
            return
        if recipient.needs_smtputf8 and not self._params_smtputf8:
            self.sendCode(553, b"5.6.7 A non-ASCII address needs MAIL FROM:<...> SMTPUTF8")
            return
        if len(self._to) >= self.factory.config.max_recipients:
            self.sendCode(452, b"4.5.3 Error: too many recipients")
            return
        gate = self.factory.bounces
        if gate is not None:
            trusted = self.authenticated or self.factory.allowed(self.client_ip)
            bounce, refusal = gate.recipient(str(recipient), trusted=trusted, bounce=self._bounce)
            if refusal is not None:
                self.sendCode(refusal[0], refusal[1].encode())
                return
            self._bounce = bounce
        if recipient not in self._to:
            self._to.append(recipient)
        self.sendCode(250, b"2.1.5 Ok")

    def do_DATA(self, rest: bytes) -> None:
        if self._from is None:
            self.sendCode(503, b"5.5.1 Error: need MAIL command")
            return
        if not self._to:
            self.sendCode(554, b"5.5.1 Error: no valid recipients")
            return
        if rest.strip():
            self.sendCode(501, b"5.5.4 Syntax: DATA")
            return
        self._incoming = Incoming(
            self._from,
            self._to,
            self.factory.config.max_message_size,
            smtputf8=self._params_smtputf8 or self._from.needs_smtputf8,
            max_line=_DATA_LINE_MAX,
        )
        self._data_is_bounce = bool(self._bounce)
        self._reset()
        self._data_deadline = self._now() + self.factory.config.data_timeout
        self.factory.watch(self)
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _data_too_slow(self) -> None:
        self._data_deadline = self._idle_deadline = None  # one 421 is enough
        self._incoming = None
        self.sendCode(421, b"4.4.2 " + self.host + b" DATA took too long, closing")
        self.transport.loseConnection()

    def _cancel_data_timer(self) -> None:
        self._data_deadline = None

    def _end_of_data(self, incoming: Incoming) -> None:
        self._incoming = None
        self._cancel_data_timer()
        problem = incoming.problem()
        if problem is not None:
            code, text = problem
            log.info(
                "refused a message from {client}: {code} {text}",
                client=self.client_ip,
                code=code,
                text=text,
            )
            self.sendCode(code, text.encode())
            self._after_reply()
            return
        helo = (self._helo[0] or b"").decode("ascii", "replace") if self._helo else ""
        protocol = "ESMTP" + ("S" if self.startedTLS else "") + ("A" if self.authenticated else "")
        received = received_header(
            helo=helo,
            client_ip=self.client_ip,
            hostname=self.factory.config.hostname,
            protocol=protocol,
            recipients=tuple(incoming.recipients),
            now=self.factory.clock.seconds(),
        )
        envelope = incoming.envelope(received, self.factory.config.hostname)
        self.pause()
        if self._data_is_bounce and self.factory.bounces is not None:
            self.factory.bounces.consume(envelope).addCallbacks(
                self._consumed, self._not_queued
            ).addBoth(lambda _: self.resume())
            return
        self.factory.accept(envelope, self.client_ip).addCallbacks(
            self._queued, self._not_queued
        ).addBoth(lambda _: self.resume())

    def _queued(self, queue_id: int) -> None:
        self.sendCode(250, b"2.0.0 Ok: queued as %d" % queue_id)

    def _consumed(self, reply: str) -> None:
        self.sendCode(250, reply.encode())

    def _not_queued(self, failure: Failure) -> None:
        log.failure("could not queue a message from {client}", failure, client=self.client_ip)
        self.sendCode(451, b"4.3.0 Error: queue file write error, try again later")

    def _after_reply(self) -> None:
        if self._closing:
            self._say_goodbye()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
