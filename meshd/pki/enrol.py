"""The enrolment protocol: how a new machine with a join token is admitted by a seed.

One TCP connection to the seed's enrolment port (underlay). Every frame is a
4-byte big-endian length and a body. The hello is the only frame in clear; the
rest is a Noise handshake (``Noise_NXpsk0_25519_ChaChaPoly_BLAKE2b``,
:mod:`meshd.pki.noise`) and messages it encrypts:

1. seed -> joiner, clear: ``{"type": "hello", "v": 2, "noise": NOISE_PROTOCOL}``
   (or a ``refused``: rate limited, busy). Its bytes are the handshake's prologue,
   so a changed hello fails the handshake.
2. joiner -> seed: Noise message 1 (``psk, e``). The psk is :func:`enrolment_psk`
   of the token's gossip key and CA key: only a holder of a current token or a
   member can make or read the messages that follow.
3. seed -> joiner: ``b"N"`` + Noise message 2 (``e, ee, s, es``), whose static key
   is the seed's WireGuard key and whose encrypted payload is the seed's
   certificate chain. The joiner checks, before it says anything about itself,
   that the chain leads to the token's CA and binds that very key: the seed is
   a member. Or ``b"R"`` + a clear ``refused`` when message 1 does not verify
   (wrong token, replayed, garbage): one fixed reason for every cause.
4. joiner -> seed, encrypted: ``{"type": "enrol", "v": 2, "chain": b64(CertChain),
   "endpoint": "host:port", "proof": b64(sig)}``: the joiner's node certificate
   signed with the token's enrolment key, with the enrolment certificate; its
   WireGuard endpoint; and ``proof``, the enrolment key's signature over the
   handshake hash, the chain and the endpoint (:func:`proof_message`), which
   shows the joiner holds the token *now* and binds the request to this
   handshake (a replay or a relay to another seed fails).
5. seed -> joiner, encrypted: ``{"type": "welcome", "v": 2, "seed": peer, "members":
   [peer...]}`` or ``{"type": "refused", "v": 2, "reason": "one line"}``; a peer is
   ``{"chain": b64(CertChain), "endpoint": "host:port" | null}``.

An encrypted frame is the plaintext's length (4 bytes, checked against the
limit before anything is read), then the plaintext in Noise transport messages
of at most 65,535 bytes, each authenticated with the length and its index as
associated data, so a cut or reordered frame does not decrypt.

The seed checks the proof itself, then calls ``verify`` (normally
:func:`meshd.pki.enrol_server.chain_verifier`: chain to the CA, at admission, not revoked), then
``on_enrolled`` — the agent's callback that adds the joiner as a WireGuard peer
and answers with this seed and the members it knows. Because every peer in
the answer comes with its certificate chain, the joiner verifies them against
the token's CA and drops any that do not verify.

The server (the seed's side) is :mod:`meshd.pki.enrol_server`.

Public API::

    await enrol(host, port, token, cert, endpoint, *, timeout=10.0, now=None) -> EnrolResult
    EnrolRequest (.chain .endpoint .proof .nonce .source .name .public_key .addresses)
    EnrolResult(seed: PeerInfo, members: tuple[PeerInfo, ...]); PeerInfo(chain, endpoint)
    EnrolRequest.decode(data, *, nonce, source)   # IdentityError on anything malformed
    SeedIdentity(private_key, chain, gossip_keys, ca_public_key); enrolment_psk(gossip_key, ca)
    await seed_handshake(reader, writer, *, gossip_key, ca_public_key, seed, now)
        -> (SecureChannel, seed's CertChain)   # the client's side, for any request
    SecureChannel .read_frame(limit) .write_frame(body) .binding .remote_key
    read_frame(reader, limit), write_frame(writer, body)   # the clear framing
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from meshd.b64 import decode_b64, encode_b64
from meshd.binary import BinaryReader, BinaryWriter
from meshd.errors import DecodeError, EnrolError, EnrolRefused, IdentityError
from meshd.hostport import format_host_port
from meshd.pki.certificate import CertChain, Certificate, network_id_of
from meshd.pki.noise import MAX_MESSAGE, TAGLEN, CipherState, Handshake, HandshakeError
from meshd.pki.token import Token, split_endpoint
from meshd.types import IPAddress

log = logging.getLogger(__name__)

DEFAULT_ENROL_PORT = 7947
PROTOCOL_VERSION = 2
NOISE_PATTERN = "NXpsk0"
NOISE_PROTOCOL = "Noise_NXpsk0_25519_ChaChaPoly_BLAKE2b"
# What the proof binds: the handshake hash (BLAKE2b, 64 bytes).
NONCE_LEN = 64
# Noise message 1 is 48 bytes; message 2 carries the seed's chain (under 2 KiB).
MAX_HANDSHAKE = 16 * 1024
MAX_REQUEST = 16 * 1024
MAX_HELLO = 1024
# Each peer in an answer is ~500 bytes of base64; this allows hundreds.
MAX_ANSWER = 512 * 1024
MAX_MEMBERS_IN_ANSWER = 256
MAX_REASON = 300
_PROOF_DOMAIN = b"meshd enrol proof v2\x00"
_PSK_PERSON = b"meshd-enrol-psk"
# Frame kinds of the seed's answer to Noise message 1.
HANDSHAKE_MESSAGE = b"N"
HANDSHAKE_REFUSED = b"R"
# The one reason a seed gives when message 1 does not verify, whatever the cause:
# it tells a prober nothing it did not know.
HANDSHAKE_REFUSAL = (
    "the enrolment handshake failed: the token is not for this seed's network, "
    "or names a CA key the network retired ('meshd ca retire'), or the network's "
    "gossip key was rotated since the token was made"
)
_CHUNK = MAX_MESSAGE - TAGLEN


def enrolment_psk(gossip_key: bytes, ca_public_key: bytes) -> bytes:
    """The Noise psk of enrolment: a hash of the network's CA key keyed with the gossip key.

    Every token carries the gossip key, every member holds it: it is the one secret
    a joiner and any seed share. Hashed, so the gossip key itself is never a cipher key.
    """
    return hashlib.blake2b(
        ca_public_key, key=gossip_key, digest_size=32, person=_PSK_PERSON
    ).digest()


@dataclass(frozen=True)
class SeedIdentity:
    """What a seed proves itself with: its WireGuard private key, its chain, the gossip
    keys it accepts a handshake under (current first) and the network's CA key."""

    private_key: bytes = field(repr=False)
    chain: CertChain
    gossip_keys: tuple[bytes, ...] = field(repr=False)
    ca_public_key: bytes
    # The other CA key trusted while the CA is rotated: a token names either one.
    other_ca_keys: tuple[bytes, ...] = ()

    def psks(self) -> tuple[bytes, ...]:
        cas = (self.ca_public_key, *self.other_ca_keys)
        return tuple(enrolment_psk(k, ca) for ca in cas for k in self.gossip_keys)


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


class SecureChannel:
    """Frames encrypted with the cipher states of a finished handshake.

    ``binding`` is the handshake hash (what the joiner's proof signs); ``remote_key``
    the other side's static key if the pattern has one.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handshake: Handshake,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._send, self._receive = handshake.split()
        self.binding = handshake.handshake_hash
        self.remote_key = handshake.remote_static

    async def write_frame(self, body: bytes) -> None:
        self._writer.write(seal_frame(self._send, body))
        await self._writer.drain()

    async def read_frame(self, limit: int) -> bytes:
        """One frame's plaintext; IdentityError if over ``limit``, HandshakeError if tampered."""
        length = BinaryReader(await self._reader.readexactly(4), "frame header").u32()
        if length > limit:
            raise IdentityError(f"message of {length} bytes is larger than {limit}")
        parts = []
        for index, size in enumerate(_chunk_sizes(length)):
            sealed = await self._reader.readexactly(size + TAGLEN)
            parts.append(self._receive.decrypt(sealed, _chunk_ad(length, index)))
        return b"".join(parts)


def _chunk_sizes(length: int) -> list[int]:
    sizes = [_CHUNK] * (length // _CHUNK)
    if length % _CHUNK or not sizes:
        sizes.append(length % _CHUNK)
    return sizes


def _chunk_ad(length: int, index: int) -> bytes:
    return BinaryWriter().u32(length).u32(index).getvalue()


def seal_frame(cipher: CipherState, body: bytes) -> bytes:
    """An encrypted frame: the length, then the body in Noise transport messages."""
    out = BinaryWriter().u32(len(body))
    offset = 0
    for index, size in enumerate(_chunk_sizes(len(body))):
        out.raw(cipher.encrypt(body[offset : offset + size], _chunk_ad(len(body), index)))
        offset += size
    return out.getvalue()


def hello_frame() -> bytes:
    return json.dumps({"type": "hello", "v": PROTOCOL_VERSION, "noise": NOISE_PROTOCOL}).encode()


def respond_handshake(
    hello: bytes, message1: bytes, identity: SeedIdentity, seen: Callable[[bytes], bool]
) -> tuple[Handshake, bytes]:
    """The seed's side: read Noise message 1 under each accepted psk, answer message 2.

    ``seen(ephemeral)`` is True for an ephemeral key already used (a replayed message 1).
    HandshakeError, the same for every cause, if message 1 does not verify.
    """
    for psk in identity.psks():
        handshake = Handshake(
            NOISE_PATTERN,
            initiator=False,
            prologue=hello,
            static_key=identity.private_key,
            psk=psk,
        )
        try:
            handshake.read_message(message1)
        except HandshakeError:
            continue
        if seen(message1[:32]):
            break
        return handshake, handshake.write_message(identity.chain.encode())
    raise HandshakeError(HANDSHAKE_REFUSAL)


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
    except IdentityError as exc:
        # A frame over its limit, or a tampered one after the handshake.
        raise EnrolError(f"seed {seed} sent a bad message ({exc})") from exc


async def _ask(
    host: str, port: int, token: Token, chain: CertChain, endpoint: str, seed: str, now: int
) -> EnrolResult:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        channel, seed_chain = await seed_handshake(
            reader,
            writer,
            gossip_key=token.gossip_key,
            ca_public_key=token.ca_public_key,
            seed=seed,
            now=now,
        )
        encoded = chain.encode()
        request = EnrolRequest(
            chain=chain,
            endpoint=endpoint,
            proof=token.enrolment.sign(proof_message(channel.binding, encoded, endpoint)),
        )
        await channel.write_frame(request.encode())
        try:
            result = EnrolResult.decode(await channel.read_frame(MAX_ANSWER))
        except IdentityError as exc:
            raise EnrolError(f"seed {seed} sent a malformed answer ({exc})") from exc
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if result.seed.public_key != seed_chain.node.public_key:
        raise EnrolError(f"seed {seed} answered for another member ({result.seed.name!r})")
    return _verified(result, token, seed, now)


async def seed_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    gossip_key: bytes,
    ca_public_key: bytes,
    seed: str,
    now: int,
) -> tuple[SecureChannel, CertChain]:
    """The client's side of the handshake with a seed (``seed`` names it in errors);
    the encrypted channel and the seed's chain, verified to be a member's.

    A joiner takes ``gossip_key`` and ``ca_public_key`` from its token; a member
    (e.g. asking to be taken back) from its own state. EnrolError (the seed is not a
    member, does not speak this protocol), EnrolRefused (its clear refusal).
    """
    hello_body = await read_frame(reader, MAX_HELLO)
    try:
        hello = _load_json(hello_body, "hello", refusal_allowed=True)
    except IdentityError as exc:
        raise EnrolError(f"seed {seed} does not speak this meshd enrolment ({exc})") from exc
    if hello.get("noise") != NOISE_PROTOCOL:
        raise EnrolError(f"seed {seed} does not offer {NOISE_PROTOCOL}")
    handshake = Handshake(
        NOISE_PATTERN,
        initiator=True,
        prologue=hello_body,
        psk=enrolment_psk(gossip_key, ca_public_key),
    )
    await write_frame(writer, handshake.write_message())
    answer = await read_frame(reader, MAX_HANDSHAKE)
    kind, body = answer[:1], answer[1:]
    if kind == HANDSHAKE_REFUSED:
        try:
            _load_json(body, "refused", refusal_allowed=True)
        except IdentityError as exc:
            raise EnrolError(f"seed {seed} sent a malformed refusal ({exc})") from exc
        raise EnrolError(f"seed {seed} sent a malformed refusal")
    not_member = f"seed {seed} is not a member of network {network_id_of(ca_public_key)}"
    try:
        if kind != HANDSHAKE_MESSAGE:
            raise HandshakeError("not a handshake message")
        payload = handshake.read_message(body)
    except HandshakeError as exc:
        raise EnrolError(
            f"{not_member}: its handshake does not verify with this token's keys"
        ) from exc
    try:
        seed_chain = CertChain.decode(payload)
        seed_chain.verify(ca_public_key, now)
    except IdentityError as exc:
        raise EnrolError(f"{not_member}: {exc}") from exc
    if seed_chain.node.public_key_bytes != handshake.remote_static:
        raise EnrolError(
            f"{not_member}: it shows the certificate of {seed_chain.node.name!r} "
            "without holding that member's key"
        )
    return SecureChannel(reader, writer, handshake), seed_chain


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
