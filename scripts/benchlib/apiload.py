"""The HTTP load of ``scripts/bench --mode api``: ``clients`` keep-alive connections POST
``count`` small JSON messages to the relay's ``/v1/messages``, each waiting for its 202.

Plain asyncio streams (no HTTP library: the client must cost little beside the relay on a
2-core machine). Returns the wall time and each request's latency.
"""

from __future__ import annotations

import asyncio
import json
import time


def _request(port: int, n: int) -> bytes:
    body = json.dumps(
        {"from": "app@example.com", "to": "user@example.org", "subject": f"m{n}", "text": "x" * 200}
    ).encode()
    return (
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body)
    )


async def _client(port: int, todo: list[int], latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while todo:
            n = todo.pop()
            started = time.perf_counter()
            writer.write(_request(port, n))
            status = await reader.readline()
            length, chunked = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:  # twisted.web chunks a body given by a Deferred
                while size := int((await reader.readline()).split(b";")[0], 16):
                    await reader.readexactly(size + 2)
                await reader.readline()
            else:
                await reader.readexactly(length)
            if not status.startswith(b"HTTP/1.1 202"):
                raise RuntimeError(f"message {n}: {status!r}")
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


def post_messages(port: int, count: int, clients: int) -> tuple[float, list[float]]:
    """Seconds for all ``count`` 202s, and each request's latency in seconds."""
    todo = list(range(count))
    latencies: list[float] = []

    async def run() -> None:
        await asyncio.gather(*(_client(port, todo, latencies) for _ in range(clients)))

    started = time.monotonic()
    asyncio.run(run())
    return time.monotonic() - started, latencies
