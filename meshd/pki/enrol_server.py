"""The seed's side of enrolment: the server on the enrolment port.

It speaks the protocol of :mod:`meshd.pki.enrol`: checks the joiner's proof,
then ``verify`` (normally :func:`chain_verifier`: chain to the CA, at
admission, not revoked), then ``on_enrolled``, the agent's callback that adds
the joiner as a WireGuard peer and answers with the members it knows.

Defences: a token bucket per source address (per /64 for IPv6) refuses floods
before any work; at most ``max_per_source`` conversations per source and
``max_connections`` in all, a newcomer pushing out a waiting conversation of the
most crowded source when full, so idle connections cannot lock honest joiners
out; ``first_frame_timeout`` for the request and ``timeout`` for the whole
conversation; a request frame of at most :data:`~meshd.pki.enrol.MAX_REQUEST`
bytes. Garbage is answered with ``refused`` and the connection closed; nothing a
client sends can stop the server.

Public API::

    EnrolServer(host, port, verify, on_enrolled, *, burst, refill_per_second, timeout,
                first_frame_timeout, max_connections, max_per_source)
    await .start(); .port; await .stop(); async with
    chain_verifier(ca_public_key, *, revoked=None, clock=time.time) -> Verifier
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable

from meshd.b64 import encode_b64
from meshd.errors import EnrolError, EnrolRefused, IdentityError, MeshdError
from meshd.pki.enrol import (
    MAX_REQUEST,
    NONCE_LEN,
    PROTOCOL_VERSION,
    EnrolRequest,
    OnEnrolled,
    Verifier,
    read_frame,
    refusal,
    verify_proof,
    write_frame,
)
from meshd.pki.revocation import RevocationList

log = logging.getLogger(__name__)


def chain_verifier(
    ca_public_key: bytes,
    *,
    revoked: RevocationList | Callable[[], RevocationList | None] | None = None,
    clock: Callable[[], float] = time.time,
) -> Verifier:
    """The standard ``verify``: the request's chain leads to the CA, fresh, and is not revoked.

    ``revoked`` is the agent's live revocation list, or a function returning it.
    """

    def verify(request: EnrolRequest) -> None:
        current = revoked() if callable(revoked) else revoked
        request.chain.verify(ca_public_key, int(clock()), revoked=current, at_admission=True)

    return verify


class RateLimiter:
    """A token bucket per source: ``burst`` attempts at once, refilled at ``per_second``."""

    def __init__(
        self,
        burst: float,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = 4096,
    ) -> None:
        self.burst = burst
        self.per_second = per_second
        self._clock = clock
        self._max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}

    @staticmethod
    def source_key(source: str) -> str:
        # One IPv6 host owns a whole /64: limiting per address would be no limit.
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            return source
        if address.version == 6:
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return str(address)

    def allow(self, source: str) -> bool:
        key = self.source_key(source)
        now = self._clock()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_second)
        allowed = tokens >= 1
        self._buckets[key] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > self._max_sources:
            self._forget_full(now)
        return allowed

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket; drop those first, then the oldest.
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.per_second >= self.burst:
                del self._buckets[key]
        while len(self._buckets) > self._max_sources:
            del self._buckets[next(iter(self._buckets))]


class EnrolServer:
    """The seed side: listens on the enrolment port and admits joiners.

    ``verify(request)`` raises IdentityError (or EnrolRefused) to refuse;
    ``on_enrolled(request)`` (plain or async) adds the WireGuard peer and returns
    the :class:`EnrolResult` for the joiner, or raises EnrolRefused to refuse.
    """

    def __init__(
        self,
        host: str,
        port: int,
        verify: Verifier,
        on_enrolled: OnEnrolled,
        *,
        burst: float = 5,
        refill_per_second: float = 0.5,
        timeout: float = 10.0,
        first_frame_timeout: float = 3.0,
        max_connections: int = 128,
        max_per_source: int = 4,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._verify = verify
        self._on_enrolled = on_enrolled
        self._limiter = RateLimiter(burst, refill_per_second)
        self._timeout = timeout
        self._first_frame_timeout = first_frame_timeout
        self._max_connections = max_connections
        self._max_per_source = max_per_source
        # Conversations by source (an IPv6 /64 counts as one), oldest first; and those
        # still waiting for their request, which a newcomer may push out.
        self._by_source: dict[str, list[asyncio.Task[None]]] = {}
        self._waiting: set[asyncio.Task[None]] = set()
        self._writers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._server: asyncio.Server | None = None
        self._bound_port = port
        self._conversations: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port once started (useful when constructed with port 0)."""
        return self._bound_port

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self._requested_port, reuse_address=True
            )
        except OSError as exc:
            raise EnrolError(
                f"cannot listen for enrolments on {self.host}:{self._requested_port}: "
                f"{exc.strerror or exc}"
            ) from exc
        self._bound_port = int(self._server.sockets[0].getsockname()[1])
        log.info("accepting enrolments on %s:%d", self.host, self._bound_port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._conversations):
            task.cancel()
        await asyncio.gather(*self._conversations, return_exceptions=True)
        with contextlib.suppress(OSError):
            await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> EnrolServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _admit(
        self, task: asyncio.Task[None], key: str, writer: asyncio.StreamWriter
    ) -> str | None:
        """Make room for a new conversation from source ``key``; why not, or None.

        Idle connections must not lock honest joiners out: one source holds at most
        ``max_per_source`` conversations, and when the server is full a newcomer pushes
        out a waiting conversation of the source that holds the most, as long as that
        source holds more than the newcomer's.
        """
        mine = self._by_source.setdefault(key, [])
        if len(mine) >= self._max_per_source:
            return "too many connections from your address, retry later"
        if len(self._conversations) >= self._max_connections:
            crowded = max(self._by_source.values(), key=len)
            victim = next((t for t in crowded if t in self._waiting), None)
            if victim is None or len(crowded) <= len(mine) + 1:
                return "seed is busy, retry later"
            # Closing its connection ends its conversation (its read fails).
            self._writers[victim].close()
            self._forget(victim)
        mine.append(task)
        self._writers[task] = writer
        self._conversations.add(task)
        self._waiting.add(task)
        return None

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._conversations.discard(task)
        self._waiting.discard(task)
        self._writers.pop(task, None)
        for key, tasks in list(self._by_source.items()):
            if task in tasks:
                tasks.remove(task)
                if not tasks:
                    del self._by_source[key]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        try:
            if not self._limiter.allow(source):
                log.debug("enrolment from %s refused: rate limited", source)
                await write_frame(writer, refusal("rate limited: too many attempts, retry later"))
                return
            why = self._admit(task, RateLimiter.source_key(source), writer)
            if why is not None:
                log.debug("enrolment from %s refused: %s", source, why)
                await write_frame(writer, refusal(why))
                return
            async with asyncio.timeout(self._timeout):
                await self._converse(reader, writer, source, accepted=task)
        except TimeoutError:
            log.info("enrolment from %s timed out", source)
        except (OSError, asyncio.IncompleteReadError, EOFError) as exc:
            log.debug("enrolment connection from %s ended: %s", source, exc)
        except asyncio.CancelledError:
            # Only stop() cancels. Ending normally: Python 3.11's stream callback calls
            # task.exception() on a cancelled task and logs a spurious traceback.
            log.debug("enrolment from %s cut off: the server stops", source)
        except Exception:
            # Whatever one client does, the server goes on serving the others.
            log.exception("unexpected failure in an enrolment from %s", source)
        finally:
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()
            self._forget(task)

    async def _converse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        source: str,
        *,
        accepted: asyncio.Task[None],
    ) -> None:
        nonce = os.urandom(NONCE_LEN)
        hello = {"type": "hello", "v": PROTOCOL_VERSION, "nonce": encode_b64(nonce)}
        await write_frame(writer, json.dumps(hello).encode("utf-8"))
        try:
            # A short deadline for the request: an idle connection holds a place.
            async with asyncio.timeout(self._first_frame_timeout):
                body = await read_frame(reader, MAX_REQUEST)
        except IdentityError as exc:
            await self._refuse(writer, source, str(exc))
            return
        self._waiting.discard(accepted)
        # Reading errors (EOF, reset) end the conversation in _accept; from here on, any
        # failure is answered with a reason.
        try:
            request = EnrolRequest.decode(body, nonce=nonce, source=source)
            verify_proof(request)
            self._verify(request)
            outcome = self._on_enrolled(request)
            result = await outcome if inspect.isawaitable(outcome) else outcome
        except EnrolRefused as exc:
            await self._refuse(writer, source, exc.reason, taken=exc.taken)
            return
        except IdentityError as exc:
            await self._refuse(writer, source, str(exc))
            return
        except MeshdError as exc:
            log.warning("enrolment from %s failed on this seed: %s", source, exc)
            await write_frame(writer, refusal("the seed could not add you; see its log"))
            return
        except Exception:
            # A bug in a callback must not kill the server nor leave the joiner guessing.
            log.exception("enrolment from %s failed on this seed", source)
            await write_frame(writer, refusal("the seed failed to add you; see its log"))
            return
        log.info("enrolled %s (%s) from %s", request.name, request.public_key, source)
        await write_frame(writer, result.encode())

    @staticmethod
    async def _refuse(
        writer: asyncio.StreamWriter, source: str, reason: str, *, taken: str | None = None
    ) -> None:
        log.info("refused enrolment from %s: %s", source, reason)
        await write_frame(writer, refusal(reason, taken))
