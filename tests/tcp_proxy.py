"""A TCP proxy on 127.0.0.1 that cuts its connections on cue: a network cut or a server
restart, seen from the client, for tests of reconnection."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.protocols import portforward


class _Server(portforward.ProxyServer):
    noisy = False
    clientProtocolFactory = None  # set below
    factory: CuttingProxy  # type: ignore[assignment]

    def connectionMade(self) -> None:
        if self.factory.refusing:
            self.transport.abortConnection()
            return
        self.factory.open.add(self)
        self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.open.discard(self)
        super().connectionLost(reason)


class _Client(portforward.ProxyClient):
    noisy = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
        super().connectionMade()


class _ClientFactory(portforward.ProxyClientFactory):
    protocol = _Client
    noisy = False


class CuttingProxy(portforward.ProxyFactory):
    """Forwards 127.0.0.1:``port`` (after :meth:`listen`) to ``host``:``port``."""

    protocol = _Server
    noisy = False

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.open: set[_Server] = set()
        self.refusing = False
        self.cuts = 0
        self._port: IListeningPort | None = None

    def listen(self) -> int:
        self._port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return int(self._port.getHost().port)

    def cut(self) -> int:
        """Abort every connection open now (both sides); returns how many."""
        cut = list(self.open)
        for server in cut:
            server.transport.abortConnection()
            if server.peer is not None:
                server.peer.transport.abortConnection()  # type: ignore[attr-defined]
        self.cuts += len(cut)
        return len(cut)

    async def stop(self) -> None:
        self.cut()
        if self._port is not None:
            await self._port.stopListening()


_Server.clientProtocolFactory = _ClientFactory  # type: ignore[assignment]
