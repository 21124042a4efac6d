"""The SMTP client protocol: Twisted's ESMTPClient for the handshake, a lean loop for mail.

``ESMTPClient`` does what it is good at — greeting, EHLO (with HELO fallback), STARTTLS and
AUTH. When it would start its first mail transaction (``smtpState_from``) the connection
switches to raw mode and a lean loop takes over, fed whole replies by
:class:`~twistmail.smtp._replies.ReplyReader`. Every command written is recorded in
a queue of expected replies, so replies are matched in order; the same loop serves servers
with and without RFC 2920 PIPELINING — only how many commands are written before waiting
differs. One connection carries any number of transactions.
"""

from __future__ import annotations

import contextlib
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from OpenSSL import SSL
from twisted.internet import defer, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.mail import smtp as tsmtp
from twisted.mail._cred import (
    CramMD5ClientAuthenticator,
    LOGINAuthenticator,
    PLAINAuthenticator,
)
from twisted.python.failure import Failure

from ..address import Address
from ..errors import (
    ConnectionLostError,
    DeliveryError,
    ExtensionRequiredError,
    PermanentError,
    SMTPTimeoutError,
    TLSError,
    TransientError,
)
from ..message import Envelope, reflatten_7bit
from ._failures import handshake_error, ssl_reason
from ._replies import MALFORMED, OVERLONG, ReplyReader
from ._transaction import Notify, RecipientReply, TransactionResult, _reply, _text, _Txn
from .esmtp import Capabilities, split_enhanced

__all__ = ["MailerProtocol", "Notify", "RecipientReply", "Throttle", "TransactionResult"]


class Throttle(Protocol):
    """Paces MAIL commands across connections (e.g. a :class:`~twistmail.ratelimit.TokenBucket`)."""

    def try_take(self) -> bool:
        """Take a token now if one is free and nobody waits for one."""

    def acquire(self) -> defer.Deferred[None]:
        """Fires once a token has been taken for the caller; cancelling gives the place up."""


# Kinds of expected reply.
_MAIL, _RCPT, _DATA, _DOT, _RSET, _QUIT = range(6)

_READ_SIZE = 4096
_IOV_MAX = 1024  # the most pieces one sendmsg takes (Linux)
_GATHER_FROM = 64 * 1024  # from this size, pieces are written as they are, not joined
# Slack when comparing a deadline with the clock, for float rounding of re-armed timers.
_EPSILON = 1e-6


def _without_getattr(cls: type) -> type:
    """A copy of ``cls`` (same bases, same attributes) without its ``__getattr__``."""
    skip = {"__getattr__", "__dict__", "__weakref__"}
    return type(cls.__name__, cls.__bases__, {k: v for k, v in vars(cls).items() if k not in skip})


# ESMTPClient defines __getattr__ (for an attribute deprecated since Twisted 13.0). Every
# attribute read on an instance of a class with __getattr__ goes through a hook CPython cannot
# specialize (three type lookups per read, more when its type cache collides): some 150 reads a
# message in the send loop. Our base is ESMTPClient's copy without it (it still inherits from
# SMTPClient; nothing here asks isinstance(..., ESMTPClient)).
if TYPE_CHECKING:
    _ESMTPClient = tsmtp.ESMTPClient
else:
    _ESMTPClient = _without_getattr(tsmtp.ESMTPClient)


class MailerProtocol(_ESMTPClient):
    """An ESMTP client connection that sends many messages, one transaction after another.

    :ivar ready: fires with this protocol once the session can take mail, or fails with a
        :class:`~twistmail.errors.DeliveryError` subclass.
    :ivar lost: fires (with ``None``) when the connection has closed, for whatever reason.
    """

    # Twisted's line log would keep "AUTH PLAIN <base64 secret>" and end up in error strings.
    debug = False
    # ESMTPClient overrides __setattr__ in Python for a deprecated attribute; the send loop sets
    # attributes on every reply, so use the fast built-in one.
    __setattr__ = object.__setattr__

    def __init__(
        self,
        *,
        host_label: str,
        clock: IReactorTime,
        identity: bytes,
        username: str | None = None,
        password: str | None = None,
        starttls_context: Any = None,
        require_tls: bool = False,
        reply_timeout: float = 60.0,
        data_timeout: float = 600.0,
        use_pipelining: bool = True,
    ) -> None:
        secret = password.encode("utf-8") if password is not None else None
        super().__init__(secret, starttls_context, identity)
        self.host_label = host_label
        self._clock = clock
        self.callLater = clock.callLater  # type: ignore[method-assign,assignment]
        self.timeout = reply_timeout  # type: ignore[assignment]  # TimeoutMixin, handshake phase
        self._reply_timeout = reply_timeout
        self._data_timeout = data_timeout
        self._use_pipelining = use_pipelining
        # Decided once EHLO is answered: whether envelope commands go out in groups.
        self._pipelining = False
        # The MAIL FROM path of the last sender, reused while the sender stays the same.
        self._sender_path: tuple[Address | None, bool, bytes] = (None, False, b"")
        self.requireTransportSecurity = require_tls
        self.requireAuthentication = username is not None
        if username is not None:
            user = username.encode("utf-8")
            # smtplib's order: challenge-response first, then the ones that send the secret.
            self.registerAuthenticator(CramMD5ClientAuthenticator(user))
            self.registerAuthenticator(PLAINAuthenticator(user))
            self.registerAuthenticator(LOGINAuthenticator(user))

        self.capabilities = Capabilities()
        self.ready: defer.Deferred[MailerProtocol] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.is_ready = False
        self.is_closed = False
        self._closing = False
        self._quit_requested = False
        self._close_error: DeliveryError | None = None

        self._replies = ReplyReader()
        self._out: list[bytes] = []
        self._expect: deque[tuple[int, _Txn | None, int]] = deque()
        self._waiting: deque[_Txn] = deque()
        self._envelope_txn: _Txn | None = None
        self._body_txn: _Txn | None = None
        # The transaction whose data the server is waiting for while its body is held back.
        self._held: _Txn | None = None
        self._need_rset = False
        self._watchdog: IDelayedCall | None = None
        self._last_progress = 0.0
        self._data_deadline: float | None = None
        self._receiving = False
        # The socket of a plain TCP transport, written to directly when its buffer is empty.
        self._socket: socket.socket | None = None
        # At most this many transactions on this connection, then QUIT (None: no limit).
        self.message_cap: int | None = None
        self.transactions_taken = 0
        """Transactions queued on this connection so far (see :attr:`message_cap`)."""
        self.transactions_done = 0
        """Transactions the server gave its final answer to on this connection."""
        self.closed_early = False
        """The server ended the session (a drop, or a 421) while transactions were unfinished."""
        # Paces MAIL commands: a token is taken right before each MAIL is written.
        self.throttle: Throttle | None = None
        self._token = False
        self._token_wait: defer.Deferred[None] | None = None

    # ------------------------------------------------------------------ handshake (ESMTPClient)

    def connectionMade(self) -> None:
        # Nagle + delayed ACK stalls every message's final "." by ~40 ms.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().connectionMade()

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        items: dict[bytes, bytes | None] = {}
        for line in resp.splitlines()[1:]:
            parts = line.split(None, 1)
            if parts:
                items[parts[0].upper()] = parts[1] if len(parts) > 1 else None
        self.capabilities = Capabilities.from_items(items)
        # Twisted looks keywords up case-sensitively; give it the upper-cased ones.
        self.tryTLS(code, resp, items)

    def smtpState_from(self, code: int, resp: bytes) -> None:
        """Called by ESMTPClient when the session is ready for its first transaction."""
        if self.is_ready:  # pragma: no cover - the lean loop never hands back to SMTPClient
            return
        self.setTimeout(None)
        self._pipelining = self._use_pipelining and self.capabilities.pipelining
        transport = self.transport
        if isinstance(transport, tcp.Connection) and not transport.TLS:
            self._socket = transport.socket
            # Replies are short: reading into a 64 KiB buffer per recv() only costs allocation.
            transport.bufferSize = _READ_SIZE
        self.is_ready = True
        self.setRawMode()
        # From here on every byte goes to rawDataReceived: skip LineReceiver's dispatch.
        self.dataReceived = self.rawDataReceived  # type: ignore[method-assign]
        self.ready.callback(self)

    def timeoutConnection(self) -> None:
        self._abort(
            SMTPTimeoutError(
                f"no reply within {self._reply_timeout:g}s during the session setup",
                host=self.host_label,
            )
        )

    def sendError(self, exc: Exception) -> None:
        """Translate ESMTPClient's handshake errors into ours (dropping its line log)."""
        self._abort(self._translate_handshake_error(exc))

    def _translate_handshake_error(self, exc: Exception) -> DeliveryError:
        return handshake_error(exc, self.host_label, self.capabilities.auth)

    # ------------------------------------------------------------------ public send API

    def send(self, envelope: Envelope) -> defer.Deferred[TransactionResult]:
        """Queue one transaction; fires with the per-recipient replies.

        Fails with a :class:`~twistmail.errors.DeliveryError` when the connection breaks
        before the final reply, or when the server lacks an extension the message needs.
        """
        if not self.usable:
            return defer.fail(self._unusable())
        txn = _Txn(envelope)
        txn.canceller = self._cancel_txn
        self._queue(txn)
        assert txn.deferred is not None
        return txn.deferred

    def submit(
        self,
        envelope: Envelope,
        notify: Notify,
        context: Any,
        *,
        ready: Callable[[Any], None] | None = None,
    ) -> _Txn:
        """Queue one transaction without a Deferred: ``notify(context, result, error)`` ends it.

        ``notify`` gets either the per-recipient replies or the
        :class:`~twistmail.errors.DeliveryError` that :meth:`send` would fail with (it may be
        called before this returns). The returned handle can be passed to :meth:`cancel`.

        With ``ready``, the message's body is held back when the server asks for it:
        ``ready(context)`` is called, and the body (and anything queued after it) goes out
        only on :meth:`release_body`. A caller that must record each outcome before another
        message can be delivered uses this to keep the next envelope pipelined meanwhile.
        """
        txn = _Txn(envelope, notify, context, ready)
        if not self.usable:
            txn.fail(self._unusable())
            return txn
        self._queue(txn)
        return txn

    def release_body(self, txn: _Txn) -> None:
        """Send the body held back for ``txn`` (see :meth:`submit`); nothing if it is not held."""
        if self._held is not txn or self.is_closed:
            return
        self._held = None
        self._write_body(txn)
        self._pump()
        if not self._receiving:
            self._flush()

    def cancel(self, txn: _Txn) -> None:
        """Give up on a transaction from :meth:`submit`; its ``notify`` may still be called."""
        if not txn.settled:
            self._cancel_txn(txn)

    def _unusable(self) -> ConnectionLostError:
        return ConnectionLostError(
            "connection is not usable for sending", host=self.host_label, attempted=False
        )

    def set_message_cap(self, cap: int | None) -> None:
        """Carry at most ``cap`` transactions in all on this connection, then QUIT."""
        self.message_cap = cap
        if cap is not None and self.transactions_taken >= cap and not self._closing:
            self._end_after_queued()

    def _end_after_queued(self) -> None:
        """Take no more transactions; QUIT once the queued ones are done."""
        self._quit_requested = True
        self._closing = True
        if self.is_ready and self.busy == 0 and not self._expect and not self.is_closed:
            self._send_quit()

    def _queue(self, txn: _Txn) -> None:
        self._waiting.append(txn)
        taken = self.transactions_taken = self.transactions_taken + 1
        cap = self.message_cap
        if cap is not None and taken >= cap:
            self._quit_requested = True
            self._closing = True
        self._pump()
        if not self._receiving:
            self._flush()

    @property
    def usable(self) -> bool:
        """The session is set up and not closing: it can take another transaction."""
        return self.is_ready and not self._closing and not self.is_closed

    @property
    def busy(self) -> int:
        """Number of transactions queued or in progress on this connection."""
        n = len(self._waiting)
        if self._envelope_txn is not None:
            n += 1
        if self._body_txn is not None:
            n += 1
        return n

    def quit(self) -> defer.Deferred[None]:
        """Say QUIT once queued work is done and wait for the connection to close."""
        if self.is_closed:
            return defer.succeed(None)
        if not self._quit_requested and self._close_error is None:
            self._quit_requested = True
            self._closing = True
            if self.busy == 0:
                self._send_quit()
        d: defer.Deferred[None] = defer.Deferred()
        self.lost.addBoth(lambda _: d.callback(None))
        return d

    def abort(self, error: DeliveryError | None = None) -> None:
        """Drop the connection now; queued transactions fail with ``error``."""
        self._abort(
            error or ConnectionLostError("connection closed by the client", host=self.host_label)
        )

    # ------------------------------------------------------------------ the send loop

    def _pump(self) -> None:
        """Start the next waiting transaction if the connection can take it now."""
        if self._held is not None:
            return  # the server is waiting for data: nothing else may be written before it
        while self._waiting and self._envelope_txn is None:
            if self._body_txn is not None and not self._pipelining:
                return
            if self.throttle is not None and not self._token and not self._wait_for_token():
                return
            txn = self._waiting.popleft()
            if not self._start(txn):
                continue
            return
        if not self._expect and self._data_deadline is None and self._watchdog is not None:
            self._stop_watchdog()  # nothing outstanding: the connection is idle
        if (
            self._quit_requested
            and self.busy == 0
            and not self._expect
            and self._close_error is None
            and not self.is_closed
        ):
            self._send_quit()

    def _wait_for_token(self) -> bool:
        """Take a token for the next MAIL now (True), or ask to be woken when one is ours."""
        throttle = self.throttle
        assert throttle is not None
        if self._token_wait is not None:
            return False
        if throttle.try_take():
            self._token = True
            return True
        wait = self._token_wait = throttle.acquire()
        wait.addCallbacks(self._token_granted, _ignore_cancel)
        return False

    def _token_granted(self, _: None) -> None:
        self._token_wait = None
        if self.is_closed:
            return
        self._token = True
        self._pump()
        if not self._receiving:
            self._flush()

    def _start(self, txn: _Txn) -> bool:
        """Write (or queue) the envelope commands of ``txn``; False if it failed locally."""
        env = txn.envelope
        caps = self.capabilities
        if env.smtputf8 and not caps.smtputf8:
            txn.fail(
                ExtensionRequiredError(
                    "the message needs SMTPUTF8 (a non-ASCII address or header) "
                    "and the server does not offer it",
                    host=self.host_label,
                    attempted=False,
                )
            )
            return False
        if env.eight_bit and not caps.eight_bit_mime:
            downgraded = reflatten_7bit(env)
            if downgraded is None:
                txn.fail(
                    ExtensionRequiredError(
                        "the message has 8-bit content and the server does not offer 8BITMIME",
                        host=self.host_label,
                        attempted=False,
                    )
                )
                return False
            txn.envelope = env = downgraded
        if caps.size is not None and env.size > caps.size:
            txn.fail(
                PermanentError(
                    f"the message is {env.size} octets and the server takes at most {caps.size}",
                    code=552,
                    host=self.host_label,
                    attempted=False,
                )
            )
            return False

        txn.started = True
        self._token = False
        self._envelope_txn = txn
        utf8 = env.smtputf8
        params = b""
        if caps.size is not None:
            params += b" SIZE=%d" % env.size
        if env.eight_bit and caps.eight_bit_mime:
            params += b" BODY=8BITMIME"
        if utf8:
            params += b" SMTPUTF8"
        last_sender, last_utf8, sender_path = self._sender_path
        if utf8 != last_utf8 or (env.sender is not last_sender and env.sender != last_sender):
            sender_path = env.sender.smtp_path(utf8=utf8)
            self._sender_path = (env.sender, utf8, sender_path)
        mail = b"MAIL FROM:<" + sender_path + b">" + params + b"\r\n"
        if self._pipelining:
            # The whole envelope goes out in one group (RFC 2920), DATA last.
            expect = self._expect
            if not expect:
                self._arm_reply_timer()
            out = self._out
            if self._need_rset:
                self._need_rset = False
                expect.append((_RSET, None, 0))
                out.append(b"RSET\r\n")
            expect.append((_MAIL, txn, 0))
            out.append(mail)
            for i, rcpt in enumerate(env.recipients):
                expect.append((_RCPT, txn, i))
                out.append(b"RCPT TO:<" + rcpt.smtp_path(utf8=utf8) + b">\r\n")
            expect.append((_DATA, txn, 0))
            out.append(b"DATA\r\n")
            return True
        commands = txn.pending = deque()
        if self._need_rset:
            self._need_rset = False
            commands.append((_RSET, 0, b"RSET\r\n"))
        commands.append((_MAIL, 0, mail))
        for i, rcpt in enumerate(env.recipients):
            commands.append((_RCPT, i, b"RCPT TO:<" + rcpt.smtp_path(utf8=utf8) + b">\r\n"))
        commands.append((_DATA, 0, b"DATA\r\n"))
        self._issue(txn)
        return True

    def _issue(self, txn: _Txn) -> None:
        """Without PIPELINING, write the transaction's next command (if any is left)."""
        pending = txn.pending
        if pending:
            kind, idx, line = pending.popleft()
            if kind == _DATA and txn.accepted == 0:
                # Every RCPT was refused: no DATA, and the open transaction needs RSET.
                self._envelope_txn = None
                self._need_rset = True
                self._finish(txn, 554, b"no valid recipients")
                return
            self._command(kind, txn, idx, line)

    def _command(self, kind: int, txn: _Txn | None, idx: int, line: bytes) -> None:
        if not self._expect:
            self._arm_reply_timer()
        self._expect.append((kind, txn, idx))
        self._out.append(line)

    def _flush(self) -> None:
        out = self._out
        transport = self.transport
        if not out or transport is None or self.is_closed:
            return
        self._out = []
        # Pieces are joined for one write, unless they are large (a message with an
        # attachment): those go in one gathering write, not copied to be joined.
        data = out[0] if len(out) == 1 else None
        if data is None and sum(map(len, out)) < _GATHER_FROM:
            data = b"".join(out)
        sock = self._socket
        if (
            sock is not None
            and not transport.dataBuffer  # type: ignore[attr-defined]
            and not transport._tempDataLen  # type: ignore[attr-defined]
            and not transport.disconnecting  # type: ignore[attr-defined]
        ):
            # Nothing is buffered in the transport, so sending now keeps the order and saves
            # the reactor a writer registration, a poll wake-up and a deregistration per write.
            try:
                sent = sock.send(data) if data is not None else sock.sendmsg(out[:_IOV_MAX])
            except OSError:
                sent = 0  # would block, or broken: the transport's own write finds out which
            if data is not None:
                if sent == len(data):
                    return
                data = data[sent:]
            else:
                out = unsent(out, sent)
                if not out:
                    return
        if data is not None:
            transport.write(data)
        else:
            transport.writeSequence(out)

    def rawDataReceived(self, data: bytes) -> None:
        if self._expect:
            self._last_progress = self._clock.seconds()  # any bytes count as progress
        replies = self._replies.feed(data)
        on_reply = self._on_reply
        expect = self._expect
        pipelined = self._pipelining
        # Transactions started by callbacks fired from here go out in one write, at the end.
        self._receiving = True
        try:
            for code, text in replies:
                if code == 250 and pipelined and expect:
                    # An accepted MAIL or RCPT of a pipelined group only needs counting.
                    kind, txn, _ = expect[0]
                    if kind == _RCPT:
                        expect.popleft()
                        txn.accepted += 1  # type: ignore[union-attr]
                        continue
                    if kind == _MAIL:
                        expect.popleft()
                        continue
                elif code <= MALFORMED:
                    self._unreadable(code, text)
                    return
                on_reply(code, text)
                if self._closing and (self._close_error is not None or self.is_closed):
                    return
        finally:
            self._receiving = False
        self._flush()

    def _unreadable(self, code: int, text: bytes) -> None:
        """Abort on a reply line the reader could not frame (see :mod:`._replies`)."""
        if code == OVERLONG:
            self._abort(TransientError("server reply line too long", host=self.host_label))
        else:
            self._abort(
                TransientError(f"malformed reply from server: {text!r}", host=self.host_label)
            )

    def _on_reply(self, code: int, raw: bytes) -> None:
        if not self._expect:
            if code == 421:
                self._abort(
                    TransientError(
                        "the server is closing the connection",
                        code=421,
                        response=_text(raw),
                        host=self.host_label,
                    ),
                    graceful=True,
                )
                return
            self._abort(
                TransientError(f"unexpected reply {code} from server", host=self.host_label)
            )
            return
        kind, txn, idx = self._expect.popleft()

        if code == 421 and kind != _QUIT:
            # The server is shutting this session down: what is unanswered goes elsewhere.
            enhanced, text = split_enhanced(
                _text(raw), code, self.capabilities.enhanced_status_codes
            )
            self._abort(
                TransientError(
                    "the server is closing the connection",
                    code=421,
                    enhanced=enhanced,
                    response=text,
                    host=self.host_label,
                ),
                graceful=True,
            )
            return

        if kind == _DOT:
            assert txn is not None
            self._cancel_data_timer()
            self._body_txn = None
            self._finish(txn, code, raw)
        elif kind == _RCPT:
            assert txn is not None
            txn.rcpt_replies[idx] = (code, raw)
            if 200 <= code < 300:
                txn.accepted += 1
            self._issue(txn)
        elif kind == _MAIL:
            assert txn is not None
            if not 200 <= code < 300:
                txn.mail_failed = _reply(code, raw)
                if not self._pipelining:
                    # Nothing more of this transaction goes out; no transaction is open.
                    if txn.pending is not None:
                        txn.pending.clear()
                    self._envelope_txn = None
                    self._finish(txn, code, raw)
                    return
            self._issue(txn)
        elif kind == _DATA:
            assert txn is not None
            self._envelope_txn = None
            if code == 354:
                self._body_txn = txn
                if txn.ready is not None and txn.accepted and txn.mail_failed is None:
                    self._held = txn
                    txn.ready(txn.context)  # may call release_body at once
                    return
                self._write_body(txn)
            else:
                self._need_rset = True
                txn.data_failed = _reply(code, raw)
                self._finish(txn, code, raw)
        elif kind == _RSET:
            if txn is not None:
                self._issue(txn)  # without PIPELINING, MAIL waits for the RSET reply
        elif kind == _QUIT:
            if self.transport is not None:
                self.transport.loseConnection()
            return
        self._pump()

    def _write_body(self, txn: _Txn) -> None:
        if txn.accepted and txn.mail_failed is None:
            self._out.append(txn.envelope.payload)
        else:
            # A server that says 354 with no accepted recipient gets an empty message.
            txn.data_failed = txn.data_failed or (554, "no valid recipients")
            self._out.append(b".\r\n")
        self._command(_DOT, txn, 0, b"")
        self._arm_data_timer()

    def _finish(self, txn: _Txn, code: int, raw: bytes) -> None:
        """Fire the transaction's Deferred with each recipient's final reply."""
        self.transactions_done += 1
        recipients = txn.envelope.recipients
        if (
            200 <= code < 300
            and txn.accepted == len(recipients)
            and txn.data_failed is None
            and txn.mail_failed is None
        ):
            advertised = self.capabilities.enhanced_status_codes
            txn.succeed(TransactionResult._taken(recipients, code, raw, advertised))
            return
        final = _reply(code, raw)
        if txn.data_failed is not None:
            final = txn.data_failed
        if txn.mail_failed is not None:
            final = txn.mail_failed
            self._need_rset = True
        advertised = self.capabilities.enhanced_status_codes
        final_code = final[0]
        final_enhanced, final_text = split_enhanced(final[1], final_code, advertised)
        mail_failed = txn.mail_failed is not None
        # The final reply is one recipient's own only when it was the one accepted (and the
        # MAIL FROM was): otherwise it answers the whole transaction (RecipientReply.shared).
        shared = mail_failed or txn.accepted != 1
        if txn.accepted == len(recipients) and not mail_failed:
            # Every RCPT was accepted: each recipient's fate is the final reply.
            replies = [
                RecipientReply(rcpt, final_code, final_enhanced, final_text, shared)
                for rcpt in recipients
            ]
            accepted_all = 200 <= final_code < 300
        else:
            accepted_all = False
            replies = []
            for rcpt, rr in zip(recipients, txn.rcpt_replies, strict=True):
                if mail_failed or rr is None or 200 <= rr[0] < 300:
                    replies.append(
                        RecipientReply(rcpt, final_code, final_enhanced, final_text, shared)
                    )
                else:
                    enhanced, text = split_enhanced(_text(rr[1]), rr[0], advertised)
                    replies.append(RecipientReply(rcpt, rr[0], enhanced, text))
        txn.succeed(
            TransactionResult(replies, final_code, final_enhanced, final_text, accepted_all)
        )

    def _send_quit(self) -> None:
        self._quit_requested = True
        self._closing = True
        self._command(_QUIT, None, 0, b"QUIT\r\n")
        self._flush()

    # ------------------------------------------------------------------ timers

    # One watchdog per connection, re-armed lazily: progress only records a time, so a busy
    # connection does not create and cancel a timer per command.

    def _arm_reply_timer(self) -> None:
        now = self._last_progress = self._clock.seconds()
        self._watch_by(now, self._reply_timeout)

    def _arm_data_timer(self) -> None:
        now = self._clock.seconds()
        self._data_deadline = now + self._data_timeout
        self._watch_by(now, self._data_timeout)

    def _watch_by(self, now: float, delay: float) -> None:
        """Make sure the watchdog wakes up within ``delay`` seconds of ``now``."""
        watchdog = self._watchdog
        if watchdog is None:
            self._watchdog = self._clock.callLater(delay, self._watch)
        elif watchdog.getTime() > now + delay:
            watchdog.reset(delay)

    def _cancel_data_timer(self) -> None:
        self._data_deadline = None

    def _stop_watchdog(self) -> None:
        watchdog = self._watchdog
        if watchdog is not None:
            self._watchdog = None
            if watchdog.active():
                watchdog.cancel()

    def _watch(self) -> None:
        """Time out a silent server or an overlong DATA phase; else sleep until the next due."""
        self._watchdog = None
        now = self._clock.seconds()
        due: list[float] = []
        if self._expect:
            reply_due = self._last_progress + self._reply_timeout
            if now >= reply_due - _EPSILON:
                self._reply_timed_out()
                return
            due.append(reply_due)
        if self._data_deadline is not None:
            if now >= self._data_deadline - _EPSILON:
                self._data_timed_out()
                return
            due.append(self._data_deadline)
        if due:
            self._watchdog = self._clock.callLater(min(due) - now, self._watch)

    def _reply_timed_out(self) -> None:
        kind = self._expect[0][0] if self._expect else -1
        what = {
            _MAIL: "MAIL",
            _RCPT: "RCPT",
            _DATA: "DATA",
            _DOT: "the end of data",
            _RSET: "RSET",
            _QUIT: "QUIT",
        }.get(kind, "a command")
        self._abort(
            SMTPTimeoutError(
                f"no reply to {what} within {self._reply_timeout:g}s", host=self.host_label
            )
        )

    def _data_timed_out(self) -> None:
        self._data_deadline = None
        self._abort(
            SMTPTimeoutError(
                f"the DATA phase took longer than {self._data_timeout:g}s", host=self.host_label
            )
        )

    # ------------------------------------------------------------------ teardown

    def _cancel_txn(self, txn: _Txn) -> None:
        if not txn.started:
            with contextlib.suppress(ValueError):
                self._waiting.remove(txn)
            return
        # Half-sent transactions cannot be taken back: drop the connection (the server
        # discards an unfinished transaction).
        self._abort(ConnectionLostError("transaction cancelled", host=self.host_label))

    def _abort(self, error: DeliveryError, *, graceful: bool = False) -> None:
        if self._close_error is None:
            self._close_error = error
        self._closing = True
        transport = self.transport
        if transport is None or self.is_closed:
            return
        if graceful:
            transport.loseConnection()
        else:
            transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        super().connectionLost(reason)
        self.is_closed = True
        self._closing = True
        self._data_deadline = None
        self._stop_watchdog()
        if self._token_wait is not None:
            wait, self._token_wait = self._token_wait, None
            wait.cancel()
        close_error = self._close_error
        error = close_error or self._lost_error(reason)
        txns: list[_Txn] = []
        if self._body_txn is not None:
            txns.append(self._body_txn)
        if self._envelope_txn is not None:
            txns.append(self._envelope_txn)
        txns.extend(self._waiting)
        self._body_txn = self._envelope_txn = self._held = None
        self._waiting.clear()
        self._expect.clear()
        unfinished = [txn for txn in txns if not txn.settled]
        # A drop by the server (no QUIT, no abort of ours) or its 421, with work outstanding.
        self.closed_early = bool(unfinished) and (close_error is None or close_error.code == 421)
        for txn in unfinished:
            if _mail_written(txn):
                txn.fail(error)
            else:
                txn.fail(
                    ConnectionLostError(
                        "connection closed before sending", host=self.host_label, attempted=False
                    )
                )
        if not self.ready.called:
            error.attempted = False  # no transaction is queued before the session is ready
            self.ready.errback(error)
        self.lost.callback(None)

    def _lost_error(self, reason: Failure) -> DeliveryError:
        if reason.check(SSL.Error):
            return TLSError(
                f"TLS handshake failed (certificate verification?): {ssl_reason(reason)}",
                host=self.host_label,
            )
        if self._body_txn is not None:
            return ConnectionLostError(
                "connection lost after the message data was sent, before the server replied",
                host=self.host_label,
            )
        if self.is_ready:
            return ConnectionLostError("connection lost", host=self.host_label)
        return ConnectionLostError("connection lost during session setup", host=self.host_label)


def _mail_written(txn: _Txn) -> bool:
    """Whether the MAIL command of ``txn`` has been written (the server may have seen it)."""
    if not txn.started:
        return False
    pending = txn.pending  # without PIPELINING, commands not yet written
    return not pending or pending[0][0] not in (_RSET, _MAIL)


def _ignore_cancel(reason: Failure) -> None:
    reason.trap(defer.CancelledError)


def unsent(pieces: list[bytes], sent: int) -> list[bytes]:
    """What is left of ``pieces`` once their first ``sent`` bytes are written (empty: all)."""
    for index, piece in enumerate(pieces):
        if sent < len(piece):
            rest = pieces[index:]
            if sent:
                rest[0] = piece[sent:]
            return rest
        sent -= len(piece)
    return []
