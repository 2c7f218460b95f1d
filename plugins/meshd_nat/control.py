"""The NAT plugin's control channel: small requests between members, inside the mesh.

Every node listens on its IPv6 mesh address, UDP port ``WireGuard port + 2``. A
datagram is a msgpack map ``{"t": type, "i": request id, ...}``; an answer carries
the request's id. Requests travel through WireGuard, so the source address names
the member that sent it: WireGuard only delivers a packet from a peer whose
allowed IPs hold its source. A packet that reached the mesh address through any
other interface (a neighbour on the underlay can route to it: Linux accepts a
packet for any local address on any interface) is dropped, by its arrival
interface (``IPV6_PKTINFO``), before it is decoded.

Types: ``echo`` (liveness and RTT), ``observe`` (what endpoint do you see for my
WireGuard port?), ``alloc`` (a relay's forwarding port for a pair), ``punch``
(switch to the direct path now) and ``verdict`` (how a punch ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgpack

log = logging.getLogger(__name__)

PORT_OFFSET = 2  # the control port is the WireGuard port + this
MAX_DATAGRAM = 1200

Handler = Callable[[str, Mapping[str, Any]], Awaitable[Mapping[str, Any] | None]]
"""Answers one request: (sender's mesh address, request) -> answer or None."""


class ControlError(Exception):
    """A request that got no answer in time, or an error answer."""


class Channel:
    """One socket, its handlers, and the requests waiting for answers."""

    def __init__(self, address: str, port: int, ifname: str) -> None:
        self.address, self.port, self.ifname = address, port, ifname
        self._handlers: dict[str, Handler] = {}
        self._waiting: dict[int, asyncio.Future[Mapping[str, Any]]] = {}
        self._ids = itertools.count(int(time.time() * 1000) % (1 << 30))
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0  # datagrams refused: wrong interface, undecodable

    def handle(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            sock.setblocking(False)
            sock.bind((self.address, self.port))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for task in self._tasks:
            task.cancel()
        for waiter in self._waiting.values():
            waiter.cancel()
        self._waiting.clear()

    async def request(
        self, address: str, message: Mapping[str, Any], *, timeout: float = 1.0, tries: int = 2
    ) -> Mapping[str, Any]:
        """Send ``message`` to ``address`` and wait for its answer (resent ``tries`` times)."""
        assert self._loop is not None, "open() first"
        ident = next(self._ids) & 0x7FFFFFFF
        waiter: asyncio.Future[Mapping[str, Any]] = self._loop.create_future()
        self._waiting[ident] = waiter
        try:
            for _ in range(tries):
                self.send(address, {**message, "i": ident})
                done, _pending = await asyncio.wait({waiter}, timeout=timeout / tries)
                if done:
                    answer = waiter.result()
                    if answer.get("t") == "error":
                        raise ControlError(str(answer.get("why", "refused")))
                    return answer
            raise ControlError(f"no answer from {address} within {timeout:.1f} s")
        finally:
            self._waiting.pop(ident, None)

    def send(self, address: str, message: Mapping[str, Any]) -> None:
        if self._sock is None:
            return
        data = msgpack.packb(dict(message))
        # A full socket buffer or a route going away loses the datagram, as UDP
        # would on the wire; every user retries.
        with contextlib.suppress(OSError):
            self._sock.sendto(data, (address, self.port))

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(64):  # a burst, then let others run
            try:
                data, ancdata, _flags, source = sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(20))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("control socket: %s", exc)
                return
            if not self._arrived_on_mesh(ancdata):
                self.dropped += 1
                continue
            try:
                message = msgpack.unpackb(data, strict_map_key=True)
            except Exception:  # any garbage: msgpack raises many kinds
                self.dropped += 1
                continue
            if not isinstance(message, dict) or not isinstance(message.get("i"), int):
                self.dropped += 1
                continue
            self._dispatch(str(source[0]).split("%")[0], message)

    def _arrived_on_mesh(self, ancdata: list[tuple[int, int, bytes]]) -> bool:
        try:
            wanted = socket.if_nametoindex(self.ifname)
        except OSError:
            return False
        for level, kind, value in ancdata:
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(value) >= 20:
                (ifindex,) = struct.unpack_from("@I", value, 16)
                return bool(ifindex == wanted)
        return False

    def _dispatch(self, source: str, message: dict[str, Any]) -> None:
        kind = message.get("t")
        ident = message["i"]
        waiter = self._waiting.get(ident)
        if waiter is not None and kind in ("answer", "error"):
            if not waiter.done():
                waiter.set_result(message)
            return
        handler = self._handlers.get(str(kind))
        if handler is None:
            return

        async def answer() -> None:
            try:
                reply = await handler(source, message)
            except ControlError as exc:
                self.send(source, {"t": "error", "i": ident, "why": str(exc)})
                return
            except Exception:
                log.exception("control request %s from %s failed", kind, source)
                return
            if reply is not None:
                self.send(source, {**reply, "t": "answer", "i": ident})

        task = asyncio.get_running_loop().create_task(answer())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
