"""Shared fixtures: TLS material from trustme, real SMTP servers on 127.0.0.1, leak checks.

pytest-twisted runs the default reactor in a greenlet; write reactor-using tests with
``@pytest_twisted.inlineCallbacks`` or ``@pytest_twisted.ensureDeferred``.
"""

from __future__ import annotations

import importlib.util
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import defer, task
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    optionsForClientTLS,
)

if importlib.util.find_spec("twistmail") is None:  # pragma: no cover - not installed with -e
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# tests/ itself is on sys.path (pytest's rootdir-conftest rule), hence "servers".
from servers import CueServer

from twistmail.testing import CaptureServer


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# Leak checks ---------------------------------------------------------------------------------


def _spin_reactor() -> None:
    """Let the reactor run two iterations, so closes already under way can finish."""
    for _ in range(2):
        pytest_twisted.blockon(task.deferLater(_reactor(), 0, lambda: None))


@pytest.fixture(autouse=True)
def _no_reactor_leftovers() -> Iterator[None]:
    """Fail a test that leaves new delayed calls or open sockets in the global reactor.

    Autouse fixtures are set up first, so this teardown runs after the test's own fixtures
    (servers, clients) have been torn down. Things that existed before the test are ignored.
    """
    reactor = _reactor()
    calls_before = set(reactor.getDelayedCalls())
    selectables_before = set(reactor.getReaders()) | set(reactor.getWriters())
    threads_before = set(threading.enumerate())

    def leftovers() -> tuple[list[Any], list[Any]]:
        calls = [c for c in reactor.getDelayedCalls() if c.active() and c not in calls_before]
        selectables = set(reactor.getReaders()) | set(reactor.getWriters())
        # The reactor adds its own wakers (signals, threads) when it first runs.
        internal = set(getattr(reactor, "_internalReaders", ()))
        return calls, [s for s in selectables - internal if s not in selectables_before]

    yield
    calls, sockets = leftovers()
    if calls or sockets:
        _spin_reactor()
        calls, sockets = leftovers()
    problems = [f"pending delayed call: {call}" for call in calls]
    for call in calls:
        call.cancel()  # so they do not go off during the next test
    problems += [f"open socket: {selectable!r}" for selectable in sockets]
    problems += [
        f"thread left running: {thread.name}"
        for thread in threading.enumerate()
        if thread.name.startswith("twistmail-dkim") and thread not in threads_before
    ]
    if problems:
        pytest.fail("test left reactor state behind:\n  " + "\n  ".join(problems))


# TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(tls_ca: trustme.CA) -> trustme.LeafCert:
    """A server certificate for "localhost" and "127.0.0.1", issued by ``tls_ca``."""
    return tls_ca.issue_cert("localhost", "127.0.0.1")


@pytest.fixture(scope="session")
def ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the CA certificate (PEM), for clients that take a CA file."""
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def server_ssl_context(server_cert: trustme.LeafCert) -> ssl.SSLContext:
    """A stdlib server context (for aiosmtpd / CueServer)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    return context


@pytest.fixture
def client_ssl_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """A stdlib client context trusting only ``tls_ca`` (for smtplib in tests)."""
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)
    return context


@pytest.fixture
def twisted_server_tls(server_cert: trustme.LeafCert) -> CertificateOptions:
    """A Twisted server TLS context factory (for CaptureServer(tls=...))."""
    pem = b"".join(blob.bytes() for blob in server_cert.cert_chain_pems)
    pem += server_cert.private_key_pem.bytes()
    options: CertificateOptions = PrivateCertificate.loadPEM(pem).options()
    return options


@pytest.fixture
def twisted_client_tls(tls_ca: trustme.CA) -> Any:
    """A Twisted client connection creator for "localhost" that trusts only ``tls_ca``."""
    return optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(tls_ca.cert_pem.bytes()))


# Servers ------------------------------------------------------------------------------------


@pytest.fixture
def cue_server() -> Iterator[Callable[..., CueServer]]:
    """Factory: ``cue_server(**CueServer kwargs)`` starts one; all are stopped at teardown."""
    started: list[CueServer] = []

    def start(**kwargs: Any) -> CueServer:
        server = CueServer(**kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def capture_server() -> Iterator[Callable[..., CaptureServer]]:
    """Factory: ``capture_server(**CaptureServer kwargs)`` returns one listening on
    127.0.0.1:``server.port``; all are stopped at teardown."""
    started: list[CaptureServer] = []

    def start(**kwargs: Any) -> CaptureServer:
        server = CaptureServer(**kwargs)
        server.listen()
        started.append(server)
        return server

    yield start
    if started:
        pytest_twisted.blockon(defer.gatherResults([server.stop() for server in started]))


@pytest.fixture(autouse=True)
def _own_data_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: Any) -> None:
    """``twistmail send`` keeps its suppression list in $XDG_DATA_HOME: a test (and the CLI it
    runs) uses a directory of its own, never the user's."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
