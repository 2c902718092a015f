"""The emulated links of `llmscale.cluster.netem`, end to end through an echo server: bytes arrive
unchanged and counted, delay, bandwidth and loss cost at least what they should, order holds, a
cut link refuses service until restored, and `ProxyThread` serves synchronous code.

Timings are only bounded from below (with a generous ceiling): the machine may be busy.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from llmscale.cluster.netem import LinkProxy, ProxyThread

SLACK_S = 1e-3  # the clocks agree; this only absorbs float rounding
CEILING_S = 2.0


class Echo:
    """A loopback echo server that counts the connections it accepts."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except OSError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


def run(test: Callable[[Echo, int], Awaitable[None]]) -> None:
    async def main() -> None:
        echo = Echo()
        port = await echo.start()
        try:
            await asyncio.wait_for(test(echo, port), timeout=10)
        finally:
            echo.close()

    asyncio.run(main())


async def round_trip(proxy: LinkProxy, payload: bytes) -> tuple[bytes, float]:
    """Send `payload`, half-close, read the echo to its EOF: what came back and how long it took."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(payload)
    writer.write_eof()
    received = await reader.read()
    writer.close()
    return received, time.monotonic() - start


def test_bytes_pass_unchanged_and_are_counted() -> None:
    async def test(echo: Echo, port: int) -> None:
        async with LinkProxy(port) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            for chunk in (b"hello", b" ", b"world" * 1000):
                writer.write(chunk)
                await writer.drain()
                assert await reader.readexactly(len(chunk)) == chunk
            writer.close()
            big = bytes(range(256)) * 4096  # 1 MiB
            received, _ = await round_trip(proxy, big)
            assert received == big
            sent = 5 + 1 + 5000 + len(big)
            stats = proxy.stats()
            assert (stats["bytes_up"], stats["bytes_down"], stats["connections"]) == (sent, sent, 2)
            json.dumps(stats)

    run(test)


def test_delay_is_paid_each_way_and_can_change() -> None:
    async def test(echo: Echo, port: int) -> None:
        async with LinkProxy(port, delay_s=0.05) as proxy:
            received, took = await round_trip(proxy, b"ping")
            assert received == b"ping"
            assert 0.1 - SLACK_S <= took < CEILING_S
            proxy.update(delay_s=0.1)
            _, took = await round_trip(proxy, b"ping")
            assert 0.2 - SLACK_S <= took < CEILING_S
            with pytest.raises(ValueError):
                proxy.update(loss=1.5)

    run(test)


def test_bandwidth_serializes() -> None:
    async def test(echo: Echo, port: int) -> None:
        async with LinkProxy(port, bandwidth_bps=1_000_000) as proxy:
            payload = b"x" * 200_000
            received, took = await round_trip(proxy, payload)
            assert received == payload
            # 0.2 s each way, pipelined: the echo starts back before the last byte is up
            assert 0.2 - SLACK_S <= took < CEILING_S

    run(test)


def test_loss_costs_a_retransmission_timeout() -> None:
    async def test(echo: Echo, port: int) -> None:
        async with LinkProxy(port, delay_s=0.01, loss=1.0, seed=0) as proxy:
            assert proxy.rto_s == pytest.approx(0.2)
            received, took = await round_trip(proxy, b"ping")
            assert received == b"ping"
            assert 2 * (0.01 + proxy.rto_s) - SLACK_S <= took < CEILING_S
            assert proxy.stats()["retransmits"] == 2

    run(test)


def test_order_holds_under_loss_and_delay() -> None:
    async def test(echo: Echo, port: int) -> None:
        async with LinkProxy(port, delay_s=0.01, loss=0.3, seed=1) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            messages = [f"{i:04d}\n".encode() for i in range(30)]
            for message in messages:  # one chunk each: a loss then delays some but not others
                writer.write(message)
                await writer.drain()
                await asyncio.sleep(0.005)
            writer.write_eof()
            assert await reader.read() == b"".join(messages)
            writer.close()
            assert proxy.stats()["retransmits"] > 0

    run(test)


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(100), timeout=CEILING_S) == b""
    except ConnectionError:
        return True


def test_down_cuts_connections_until_restored() -> None:
    async def test(echo: Echo, port: int) -> None:
        async with LinkProxy(port) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"up")
            assert await reader.readexactly(2) == b"up"
            assert echo.accepted == 1

            proxy.set_down(True)
            assert await _closed(reader)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"anyone?")
            assert await _closed(reader)
            writer.close()
            assert echo.accepted == 1
            assert proxy.stats()["open_connections"] == 0

            proxy.set_down(False)
            received, _ = await round_trip(proxy, b"back")
            assert received == b"back"
            assert echo.accepted == 2

    run(test)


def test_proxy_thread_serves_synchronous_callers() -> None:
    with ProxyThread() as links:
        echo = Echo()
        port = links.call(echo.start)
        proxy = links.add(port, delay_s=0.02)
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=CEILING_S) as sock:
            sock.sendall(b"sync")
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while data := sock.recv(4096):
                received += data
        assert received == b"sync"
        assert time.monotonic() - start >= 0.04 - SLACK_S

        links.call(proxy.set_down, True)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=CEILING_S) as sock:
            try:
                assert sock.recv(100) == b""
            except ConnectionError:
                pass
        assert echo.accepted == 1
        assert links.call(proxy.stats)["down"] is True
        links.call(echo.close)
