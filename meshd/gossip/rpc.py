"""An asyncio client for the Serf agent's RPC protocol (IPC version 1, msgpack over TCP).

The only module of meshd that imports ``msgpack`` or talks to the Serf RPC port.

One :class:`SerfClient` holds one connection. Calls and the event stream share
it: requests carry a ``Seq``, replies are matched by it and may come in any
order. Every error header becomes a typed exception carrying the agent's text:
:class:`~meshd.errors.SerfAuthError` for authentication,
:class:`~meshd.errors.SerfCommandError` for a refused command, and
:class:`~meshd.errors.SerfConnectionError` when there is no connection or no
reply. When the connection drops (the agent restarted), calls in flight fail
with SerfConnectionError, the client reconnects with backoff, subscribes to the
stream again and puts a :class:`StreamGap` into the event queue: the agent
replays nothing, so whoever consumes events must re-read ``members`` then.

``monitor(on_line)`` passes the agent's log lines to a callback (the view
uses it to notice member changes before Serf's coalesced events say so).

Events (member-*, user, query) go into a bounded queue
(:mod:`meshd.gossip.events`) read with ``async for event in client.events()``.

Network namespaces: with ``netns="NAME"`` the socket is made inside that
namespace (:func:`meshd.netns.call_in_netns`) and stays there, so a process in
the root namespace talks to an agent whose RPC port is 127.0.0.1 inside a lab node.

Public API (see :class:`SerfRPC` for the calls)::

    client = SerfClient("127.0.0.1:7373", auth_key=..., netns=None, stream="*")
    await client.connect()                       # SerfConnectionError / SerfAuthError
    members = await client.members()             # list[SerfMember]
    async for event in client.events(): ...      # MemberEvent | UserEvent | QueryEvent | StreamGap
    await client.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from meshd.errors import DecodeError, SerfAuthError, SerfCommandError, SerfConnectionError
from meshd.gossip.events import EventQueue
from meshd.gossip.messages import (
    REPLY_BODY,
    Body,
    Coordinate,
    KeyResponse,
    LogHandler,
    QueryResult,
    SerfEvent,
    SerfMember,
    StreamGap,
    decode_event,
    decode_key_response,
    decode_members,
    text_of,
)
from meshd.hostport import parse_host_port
from meshd.netns import call_in_netns
from meshd.tasks import cancel_and_wait

log = logging.getLogger(__name__)

IPC_VERSION = 1
# How long the client's own tasks get to end once cancelled (they only read a socket).
CANCEL_WAIT = 1.0
_EOF = object()
_AUTH_ERRORS = ("Authentication required", "Invalid authentication token")
# memberlist applies new tags to this node at once, then waits (Serf's BroadcastTimeout,
# 5 s) for their alive message to be gossiped; running out of that wait is no failure.
_BROADCAST_UNCONFIRMED = "timeout waiting for update broadcast"


# ---------------------------------------------------------------- the client


@dataclass
class _Pending:
    command: str
    future: asyncio.Future[Any]
    body: Body = "never"
    # Streams (stream, query): header-only ack, then header + body records.
    on_record: Callable[[Mapping[str, Any]], None] | None = None
    acked: bool = False


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    unpacker: msgpack.Unpacker = field(
        default_factory=lambda: msgpack.Unpacker(raw=False, max_buffer_size=64 * 1024 * 1024)
    )


class SerfClient:
    """An asyncio Serf RPC client; see the module docstring. Implements :class:`SerfRPC`."""

    def __init__(
        self,
        rpc_addr: str = "127.0.0.1:7373",
        *,
        auth_key: str | None = None,
        netns: str | None = None,
        stream: str | None = "*",
        queue_size: int = 1024,
        timeout: float = 10.0,
        reconnect: bool = True,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        verify_server: Callable[[], bool] | None = None,
    ) -> None:
        self.rpc_addr = rpc_addr
        # Asked before the auth key is sent: is the listener the agent we mean to talk to?
        self._verify_server = verify_server
        try:
            self._host, self._port = parse_host_port(rpc_addr)
        except DecodeError as exc:
            raise SerfConnectionError(f"RPC address {exc}") from exc
        self._auth_key = auth_key
        self._netns = netns
        self._stream_types = stream
        self._timeout = timeout
        self._reconnect = reconnect
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._events = EventQueue(queue_size)
        self._seq = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._conn: _Connection | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._closed = False
        self._monitor: tuple[str, LogHandler] | None = None
        self.reconnects = 0

    # ------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def connect(self) -> None:
        """Connect, handshake, authenticate and subscribe; then keep the connection up."""
        self._closed = False
        await self._open()
        if self._reconnect and self._keeper is None:
            self._keeper = asyncio.create_task(self._keep_connected(), name="serf-rpc-keeper")

    async def wait_connected(self, seconds: float) -> None:
        """Wait until (re)connected; SerfConnectionError after ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                await self._connected.wait()
        except TimeoutError:
            raise SerfConnectionError(
                f"no RPC connection to the Serf agent at {self.rpc_addr} after {seconds:g} s"
            ) from None

    async def close(self) -> None:
        """Close the connection for good; pending calls fail with SerfConnectionError."""
        self._closed = True
        if self._keeper is not None:
            await cancel_and_wait([self._keeper], CANCEL_WAIT)
            self._keeper = None
        await self._drop_connection("client closed")

    async def __aenter__(self) -> SerfClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        where = f"{self.rpc_addr}" + (f" in netns {self._netns}" if self._netns else "")
        try:
            if self._netns is None:
                async with asyncio.timeout(self._timeout):
                    return await asyncio.open_connection(self._host, self._port)
            address, timeout = (self._host, self._port), self._timeout
            sock = await asyncio.to_thread(
                call_in_netns, self._netns, lambda: socket.create_connection(address, timeout)
            )
            return await asyncio.open_connection(sock=sock)
        except (OSError, TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise SerfConnectionError(f"cannot reach the Serf agent at {where}: {reason}") from exc

    async def _open(self) -> None:
        reader, writer = await self._dial()
        if self._verify_server is not None and not self._verify_server():
            writer.close()
            raise SerfConnectionError(
                f"the RPC port {self.rpc_addr} is not served by our Serf agent: "
                "its auth key is not sent"
            )
        conn = _Connection(reader, writer)
        self._conn = conn
        self._reader_task = asyncio.create_task(self._read_loop(conn), name="serf-rpc-reader")
        try:
            await self._call("handshake", {"Version": IPC_VERSION}, conn=conn)
            if self._auth_key is not None:
                await self._call("auth", {"AuthKey": self._auth_key}, conn=conn)
            if self._stream_types:
                await self._subscribe(conn)
            if self._monitor is not None:
                await self._subscribe_monitor(conn)
        except BaseException:
            await self._drop_connection("handshake failed")
            raise
        self._connected.set()
        log.debug("connected to the Serf agent at %s", self.rpc_addr)

    async def _drop_connection(self, reason: str) -> None:
        self._connected.clear()
        conn, self._conn = self._conn, None
        task, self._reader_task = self._reader_task, None
        if conn is not None:
            conn.writer.close()
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()
        if task is not None and task is not asyncio.current_task():
            await cancel_and_wait([task], CANCEL_WAIT)
        self._fail_pending(SerfConnectionError(f"Serf RPC connection lost: {reason}"))

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(exc)
                # Mark it retrieved: a call that already timed out will never await it.
                entry.future.exception()

    async def _keep_connected(self) -> None:
        while not self._closed:
            task = self._reader_task
            if task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(task)
            if self.closed:
                return
            await self._drop_connection("the agent closed it")
            log.warning(
                "lost the RPC connection to the Serf agent at %s; reconnecting", self.rpc_addr
            )
            delay = self._backoff_initial
            quiet = False
            while not self.closed:
                await asyncio.sleep(delay)
                try:
                    await self._open()
                except (SerfConnectionError, SerfAuthError, SerfCommandError) as exc:
                    # Logged once at WARNING, then DEBUG, while the agent stays away.
                    (log.debug if quiet else log.warning)("reconnecting to Serf: %s", exc)
                    quiet = True
                    delay = min(delay * 2, self._backoff_max)
                    continue
                self.reconnects += 1
                log.info("reconnected to the Serf agent at %s", self.rpc_addr)
                self._events.put(StreamGap("reconnected"))
                break

    # ------------------------------------------------------------ wire

    async def _read_loop(self, conn: _Connection) -> None:
        objects = self._objects(conn)
        try:
            async for header in objects:
                if not isinstance(header, dict):
                    raise SerfConnectionError(f"unexpected RPC frame {type(header).__name__}")
                await self._dispatch(header, objects)
        except (OSError, ValueError, msgpack.UnpackException, SerfConnectionError) as exc:
            log.debug("Serf RPC reader stopped: %s", exc)

    async def _objects(self, conn: _Connection) -> AsyncIterator[Any]:
        while True:
            for obj in conn.unpacker:
                yield obj
            chunk = await conn.reader.read(65536)
            if not chunk:
                return
            conn.unpacker.feed(chunk)

    async def _dispatch(self, header: Mapping[str, Any], objects: AsyncIterator[Any]) -> None:
        raw_seq = header.get("Seq")
        seq = raw_seq if isinstance(raw_seq, int) else -1
        error = text_of(header.get("Error"))
        entry = self._pending.get(seq)
        if entry is None:
            # Only stream records (a header plus a body) arrive unasked, e.g. after stop.
            log.debug("Serf RPC reply for unknown seq %r; skipping its body", seq)
            await self._body(objects)
            return
        if entry.on_record is not None and entry.acked:
            body = await self._body(objects)
            if isinstance(body, dict):
                entry.on_record(body)
            return
        needs_body = entry.body == "always" or (entry.body == "on_success" and not error)
        body = await self._body(objects) if needs_body else None
        if needs_body and not isinstance(body, dict):
            error = error or f"malformed reply body {type(body).__name__}"
        if entry.on_record is not None and not error:
            entry.acked = True
        else:
            self._pending.pop(seq, None)
        if entry.future.done():
            return
        if error:
            entry.future.set_exception(self._error(entry.command, error))
        else:
            entry.future.set_result(body)

    async def _body(self, objects: AsyncIterator[Any]) -> Any:
        body = await anext(objects, _EOF)
        if body is _EOF:
            raise SerfConnectionError("the agent closed the connection in the middle of a reply")
        return body

    def _error(self, command: str, message: str) -> Exception:
        if command == "auth" or message in _AUTH_ERRORS:
            return SerfAuthError(f"the Serf agent at {self.rpc_addr} refused RPC auth: {message}")
        return SerfCommandError(f"serf {command}: {message}")

    def _register(self, command: str, entry_kw: Mapping[str, Any]) -> tuple[int, _Pending]:
        seq = next(self._seq)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        entry = _Pending(command=command, future=future, **entry_kw)
        self._pending[seq] = entry
        return seq, entry

    async def _send(self, conn: _Connection, seq: int, command: str, body: Any) -> None:
        frame = msgpack.packb({"Command": command, "Seq": seq}, use_bin_type=True)
        if body is not None:
            frame += msgpack.packb(body, use_bin_type=True)
        try:
            async with self._write_lock:
                conn.writer.write(frame)
                # Back-pressure: wait while the kernel buffer is full.
                await conn.writer.drain()
        except (OSError, RuntimeError) as exc:
            self._pending.pop(seq, None)
            raise SerfConnectionError(f"serf {command}: cannot send: {exc}") from exc

    async def _call(
        self,
        command: str,
        body: Any = None,
        *,
        conn: _Connection | None = None,
        reply_timeout: float | None = None,
        on_record: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> Any:
        conn = conn or self._conn
        if conn is None or (conn is not self._conn):
            raise SerfConnectionError(f"serf {command}: not connected to {self.rpc_addr}")
        seq, entry = self._register(
            command, {"body": REPLY_BODY.get(command, "never"), "on_record": on_record}
        )
        await self._send(conn, seq, command, body)
        try:
            # The entry stays registered after a timeout so its late reply is still parsed.
            # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that arrives
            # with the reply, and the caller's loop runs on past its shutdown (issue 10).
            async with asyncio.timeout(self._timeout if reply_timeout is None else reply_timeout):
                return await asyncio.shield(entry.future)
        except TimeoutError:
            raise SerfConnectionError(
                f"serf {command}: no reply from {self.rpc_addr} in {self._timeout:g} s"
            ) from None

    async def _subscribe(self, conn: _Connection) -> None:
        await self._call(
            "stream", {"Type": self._stream_types}, conn=conn, on_record=self._on_event
        )

    async def _subscribe_monitor(self, conn: _Connection) -> None:
        assert self._monitor is not None
        level, handler = self._monitor

        def on_record(body: Mapping[str, Any]) -> None:
            try:
                handler(text_of(body.get("Log")))
            except Exception:
                log.exception("Serf log handler failed")

        await self._call("monitor", {"LogLevel": level}, conn=conn, on_record=on_record)

    async def monitor(self, on_line: LogHandler, *, level: str = "INFO") -> None:
        """Pass every log line the agent writes at ``level`` or above to ``on_line``.

        One monitor per client, kept across reconnects. The agent first replays
        the lines it has buffered. ``on_line`` runs in the reader: keep it quick.
        """
        if self._monitor is not None:
            raise SerfCommandError("serf monitor: this client already has a monitor")
        self._monitor = (level, on_line)
        conn = self._conn
        if conn is not None:
            try:
                await self._subscribe_monitor(conn)
            except BaseException:
                self._monitor = None
                raise

    def _on_event(self, body: Mapping[str, Any]) -> None:
        try:
            self._decode_event(body)
        except (AttributeError, TypeError, ValueError) as exc:
            log.warning("skipping a malformed Serf stream record: %s", exc)

    def _decode_event(self, body: Mapping[str, Any]) -> None:
        event = decode_event(body)
        if event is None:
            log.debug("ignoring Serf stream record %r", text_of(body.get("Event")))
            return
        self._events.put(event)

    @property
    def dropped_events(self) -> int:
        return self._events.dropped

    async def events(self) -> AsyncIterator[SerfEvent]:
        """Every event from the stream, in order. One consumer: events are not copied."""
        while True:
            yield await self._events.get()

    def next_event_nowait(self) -> SerfEvent | None:
        """The next queued event, or None when the queue is empty."""
        return self._events.get_nowait()

    # ------------------------------------------------------------ commands

    async def members(self) -> list[SerfMember]:
        return decode_members("members", await self._call("members"))

    async def members_filtered(
        self,
        *,
        tags: Mapping[str, str] | None = None,
        status: str | None = None,
        name: str | None = None,
    ) -> list[SerfMember]:
        """Members matching anchored regexes.

        The agent hangs up, without a reply, on a regex it cannot compile; patterns
        Python cannot compile either are refused here with a SerfCommandError.
        """
        request = {"Tags": dict(tags or {}), "Status": status or "", "Name": name or ""}
        for pattern in (*(tags or {}).values(), status or "", name or ""):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SerfCommandError(
                    f"serf members-filtered: bad regex {pattern!r}: {exc}"
                ) from exc
        return decode_members("members-filtered", await self._call("members-filtered", request))

    async def set_tags(self, tags: Mapping[str, str], delete: Iterable[str] = ()) -> None:
        """Set this node's tags. They are set once this returns; the alive message that
        carries them may still be queued for gossip (Serf stops waiting for it after 5 s,
        e.g. while the members it knows are restarting too), and goes out later."""
        try:
            await self._call("tags", {"Tags": dict(tags), "DeleteTags": list(delete)})
        except SerfCommandError as exc:
            if not str(exc).endswith(_BROADCAST_UNCONFIRMED):
                raise
            log.debug("tags set; their broadcast is still queued (%s)", exc)

    async def join(self, addresses: Sequence[str], *, replay: bool = False) -> int:
        body = await self._call("join", {"Existing": list(addresses), "Replay": replay})
        return int(body.get("Num") or 0)

    async def leave(self) -> None:
        """Leave the cluster gracefully; the agent shuts down afterwards."""
        await self._call("leave", reply_timeout=max(self._timeout, 30.0))

    async def force_leave(self, node: str, *, prune: bool = False) -> None:
        """Mark ``node`` left; with ``prune``, erase it from the members list at once."""
        body: dict[str, Any] = {"Node": node}
        if prune:
            body["Prune"] = True
        await self._call("force-leave", body)

    async def user_event(self, name: str, payload: bytes = b"", *, coalesce: bool = True) -> None:
        await self._call("event", {"Name": name, "Payload": payload, "Coalesce": coalesce})

    async def query(
        self,
        name: str,
        payload: bytes = b"",
        *,
        filter_nodes: Sequence[str] = (),
        filter_tags: Mapping[str, str] | None = None,
        request_ack: bool = False,
        query_timeout: float = 0.0,
    ) -> QueryResult:
        """Send a query and collect acks and responses until the agent says it is done.

        ``query_timeout`` (seconds) 0 lets the agent pick its default (a few gossip rounds).
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        acks: list[str] = []
        responses: dict[str, bytes] = {}
        query_seq = 0

        def on_record(body: Mapping[str, Any]) -> None:
            kind = text_of(body.get("Type"))
            if kind in ("ack", "response") and not text_of(body.get("From")):
                # Serf closes a query's channels at its deadline, and its RPC stream can
                # read them again before its own timer for 'done' fires (both are set to
                # the deadline): a closed channel yields an empty ack or response, sent
                # as from "". Serf names no node "".
                return
            if kind == "ack":
                acks.append(text_of(body.get("From")))
            elif kind == "response":
                responses[text_of(body.get("From"))] = bytes(body.get("Payload") or b"")
            elif kind == "done":
                self._pending.pop(query_seq, None)
                if not done.done():
                    done.set_result(None)

        request = {
            "FilterNodes": list(filter_nodes),
            "FilterTags": dict(filter_tags or {}),
            "RequestAck": request_ack,
            "Timeout": int(query_timeout * 1e9),
            "Name": name,
            "Payload": payload,
        }
        conn = self._conn
        if conn is None:
            raise SerfConnectionError(f"serf query: not connected to {self.rpc_addr}")
        seq, entry = self._register("query", {"on_record": on_record})
        query_seq = seq
        await self._send(conn, seq, "query", request)
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.shield(entry.future)
            # The agent's default query timeout is a few seconds; allow it plus ours.
            async with asyncio.timeout((query_timeout or 30.0) + self._timeout):
                await asyncio.shield(done)
        except TimeoutError:
            self._pending.pop(seq, None)
            raise SerfConnectionError(f"serf query {name!r}: no end of responses") from None
        finally:
            if not entry.future.done():
                entry.future.cancel()
        if entry.future.done() and not entry.future.cancelled() and entry.future.exception():
            raise entry.future.exception()  # type: ignore[misc]
        return QueryResult(acks=tuple(acks), responses=responses)

    async def respond(self, query_id: int, payload: bytes) -> None:
        await self._call("respond", {"ID": query_id, "Payload": payload})

    async def _key_command(self, command: str, key: str | None) -> KeyResponse:
        body = await self._call(command, None if key is None else {"Key": key})
        return decode_key_response(body)

    async def install_key(self, key: str) -> KeyResponse:
        return await self._key_command("install-key", key)

    async def use_key(self, key: str) -> KeyResponse:
        return await self._key_command("use-key", key)

    async def remove_key(self, key: str) -> KeyResponse:
        return await self._key_command("remove-key", key)

    async def list_keys(self) -> KeyResponse:
        return await self._key_command("list-keys", None)

    async def stats(self) -> dict[str, dict[str, str]]:
        body = await self._call("stats")
        return {
            text_of(section): {text_of(k): text_of(v) for k, v in (values or {}).items()}
            for section, values in body.items()
        }

    async def get_coordinate(self, node: str) -> Coordinate | None:
        """The node's network coordinate, or None when the agent has none for it."""
        body = await self._call("get-coordinate", {"Node": node})
        if not body.get("Ok"):
            return None
        coord = body.get("Coord") or {}
        return Coordinate(
            vec=tuple(float(x) for x in coord.get("Vec") or ()),
            error=float(coord.get("Error") or 0.0),
            adjustment=float(coord.get("Adjustment") or 0.0),
            height=float(coord.get("Height") or 0.0),
        )
