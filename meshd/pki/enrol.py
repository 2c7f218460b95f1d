"""The enrolment protocol: how a new machine with a join token is admitted by a seed.

One TCP connection to the seed's enrolment port (underlay), three frames, each
a 4-byte big-endian length followed by UTF-8 JSON:

1. seed -> joiner ``{"type": "hello", "v": 1, "nonce": b64(32 random bytes)}``
2. joiner -> seed ``{"type": "enrol", "v": 1, "chain": b64(CertChain), "endpoint":
   "host:port", "proof": b64(sig)}`` — the joiner's node certificate, signed
   with the token's enrolment key, with the enrolment certificate; its
   WireGuard endpoint; and ``proof``, the enrolment key's signature over the
   nonce, the chain and the endpoint (:func:`proof_message`), which shows the
   joiner holds the token *now* and binds the request to this connection.
3. seed -> joiner ``{"type": "welcome", "v": 1, "seed": peer, "members": [peer...]}``
   or ``{"type": "refused", "v": 1, "reason": "one line"}``; a peer is
   ``{"chain": b64(CertChain), "endpoint": "host:port" | null}``.

The seed checks the proof itself, then calls ``verify`` (normally
:func:`chain_verifier`: chain to the CA, at admission, not revoked), then
``on_enrolled`` — the agent's callback that adds the joiner as a WireGuard peer
and answers with this seed and the members it knows. Because every peer in
the answer comes with its certificate chain, the joiner verifies them against
the token's CA and drops any that do not verify: the answer travels in clear
over TCP, but a man in the middle cannot slip in a peer of its own.

Defences of the server: a token bucket per source address (per /64 for IPv6)
refuses floods before any work, at most ``max_connections`` conversations at
once, a request frame of at most :data:`MAX_REQUEST` bytes, and a deadline for
the whole conversation. Garbage is answered with ``refused`` and the
connection closed; nothing a client sends can stop the server.

Public API::

    EnrolServer(host, port, verify, on_enrolled, *, burst, refill_per_second, timeout,
                max_connections); await .start(); .port; await .stop(); async with
    chain_verifier(ca_public_key, *, revoked=None, clock=time.time) -> Verifier
    await enrol(host, port, token, cert, endpoint, *, timeout=10.0, now=None) -> EnrolResult
    EnrolRequest (.chain .endpoint .proof .nonce .source .name .public_key .addresses)
    EnrolResult(seed: PeerInfo, members: tuple[PeerInfo, ...]); PeerInfo(chain, endpoint)
    EnrolRequest.decode(data, *, nonce, source)   # IdentityError on anything malformed
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from meshd.b64 import decode_b64, encode_b64
from meshd.binary import BinaryReader, BinaryWriter
from meshd.errors import DecodeError, EnrolError, EnrolRefused, IdentityError, MeshdError
from meshd.hostport import format_host_port
from meshd.pki.certificate import CertChain, Certificate
from meshd.pki.revocation import RevocationList
from meshd.pki.token import Token, split_endpoint
from meshd.types import IPAddress

log = logging.getLogger(__name__)

DEFAULT_ENROL_PORT = 7947
PROTOCOL_VERSION = 1
NONCE_LEN = 32
MAX_REQUEST = 16 * 1024
MAX_HELLO = 1024
# Each peer in an answer is ~500 bytes of base64; this allows hundreds.
MAX_ANSWER = 512 * 1024
MAX_MEMBERS_IN_ANSWER = 256
MAX_REASON = 300
_PROOF_DOMAIN = b"meshd enrol proof v1\x00"


def proof_message(nonce: bytes, chain: bytes, endpoint: str) -> bytes:
    """What the enrolment key signs to prove the joiner holds the token on this connection."""
    endpoint_bytes = endpoint.encode("utf-8")
    return (
        BinaryWriter()
        .raw(_PROOF_DOMAIN)
        .raw(nonce)
        .u32(len(chain))
        .raw(chain)
        .u32(len(endpoint_bytes))
        .raw(endpoint_bytes)
        .getvalue()
    )


def _unb64(value: object, what: str) -> bytes:
    try:
        return decode_b64(value)
    except DecodeError as exc:
        raise IdentityError(f"malformed enrolment message: {what} is {exc}") from exc


def _load_json(data: bytes, expected_type: str, *, refusal_allowed: bool = False) -> dict[str, Any]:
    try:
        message = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # RecursionError: a few kilobytes of "[[[[" are enough to reach it.
        raise IdentityError("malformed enrolment message: not JSON") from exc
    if not isinstance(message, dict):
        raise IdentityError("malformed enrolment message: not a JSON object")
    if message.get("v") != PROTOCOL_VERSION:
        raise IdentityError(f"unsupported enrolment protocol version {message.get('v')!r}")
    kind = message.get("type")
    if kind == "refused" and refusal_allowed:
        reason = message.get("reason")
        taken = message.get("taken")
        raise EnrolRefused(
            _clean_reason(reason if isinstance(reason, str) else "no reason given"),
            taken=_clean_reason(taken) if isinstance(taken, str) else None,
        )
    if kind != expected_type:
        raise IdentityError(f"malformed enrolment message: expected {expected_type!r}")
    return message


def _clean_reason(reason: str) -> str:
    # The reason comes from the other side and is printed to a terminal.
    printable = "".join(ch if ch.isprintable() else "?" for ch in reason)
    return printable[:MAX_REASON]


def _endpoint(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise IdentityError(f"malformed enrolment message: {what} is not a string")
    split_endpoint(value)
    return value


class _ChainedNode:
    """The node a certificate chain vouches for: its name, WireGuard key and addresses."""

    chain: CertChain

    @property
    def name(self) -> str:
        return self.chain.node.name

    @property
    def public_key(self) -> str:
        return self.chain.node.public_key

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        return self.chain.node.addresses


@dataclass(frozen=True)
class EnrolRequest(_ChainedNode):
    """A joiner's request as the seed received it (``nonce`` and ``source`` set by the seed)."""

    chain: CertChain
    endpoint: str
    proof: bytes
    nonce: bytes = b""
    source: str = ""

    def encode(self) -> bytes:
        return json.dumps(
            {
                "type": "enrol",
                "v": PROTOCOL_VERSION,
                "chain": encode_b64(self.chain.encode()),
                "endpoint": self.endpoint,
                "proof": encode_b64(self.proof),
            }
        ).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes, *, nonce: bytes = b"", source: str = "") -> EnrolRequest:
        """Parse a request frame; IdentityError on anything malformed."""
        message = _load_json(data, "enrol")
        chain = CertChain.decode(_unb64(message.get("chain"), "chain"))
        proof = _unb64(message.get("proof"), "proof")
        if len(proof) != 64:
            raise IdentityError("malformed enrolment message: proof is not a signature")
        return cls(
            chain=chain,
            endpoint=_endpoint(message.get("endpoint"), "endpoint"),
            proof=proof,
            nonce=nonce,
            source=source,
        )


def verify_proof(request: EnrolRequest) -> None:
    """Check the request's proof: the enrolment key that signed the certificate signed the nonce."""
    if not request.chain.issuers:
        raise IdentityError(
            "enrolment needs a certificate signed with a join token's enrolment key"
        )
    message = proof_message(request.nonce, request.chain.encode(), request.endpoint)
    try:
        VerifyKey(request.chain.issuers[0].public_key_bytes).verify(message, request.proof)
    except (BadSignatureError, ValueError, TypeError) as exc:
        raise IdentityError("the proof of holding the token does not verify") from exc


@dataclass(frozen=True)
class PeerInfo(_ChainedNode):
    """A member as the joiner learns it: its certificate chain and its WireGuard endpoint."""

    chain: CertChain
    endpoint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"chain": encode_b64(self.chain.encode()), "endpoint": self.endpoint}

    @classmethod
    def from_json(cls, value: Any) -> PeerInfo:
        if not isinstance(value, dict):
            raise IdentityError("malformed enrolment message: a peer is not an object")
        endpoint = value.get("endpoint")
        return cls(
            chain=CertChain.decode(_unb64(value.get("chain"), "peer chain")),
            endpoint=None if endpoint is None else _endpoint(endpoint, "peer endpoint"),
        )


@dataclass(frozen=True)
class EnrolResult:
    """What the joiner needs to bring its tunnel up: the seed and the other members known."""

    seed: PeerInfo
    members: tuple[PeerInfo, ...] = ()

    def encode(self) -> bytes:
        return json.dumps(
            {
                "type": "welcome",
                "v": PROTOCOL_VERSION,
                "seed": self.seed.to_json(),
                "members": [m.to_json() for m in self.members[:MAX_MEMBERS_IN_ANSWER]],
            }
        ).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> EnrolResult:
        """Parse a welcome frame; IdentityError if malformed, EnrolRefused for a refusal."""
        message = _load_json(data, "welcome", refusal_allowed=True)
        members = message.get("members", [])
        if not isinstance(members, list) or len(members) > MAX_MEMBERS_IN_ANSWER:
            raise IdentityError("malformed enrolment message: bad member list")
        return cls(
            seed=PeerInfo.from_json(message.get("seed")),
            members=tuple(PeerInfo.from_json(m) for m in members),
        )


Verifier = Callable[[EnrolRequest], None]
OnEnrolled = Callable[[EnrolRequest], "EnrolResult | Awaitable[EnrolResult]"]


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


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    length = BinaryReader(await reader.readexactly(4), "frame header").u32()
    if length > limit:
        raise IdentityError(f"message of {length} bytes is larger than {limit}")
    return await reader.readexactly(length)


async def _write_frame(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(BinaryWriter().u32(len(body)).raw(body).getvalue())
    await writer.drain()


def _refusal(reason: str, taken: str | None = None) -> bytes:
    message = {"type": "refused", "v": PROTOCOL_VERSION, "reason": _clean_reason(reason)}
    if taken is not None:
        message["taken"] = taken
    return json.dumps(message).encode("utf-8")


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
                await _write_frame(writer, _refusal("rate limited: too many attempts, retry later"))
                return
            refusal = self._admit(task, RateLimiter.source_key(source), writer)
            if refusal is not None:
                log.debug("enrolment from %s refused: %s", source, refusal)
                await _write_frame(writer, _refusal(refusal))
                return
            await asyncio.wait_for(
                self._converse(reader, writer, source, accepted=task), self._timeout
            )
        except asyncio.TimeoutError:
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
        await _write_frame(writer, json.dumps(hello).encode("utf-8"))
        try:
            # A short deadline for the request: an idle connection holds a place.
            body = await asyncio.wait_for(
                _read_frame(reader, MAX_REQUEST), self._first_frame_timeout
            )
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
            await _write_frame(writer, _refusal("the seed could not add you; see its log"))
            return
        except Exception:
            # A bug in a callback must not kill the server nor leave the joiner guessing.
            log.exception("enrolment from %s failed on this seed", source)
            await _write_frame(writer, _refusal("the seed failed to add you; see its log"))
            return
        log.info("enrolled %s (%s) from %s", request.name, request.public_key, source)
        await _write_frame(writer, result.encode())

    @staticmethod
    async def _refuse(
        writer: asyncio.StreamWriter, source: str, reason: str, *, taken: str | None = None
    ) -> None:
        log.info("refused enrolment from %s: %s", source, reason)
        await _write_frame(writer, _refusal(reason, taken))


async def enrol(
    host: str,
    port: int,
    token: Token,
    cert: Certificate,
    endpoint: str,
    *,
    timeout: float = 10.0,
    now: int | None = None,
) -> EnrolResult:
    """Ask the seed at ``host:port`` to admit this node; the verified answer.

    ``cert`` is this node's certificate signed with ``token.enrolment``;
    ``endpoint`` is where the seed can reach this node's WireGuard port.
    Raises EnrolError (unreachable, timeout, bad answer), EnrolRefused (with the
    seed's reason), IdentityError (our own certificate does not fit the token).
    """
    now = int(time.time()) if now is None else now
    chain = CertChain(cert, (token.enrolment.cert,))
    chain.verify(token.ca_public_key, now, at_admission=True)
    split_endpoint(endpoint)
    seed = format_host_port(host, port)
    try:
        return await asyncio.wait_for(_ask(host, port, token, chain, endpoint, seed, now), timeout)
    except asyncio.TimeoutError as exc:
        raise EnrolError(f"seed {seed} did not answer within {timeout:g} s") from exc
    except ConnectionRefusedError as exc:
        raise EnrolError(
            f"cannot reach seed {seed}: connection refused (is its enrolment port open?)"
        ) from exc
    except asyncio.IncompleteReadError as exc:
        raise EnrolError(f"seed {seed} closed the connection mid-answer") from exc
    except OSError as exc:
        raise EnrolError(f"cannot reach seed {seed}: {exc.strerror or exc}") from exc
    except EnrolRefused as exc:
        raise EnrolRefused(exc.reason, seed=seed) from None


async def _ask(
    host: str, port: int, token: Token, chain: CertChain, endpoint: str, seed: str, now: int
) -> EnrolResult:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        try:
            hello = _load_json(await _read_frame(reader, MAX_HELLO), "hello", refusal_allowed=True)
            nonce = _unb64(hello.get("nonce"), "nonce")
        except IdentityError as exc:
            raise EnrolError(f"seed {seed} does not speak meshd enrolment ({exc})") from exc
        if len(nonce) != NONCE_LEN:
            raise EnrolError(f"seed {seed} sent a bad nonce")
        encoded = chain.encode()
        request = EnrolRequest(
            chain=chain,
            endpoint=endpoint,
            proof=token.enrolment.sign(proof_message(nonce, encoded, endpoint)),
        )
        await _write_frame(writer, request.encode())
        try:
            result = EnrolResult.decode(await _read_frame(reader, MAX_ANSWER))
        except IdentityError as exc:
            raise EnrolError(f"seed {seed} sent a malformed answer ({exc})") from exc
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return _verified(result, token, seed, now)


def _verified(result: EnrolResult, token: Token, seed: str, now: int) -> EnrolResult:
    try:
        result.seed.chain.verify(token.ca_public_key, now)
    except IdentityError as exc:
        raise EnrolError(
            f"seed {seed} is not a member of network {token.network_id}: {exc}"
        ) from exc
    members = []
    for member in result.members:
        try:
            member.chain.verify(token.ca_public_key, now)
        except IdentityError as exc:
            log.warning("seed %s named member %r that does not verify: %s", seed, member.name, exc)
            continue
        members.append(member)
    return EnrolResult(seed=result.seed, members=tuple(members))
