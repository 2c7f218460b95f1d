"""Re-join: a member that everybody dropped asks to be taken back, proving it holds its key.

A member whose peer entry every other node removed (a forged *left* or a forged
prune, then no handshake for a while) has no tunnel left: its gossip reaches no
one and it cannot refute anything. It still holds the WireGuard key its
certificate binds, and that is what it proves, over the underlay, to members
whose WireGuard endpoints it knows.

One UDP datagram each way, to the UDP port of the enrolment port's number (the
enrolment server itself is TCP)::

    request  {"type": "rejoin", "v": 2, "sealed": b64(sealed box to "to" of
              {"chain": b64, "endpoint": "host:port"}),
              "to": b64(the member's WireGuard key it asks), "time": unix seconds,
              "nonce": b64(16 bytes), "mac": b64(32 bytes)}
    answer   {"type": "welcome", "v": 1, "key": b64(its WireGuard key), "known": state,
              "nonce": the request's nonce, "mac": b64(32 bytes)}

Both MACs are BLAKE2b keyed with the X25519 secret of the two WireGuard keys
(the requester computes it from its private key and the asked member's public
key, the asked member from its own private key and the key the chain binds):
only the holder of the certified key can make the request, only the asked
member can answer it. The request MAC covers every field; the answer MAC the
request's nonce, the answering key and ``known`` (how the answering member's
gossip saw the requester: "alive", "failed", "left", ..., or "absent").

The chain and the endpoint travel in a sealed box (pynacl's ``SealedBox``: an
ephemeral X25519 key and XSalsa20-Poly1305) to the asked member's WireGuard key,
which is an X25519 key: an observer of the underlay learns neither who asks nor
its mesh addresses. Version 1 requests (the same fields in clear, from members
not upgraded yet) are still taken; requests are sent as version 2.

Replays: a request older or newer than ``MAX_SKEW`` seconds is refused, and a
nonce is accepted once within that window. The chain is then checked as every
chain is (CA, validity, revocations) by the ``on_rejoin`` callback, which adds
the peer. Nothing is answered to a request that fails: no oracle, no
amplification (an answer is smaller than a request). A token bucket per source
(per /64 for IPv6) limits the X25519 and signature work a flood can cost.

Public API::

    RejoinRequest(chain, endpoint, to, time, nonce, mac); .encode()
    RejoinRequest.decode(data, own_private_key)            # opens the sealed part
    RejoinRequest.make(chain, private_key, to, endpoint, *, now=None)
    request.verify(own_private_key)                       # IdentityError if the MAC is wrong
    Welcome(key, known, nonce, mac); .encode(); Welcome.decode(data); welcome.verify(...)
    RejoinServer(host, port, private_key, on_rejoin); await .start(); .port; await .stop()
    await ask_to_rejoin(targets, chain, private_key, endpoint, *, timeout) -> list[Welcome]
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.encoding import RawEncoder
from nacl.exceptions import CryptoError
from nacl.hash import blake2b
from nacl.public import PrivateKey, PublicKey, SealedBox

from meshd.b64 import decode_b64, encode_b64
from meshd.binary import BinaryWriter
from meshd.errors import DecodeError, IdentityError, MeshdError
from meshd.hostport import format_host_port
from meshd.pki.certificate import CertChain
from meshd.pki.enrol_server import RateLimiter
from meshd.pki.token import split_endpoint
from meshd.quietlog import Throttle

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
# Requests: version 2 seals the chain and the endpoint; version 1 is still read.
REQUEST_VERSION = 2
NONCE_LEN = 16
MAC_LEN = 32
KEY_LEN = 32
# A request this far from the receiver's clock (either way) is refused.
MAX_SKEW = 60
MAX_DATAGRAM = 8 * 1024
MAX_KNOWN = 16
# Requests being answered at once (each runs a reconcile pass); more are dropped.
MAX_PENDING = 32
_REQUEST_DOMAIN = b"meshd rejoin request v1\x00"
_ANSWER_DOMAIN = b"meshd rejoin welcome v1\x00"

OnRejoin = Callable[["RejoinRequest"], Awaitable[str]]


def shared_key(private_key: bytes, public_key: bytes) -> bytes:
    """The X25519 secret of two WireGuard keys; IdentityError for a key that makes none."""
    try:
        return bytes(crypto_scalarmult(private_key, public_key))
    except Exception as exc:  # nacl raises its own RuntimeError for a low-order point
        raise IdentityError("a WireGuard key does not make a shared secret") from exc


def _mac(key: bytes, message: bytes) -> bytes:
    return bytes(blake2b(message, digest_size=MAC_LEN, key=key, encoder=RawEncoder))


def _field(message: dict[str, Any], name: str, length: int | None = None) -> bytes:
    try:
        value = decode_b64(message.get(name))
    except DecodeError as exc:
        raise IdentityError(f"malformed re-join message: {name} is {exc}") from exc
    if length is not None and len(value) != length:
        raise IdentityError(f"malformed re-join message: {name} is not {length} bytes")
    return value


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise IdentityError("malformed re-join message: not JSON") from exc
    if not isinstance(message, dict):
        raise IdentityError("malformed re-join message: not a JSON object")
    return message


def _load(
    data: bytes, kind: str, versions: tuple[int, ...] = (PROTOCOL_VERSION,)
) -> dict[str, Any]:
    if len(data) > MAX_DATAGRAM:
        raise IdentityError("malformed re-join message: too long")
    message = _json_object(data)
    version = message.get("v")
    if message.get("type") != kind or isinstance(version, bool) or version not in versions:
        wanted = " or ".join(map(str, versions))
        raise IdentityError(f"malformed re-join message: not a version {wanted} {kind}")
    return message


@dataclass(frozen=True)
class RejoinRequest:
    """A member's request to be taken back as a peer (see the module docstring)."""

    chain: CertChain
    endpoint: str
    to: bytes
    time: int
    nonce: bytes
    mac: bytes = b""

    def signed_part(self) -> bytes:
        chain = self.chain.encode()
        endpoint = self.endpoint.encode("utf-8")
        writer = BinaryWriter().raw(_REQUEST_DOMAIN).u32(len(chain)).raw(chain)
        writer.u32(len(endpoint)).raw(endpoint).raw(self.to).u64(self.time).raw(self.nonce)
        return writer.getvalue()

    @classmethod
    def make(
        cls,
        chain: CertChain,
        private_key: bytes,
        to: bytes,
        endpoint: str,
        *,
        now: int | None = None,
    ) -> RejoinRequest:
        """A request to the member whose WireGuard key is ``to``, MACed with ``private_key``."""
        unsigned = cls(
            chain=chain,
            endpoint=endpoint,
            to=to,
            time=int(time.time()) if now is None else now,
            nonce=os.urandom(NONCE_LEN),
        )
        mac = _mac(shared_key(private_key, to), unsigned.signed_part())
        return cls(unsigned.chain, endpoint, to, unsigned.time, unsigned.nonce, mac)

    def verify(self, own_private_key: bytes) -> None:
        """The sender holds the WireGuard key its chain binds; IdentityError if not."""
        key = shared_key(own_private_key, self.chain.node.public_key_bytes)
        if not hmac.compare_digest(_mac(key, self.signed_part()), self.mac):
            raise IdentityError("the proof of holding the certified WireGuard key does not verify")

    def encode(self) -> bytes:
        """Version 2: the chain and the endpoint sealed to the asked member's key."""
        inner = json.dumps(
            {"chain": encode_b64(self.chain.encode()), "endpoint": self.endpoint}
        ).encode("utf-8")
        try:
            sealed = SealedBox(PublicKey(self.to)).encrypt(inner)
        except CryptoError as exc:
            raise IdentityError("cannot seal a re-join request to that key") from exc
        return json.dumps(
            {
                "type": "rejoin",
                "v": REQUEST_VERSION,
                "sealed": encode_b64(bytes(sealed)),
                "to": encode_b64(self.to),
                "time": self.time,
                "nonce": encode_b64(self.nonce),
                "mac": encode_b64(self.mac),
            }
        ).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes, private_key: bytes) -> RejoinRequest:
        """Parse a request to the member holding ``private_key``, opening its sealed
        part; IdentityError on anything malformed, for another member, or that does
        not open (the MAC is not checked)."""
        message = _load(data, "rejoin", (1, REQUEST_VERSION))
        stamp = message.get("time")
        if isinstance(stamp, bool) or not isinstance(stamp, int) or not 0 <= stamp < 2**63:
            raise IdentityError("malformed re-join message: time is not a timestamp")
        to = _field(message, "to", KEY_LEN)
        if to != bytes(crypto_scalarmult_base(private_key)):
            raise IdentityError("a request for another member")
        if message["v"] == REQUEST_VERSION:
            try:
                inner = SealedBox(PrivateKey(private_key)).decrypt(_field(message, "sealed"))
            except CryptoError as exc:
                raise IdentityError("a re-join request that does not open") from exc
            clear = _json_object(inner)
        else:
            clear = message
        endpoint = clear.get("endpoint")
        if not isinstance(endpoint, str):
            raise IdentityError("malformed re-join message: endpoint is not a string")
        try:
            split_endpoint(endpoint)
        except MeshdError as exc:
            raise IdentityError(f"malformed re-join message: endpoint: {exc}") from exc
        return cls(
            chain=CertChain.decode(_field(clear, "chain")),
            endpoint=endpoint,
            to=to,
            time=stamp,
            nonce=_field(message, "nonce", NONCE_LEN),
            mac=_field(message, "mac", MAC_LEN),
        )


@dataclass(frozen=True)
class Welcome:
    """A member's answer: it took the requester back (``known``: how it saw it before)."""

    key: bytes
    known: str
    nonce: bytes
    mac: bytes = b""

    def signed_part(self) -> bytes:
        known = self.known.encode("utf-8")
        writer = BinaryWriter().raw(_ANSWER_DOMAIN).raw(self.nonce).raw(self.key)
        return writer.u32(len(known)).raw(known).getvalue()

    @classmethod
    def make(cls, request: RejoinRequest, private_key: bytes, known: str) -> Welcome:
        unsigned = cls(bytes(crypto_scalarmult_base(private_key)), known, request.nonce)
        key = shared_key(private_key, request.chain.node.public_key_bytes)
        return cls(unsigned.key, known, request.nonce, _mac(key, unsigned.signed_part()))

    def verify(self, request: RejoinRequest, private_key: bytes) -> None:
        """The answer is to ``request``, from the member it asked; IdentityError if not."""
        if self.key != request.to or self.nonce != request.nonce:
            raise IdentityError("a re-join answer for another request")
        expected = _mac(shared_key(private_key, self.key), self.signed_part())
        if not hmac.compare_digest(expected, self.mac):
            raise IdentityError("a re-join answer that does not verify")

    def encode(self) -> bytes:
        return json.dumps(
            {
                "type": "welcome",
                "v": PROTOCOL_VERSION,
                "key": encode_b64(self.key),
                "known": self.known,
                "nonce": encode_b64(self.nonce),
                "mac": encode_b64(self.mac),
            }
        ).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> Welcome:
        message = _load(data, "welcome")
        known = message.get("known")
        if not isinstance(known, str) or not known.isalpha() or len(known) > MAX_KNOWN:
            raise IdentityError("malformed re-join message: known is not a state")
        return cls(
            key=_field(message, "key", KEY_LEN),
            known=known,
            nonce=_field(message, "nonce", NONCE_LEN),
            mac=_field(message, "mac", MAC_LEN),
        )


class _SeenNonces:
    """Nonces of accepted requests, each kept as long as its request could be replayed."""

    def __init__(self, limit: int = 4096) -> None:
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._limit = limit

    def first_time(self, nonce: bytes, now: float) -> bool:
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        if len(self._seen) >= self._limit:
            self._seen.popitem(last=False)
        self._seen[nonce] = now + 2 * MAX_SKEW
        return True


class RejoinServer(asyncio.DatagramProtocol):
    """Answers re-join requests on UDP ``host:port`` (see the module docstring).

    ``on_rejoin(request)`` is called for a request whose MAC verified and whose time
    and nonce are fresh; it checks the chain, adds the peer and returns how this
    node's gossip saw the requester, or raises MeshdError to refuse (no answer).
    """

    def __init__(
        self,
        host: str,
        port: int,
        private_key: bytes,
        on_rejoin: OnRejoin,
        *,
        burst: float = 5,
        refill_per_second: float = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._private_key = private_key
        self._on_rejoin = on_rejoin
        self._limiter = RateLimiter(burst, refill_per_second)
        self._clock = clock
        self._seen = _SeenNonces()
        self._quiet = Throttle(log)
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.port = port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self.host, self._requested_port), family=_family(self.host)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        log.info("taking members back on %s/udp", format_host_port(self.host, self.port))

    async def stop(self) -> None:
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> RejoinServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        source = str(addr[0])
        if not self._limiter.allow(source) or len(self._pending) >= MAX_PENDING:
            return
        try:
            request = RejoinRequest.decode(data, self._private_key)
            now = self._clock()
            if abs(now - request.time) > MAX_SKEW:
                raise IdentityError(f"a request {now - request.time:+.0f} s off this clock")
            request.verify(self._private_key)
            if not self._seen.first_time(request.nonce, now):
                raise IdentityError("a replayed request")
        except IdentityError as exc:
            self._quiet.warning(source, "refused a re-join request from %s: %s", source, exc)
            return
        task = asyncio.get_running_loop().create_task(self._answer(request, addr))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _answer(self, request: RejoinRequest, addr: tuple[Any, ...]) -> None:
        try:
            known = await self._on_rejoin(request)
        except MeshdError as exc:
            log.info("did not take %s back: %s", request.chain.node.name, exc)
            return
        except Exception:
            log.exception("taking %s back failed on this node", request.chain.node.name)
            return
        if self._transport is not None:
            self._transport.sendto(Welcome.make(request, self._private_key, known).encode(), addr)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@dataclass(frozen=True)
class RejoinTarget:
    """A member to ask: where its enrolment port is (UDP) and its WireGuard key."""

    host: str
    port: int
    public_key: bytes


class _Collector(asyncio.DatagramProtocol):
    def __init__(self, answers: asyncio.Queue[bytes]) -> None:
        self._answers = answers

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._answers.put_nowait(data)


async def ask_to_rejoin(
    targets: Sequence[RejoinTarget],
    chain: CertChain,
    private_key: bytes,
    endpoint: str,
    *,
    timeout: float = 2.0,
    linger: float = 0.3,
    now: int | None = None,
) -> list[Welcome]:
    """Ask every target at once to take this node back; the verified answers.

    Waits for the first answer (at most ``timeout`` seconds), then ``linger`` seconds
    more for others. One datagram each: the caller asks again if nobody answers.
    """
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()
    transports: dict[int, asyncio.DatagramTransport] = {}
    try:
        asked: list[tuple[RejoinTarget, RejoinRequest]] = []
        for target in targets:
            family = _family(target.host)
            if family not in transports:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Collector(answers),
                    family=family,
                    local_addr=("::" if family == socket.AF_INET6 else "0.0.0.0", 0),
                )
                transports[family] = transport
            asked.append(
                (
                    target,
                    RejoinRequest.make(chain, private_key, target.public_key, endpoint, now=now),
                )
            )
        for target, request in asked:
            with contextlib.suppress(OSError):
                transports[_family(target.host)].sendto(
                    request.encode(), (target.host, target.port)
                )
        requests = {request.nonce: request for _, request in asked}
        welcomes: dict[bytes, Welcome] = {}
        deadline = loop.time() + timeout
        while len(welcomes) < len(requests):
            try:
                async with asyncio.timeout_at(deadline):
                    data = await answers.get()
            except TimeoutError:
                break
            try:
                welcome = Welcome.decode(data)
                asked_for = requests.get(welcome.nonce)
                if asked_for is None:
                    raise IdentityError("an answer to no request of ours")
                welcome.verify(asked_for, private_key)
            except IdentityError as exc:
                log.debug("ignored a re-join answer: %s", exc)
                continue
            welcomes[welcome.key] = welcome
            deadline = min(deadline, loop.time() + linger)
        return list(welcomes.values())
    finally:
        for transport in transports.values():
            transport.close()
