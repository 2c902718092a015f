"""Network links between sites, emulated in user space (this machine's kernel has no netem): one
`LinkProxy` per link, a loopback TCP proxy that adds the link's delay, bandwidth, loss and cuts.

Each connection the proxy accepts is forwarded to the link's target through two one-way pipes,
up (client to target) and down (target to client). A pipe's reader stamps every chunk it reads
(up to 64 KiB, or `SLICE_S` of a slow link's time) with the time it is due at the other end, and
its writer delivers the chunks in order at those times, so delays overlap as they do on a wire
instead of adding up:

- serialization: a chunk of n bytes occupies its direction of the link, which the link's
  connections share, for n / `bandwidth_bps` seconds: `free_at = max(read, free_at) + n / bw`;
- propagation: it arrives `delay_s` (half the round trip) after that: at `free_at + delay_s`;
- loss: TCP loses no bytes, so a lost segment shows as its retransmission: with probability
  `loss` a chunk comes one RTO (`max(0.2 s, 3 * rtt)`) late, and the chunks behind it wait for it;
- down: a cut link aborts its open connections and closes new ones as soon as it accepts them.

A pipe holds at most `WINDOW_BYTES` undelivered and stops reading until they drain, as a TCP
window does, so a slow link pushes back on its sender instead of buffering without end. The
properties can change at any time and apply to the chunks read afterwards. `ProxyThread` runs
proxies on an event loop of their own, so their timing does not depend on how busy the loop of
the process that uses them is.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import threading
from collections.abc import Callable
from typing import Any

LOOPBACK = "127.0.0.1"
READ_BYTES = 64 * 1024
SEGMENT_BYTES = 1460  # one TCP segment on Ethernet: the least a pipe reads at once
SLICE_S = 0.01  # a read takes at most this much of a slow link's time, so it delivers smoothly
WINDOW_BYTES = 4 * 1024 * 1024  # past this much in flight a pipe stops reading its sender
MIN_RTO_S = 0.2  # Linux's TCP_RTO_MIN
UP, DOWN = 0, 1  # a pipe's direction: client to target, target to client
_KEEP: Any = object()  # `update` leaves a property as it is


class LinkProxy:
    """A TCP proxy on 127.0.0.1 that forwards every connection to `target_port` over an emulated
    link. Not thread-safe: use it on its event loop (from other threads, via `ProxyThread.call`)."""

    def __init__(self, target_port: int, *, port: int = 0, delay_s: float = 0.0,
                 bandwidth_bps: float | None = None, loss: float = 0.0, seed: int | None = None,
                 target_host: str = LOOPBACK) -> None:
        self.target = (target_host, target_port)
        self.port = port  # 0 until `start` picks a free one
        self.delay_s = 0.0  # one way: half the round trip
        self.bandwidth_bps: float | None = None  # bytes per second each way; None is unlimited
        self.loss = 0.0
        self.update(delay_s=delay_s, bandwidth_bps=bandwidth_bps, loss=loss)
        self.down = False
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.retransmits = 0
        self._rng = random.Random(seed)
        self._free_at = [0.0, 0.0]  # per direction: when the link has sent what it was given
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def rto_s(self) -> float:
        """What a lost segment costs: the retransmission timeout."""
        return max(MIN_RTO_S, 3 * 2 * self.delay_s)

    @property
    def read_bytes(self) -> int:
        """How much a pipe reads at once: up to 64 KiB, or what the link sends in `SLICE_S`."""
        if self.bandwidth_bps is None:
            return READ_BYTES
        return int(min(READ_BYTES, max(SEGMENT_BYTES, self.bandwidth_bps * SLICE_S)))

    def update(self, *, delay_s: float = _KEEP, bandwidth_bps: float | None = _KEEP,
               loss: float = _KEEP) -> None:
        """Change the link's properties; chunks read from now on see the new ones."""
        if delay_s is not _KEEP:
            if delay_s < 0:
                raise ValueError(f"delay_s must be >= 0, not {delay_s}")
            self.delay_s = float(delay_s)
        if bandwidth_bps is not _KEEP:
            if bandwidth_bps is not None and bandwidth_bps <= 0:
                raise ValueError(f"bandwidth_bps must be > 0 or None, not {bandwidth_bps}")
            self.bandwidth_bps = bandwidth_bps
        if loss is not _KEEP:
            if not 0.0 <= loss <= 1.0:
                raise ValueError(f"loss must be within [0, 1], not {loss}")
            self.loss = float(loss)

    def set_down(self, down: bool) -> None:
        """Cut the link (its connections are aborted, new ones closed at once) or restore it."""
        self.down = down
        if down:
            for conn in list(self._conns):
                conn.abort()

    def stats(self) -> dict[str, Any]:
        return {"address": self.address, "target": f"{self.target[0]}:{self.target[1]}",
                "delay_s": self.delay_s, "bandwidth_bps": self.bandwidth_bps, "loss": self.loss,
                "rto_s": self.rto_s, "down": self.down, "connections": self.connections,
                "open_connections": len(self._conns), "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down, "retransmits": self.retransmits}

    async def start(self) -> LinkProxy:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and abort every connection."""
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        await asyncio.gather(*(conn.task for conn in conns if conn.task), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> LinkProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        self.connections += 1
        conn = _Connection(self, writer)
        self._conns.add(conn)
        conn.task = asyncio.create_task(conn.run(reader))
        conn.task.add_done_callback(lambda _: self._conns.discard(conn))

    def _due_at(self, direction: int, n: int, now: float) -> float:
        """When a chunk of n bytes read now reaches the other end (a 0-byte chunk is the EOF)."""
        free_at = max(now, self._free_at[direction])
        if self.bandwidth_bps is not None:
            free_at += n / self.bandwidth_bps
        self._free_at[direction] = free_at
        due = free_at + self.delay_s
        if n and self.loss and self._rng.random() < self.loss:
            self.retransmits += 1
            due += self.rto_s
        return due

    def _delivered(self, direction: int, n: int) -> None:
        if direction == UP:
            self.bytes_up += n
        else:
            self.bytes_down += n


class _Connection:
    """One client connection and its connection to the target, joined by two pipes."""

    def __init__(self, link: LinkProxy, client: asyncio.StreamWriter) -> None:
        self.link = link
        self.writers = [client]
        self.task: asyncio.Task[None] | None = None

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self.task is not None:
            self.task.cancel()

    async def run(self, client_reader: asyncio.StreamReader) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.link.target)
        except OSError:
            self.abort()  # the target is gone: the client sees its connection closed
            return
        self.writers.append(target_writer)
        pipes = [_Pipe(self.link, UP, client_reader, target_writer),
                 _Pipe(self.link, DOWN, target_reader, self.writers[0])]
        tasks = [asyncio.create_task(loop) for pipe in pipes for loop in (pipe.read(), pipe.write())]
        failed = True
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            errors = [task.exception() for task in done if task.exception() is not None]
            failed = bool(errors)
            for error in errors:
                if not isinstance(error, OSError):  # resets and broken pipes end quietly; bugs do not
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in self.writers:
                if failed:
                    writer.transport.abort()
                else:
                    writer.close()


class _Pipe:
    """One direction of a connection: reads chunks, stamps when each is due, delivers in order."""

    def __init__(self, link: LinkProxy, direction: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.link = link
        self.direction = direction
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.in_flight = 0
        self.room = asyncio.Event()
        self.last_due = 0.0  # a chunk never overtakes the one before it (a retransmission holds both)

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.in_flight >= WINDOW_BYTES:
                self.room.clear()
                await self.room.wait()
            data = await self.reader.read(self.link.read_bytes)
            self.last_due = max(self.last_due, self.link._due_at(self.direction, len(data), loop.time()))
            self.in_flight += len(data)
            self.queue.put_nowait((self.last_due, data))
            if not data:
                return

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:  # the sender's EOF, after everything it sent
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.link._delivered(self.direction, len(data))
            self.writer.write(data)
            await self.writer.drain()
            self.in_flight -= len(data)
            self.room.set()


class ProxyThread:
    """Link proxies on a daemon thread's own event loop, for synchronous callers (or callers whose
    loop is busy with other work)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s  # how long `add`, `call` and `close` wait for the loop
        self.proxies: list[LinkProxy] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="netem", daemon=True)
        self._thread.start()

    def add(self, target_port: int, *, port: int = 0, delay_s: float = 0.0,
            bandwidth_bps: float | None = None, loss: float = 0.0, seed: int | None = None,
            target_host: str = LOOPBACK) -> LinkProxy:
        """A started proxy to `target_host:target_port`, listening by the time this returns."""
        proxy = LinkProxy(target_port, target_host=target_host, port=port, delay_s=delay_s,
                          bandwidth_bps=bandwidth_bps,
                          loss=loss, seed=seed)
        self.call(proxy.start)
        self.proxies.append(proxy)
        return proxy

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` run on the loop's thread (awaited there if it returns an awaitable)."""
        async def run() -> Any:
            result = fn(*args)
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(self.timeout_s)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        for proxy in self.proxies:
            self.call(proxy.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(self.timeout_s)
        self.loop.close()

    def __enter__(self) -> ProxyThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
