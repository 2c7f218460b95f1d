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
:func:`meshd.pki.enrol_server.chain_verifier`: chain to the CA, at admission, not revoked), then
``on_enrolled`` — the agent's callback that adds the joiner as a WireGuard peer
and answers with this seed and the members it knows. Because every peer in
the answer comes with its certificate chain, the joiner verifies them against
the token's CA and drops any that do not verify: the answer travels in clear
over TCP, but a man in the middle cannot slip in a peer of its own.

The server (the seed's side) is :mod:`meshd.pki.enrol_server`.

Public API::

    await enrol(host, port, token, cert, endpoint, *, timeout=10.0, now=None) -> EnrolResult
    EnrolRequest (.chain .endpoint .proof .nonce .source .name .public_key .addresses)
    EnrolResult(seed: PeerInfo, members: tuple[PeerInfo, ...]); PeerInfo(chain, endpoint)
    EnrolRequest.decode(data, *, nonce, source)   # IdentityError on anything malformed
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from meshd.b64 import decode_b64, encode_b64
from meshd.binary import BinaryReader, BinaryWriter
from meshd.errors import DecodeError, EnrolError, EnrolRefused, IdentityError
from meshd.hostport import format_host_port
from meshd.pki.certificate import CertChain, Certificate
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
            clean_reason(reason if isinstance(reason, str) else "no reason given"),
            taken=clean_reason(taken) if isinstance(taken, str) else None,
        )
    if kind != expected_type:
        raise IdentityError(f"malformed enrolment message: expected {expected_type!r}")
    return message


def clean_reason(reason: str) -> str:
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


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    length = BinaryReader(await reader.readexactly(4), "frame header").u32()
    if length > limit:
        raise IdentityError(f"message of {length} bytes is larger than {limit}")
    return await reader.readexactly(length)


async def write_frame(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(BinaryWriter().u32(len(body)).raw(body).getvalue())
    await writer.drain()


def refusal(reason: str, taken: str | None = None) -> bytes:
    message = {"type": "refused", "v": PROTOCOL_VERSION, "reason": clean_reason(reason)}
    if taken is not None:
        message["taken"] = taken
    return json.dumps(message).encode("utf-8")


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
        async with asyncio.timeout(timeout):
            return await _ask(host, port, token, chain, endpoint, seed, now)
    except TimeoutError as exc:
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
            hello = _load_json(await read_frame(reader, MAX_HELLO), "hello", refusal_allowed=True)
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
        await write_frame(writer, request.encode())
        try:
            result = EnrolResult.decode(await read_frame(reader, MAX_ANSWER))
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
