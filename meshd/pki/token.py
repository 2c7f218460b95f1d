"""Join tokens: everything a new machine needs to enter a network, in one line of text.

A token carries the network's name, CA public key (the network id is derived
from it), gossip encryption key, address ranges, the seeds to contact (each:
underlay WireGuard endpoint ``host:port``, enrolment port, WireGuard public key,
mesh address), and an enrolment key — the private half of a short-lived,
CA-signed Ed25519 key with which the new machine signs its own node certificate,
so joining works while the CA machine is offline. The CA signs the whole token.

Text form: ``meshd1-`` followed by the unpadded base64url of the binary
encoding (:mod:`meshd.binary`, as certificates use). Whitespace (line wrapping
in an e-mail) is ignored. :func:`parse_token` refuses, with one line saying
which: text that is not a meshd token, a damaged one, one whose signature does
not match (tampered), an expired one; :func:`check_network` refuses a token for
another network.

**A token is a bearer secret.** Anyone holding it can join the network and read
its gossip until it expires. Keep it in a 0600 file, pass it through a file,
stdin or an environment variable (:func:`read_token_source`), never argv.

What a token can and cannot limit without a server:

- it *can* expire: the enrolment key and the token carry ``expires_at``; seeds
  refuse enrolment after it, whatever the joiner's clock says;
- it *can* be cut off early: revoke its enrolment certificate's serial
  (``ca.revoke(token.enrolment.cert)``) and every member refuses it and the
  node certificates made with it;
- it *cannot* be single-use or count its uses: no one place sees every join;
- it *cannot* bind the machine that uses it or the name it picks: any holder
  may enrol under any free name (the lead's agent may refuse a taken name);
- the CA signature protects against damage and tampering, not substitution: a
  whole different token signed by another CA verifies against its own key. A
  joiner that already knows the network id pins it with :func:`check_network`.

Public API::

    create_token(ca, *, gossip_key, cidr4, cidr6, seeds, ttl, node_lifetime, now) -> Token
    Token.encode() -> str                 # the "meshd1-..." line
    parse_token(text, now) -> Token       # TokenError on garbage/damaged/tampered/expired
    check_network(token, network_id)      # TokenError on a foreign network
    read_token_source(source) -> str      # a path, "-" (stdin), "env:NAME", None (MESHD_TOKEN)
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import ClassVar, TextIO

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from meshd.binary import BinaryReader, BinaryWriter
from meshd.errors import DecodeError, IdentityError, TokenError
from meshd.hostport import parse_host_port
from meshd.identity import decode_key, encode_key
from meshd.pki.ca import EnrolmentKey, NetworkCA
from meshd.pki.certificate import (
    CLOCK_SKEW,
    DEFAULT_NODE_LIFETIME,
    KEY_LEN,
    SIGNATURE_LEN,
    Certificate,
    Role,
    SignedValue,
    network_id_of,
    read_name,
)
from meshd.pki.certificate import verify as verify_cert
from meshd.timetext import ago, utc
from meshd.types import IPAddress, Network

log = logging.getLogger(__name__)

TOKEN_PREFIX = "meshd1-"
TOKEN_ENV = "MESHD_TOKEN"
MAX_SEEDS = 16
# Far above any real token (~700 characters with a few seeds); bounds the work on garbage.
MAX_TOKEN_CHARS = 16384
_MAGIC = b"MT"
_FORMAT_VERSION = 1


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); IdentityError if malformed."""
    try:
        return parse_host_port(endpoint)
    except DecodeError as exc:
        raise IdentityError(f"endpoint {exc}") from exc


@dataclass(frozen=True)
class Seed:
    """A member a new machine can enrol with: where to reach it and who it is."""

    endpoint: str
    enrol_port: int
    public_key: str
    address: IPAddress

    def __post_init__(self) -> None:
        split_endpoint(self.endpoint)
        if len(self.endpoint) > 255:  # a token holds it as a short text field
            raise IdentityError(f"endpoint {self.endpoint[:40]!r}... is over 255 characters")
        if not 0 < self.enrol_port < 65536:
            raise IdentityError(f"enrolment port {self.enrol_port} out of range")
        decode_key(self.public_key, what="seed public key")

    @property
    def enrol_host(self) -> str:
        """The host of the enrolment port: the seed's underlay host."""
        return split_endpoint(self.endpoint)[0]


@dataclass(frozen=True)
class Token(SignedValue):
    """A parsed, signature-checked join token. ``gossip_key`` and ``enrolment`` are secret."""

    network_name: str
    ca_public_key: bytes
    gossip_key: bytes = field(repr=False)
    cidr4: IPv4Network
    cidr6: IPv6Network | None
    seeds: tuple[Seed, ...]
    enrolment: EnrolmentKey = field(repr=False)
    issued_at: int
    expires_at: int
    signature: bytes = field(default=b"", repr=False)
    kind: ClassVar[str] = "token"

    @property
    def network_id(self) -> str:
        return network_id_of(self.ca_public_key)

    @property
    def network(self) -> Network:
        return Network(
            name=self.network_name, network_id=self.network_id, cidr4=self.cidr4, cidr6=self.cidr6
        )

    def signed_part(self) -> bytes:
        writer = (
            BinaryWriter()
            .header(_MAGIC, _FORMAT_VERSION)
            .text(self.network_name)
            .raw(self.ca_public_key)
            .raw(self.gossip_key)
            .raw(self.cidr4.network_address.packed)
            .u8(self.cidr4.prefixlen)
        )
        if self.cidr6 is None:
            writer.u8(0)
        else:
            writer.u8(1).raw(self.cidr6.network_address.packed).u8(self.cidr6.prefixlen)
        writer.u64(self.issued_at).u64(self.expires_at).u8(len(self.seeds))
        for seed in self.seeds:
            writer.text(seed.endpoint).u16(seed.enrol_port)
            writer.raw(decode_key(seed.public_key, what="seed public key")).address(seed.address)
        writer.raw(self.enrolment.secret).long_bytes(self.enrolment.cert.encode())
        return writer.getvalue()

    def encode(self) -> str:
        """The one-line text form, ``meshd1-...``."""
        if len(self.signature) != SIGNATURE_LEN:
            raise TokenError("cannot encode an unsigned token")
        raw = self.signed_part() + self.signature
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def create_token(
    ca: NetworkCA,
    *,
    gossip_key: bytes,
    cidr4: IPv4Network,
    cidr6: IPv6Network | None = None,
    seeds: Iterable[Seed],
    ttl: int,
    node_lifetime: int = DEFAULT_NODE_LIFETIME,
    now: int | None = None,
) -> Token:
    """A token valid ``ttl`` s from ``now``, with a fresh enrolment key of the same lifetime."""
    now = int(time.time()) if now is None else now
    if len(gossip_key) != KEY_LEN:
        raise TokenError(f"the gossip key must be {KEY_LEN} bytes, got {len(gossip_key)}")
    seed_list = tuple(seeds)
    if len(seed_list) > MAX_SEEDS:
        raise TokenError(f"a token holds at most {MAX_SEEDS} seeds")
    enrolment = ca.issue_enrolment_key(lifetime=ttl, node_lifetime=node_lifetime, now=now)
    unsigned = Token(
        network_name=ca.name,
        ca_public_key=ca.public_key,
        gossip_key=bytes(gossip_key),
        cidr4=cidr4,
        cidr6=cidr6,
        seeds=seed_list,
        enrolment=enrolment,
        issued_at=now,
        expires_at=enrolment.cert.not_after,
    )
    return unsigned.signed_by(ca.signing_key)


def _decode_text(text: str) -> bytes:
    compact = "".join(text.split())
    if not compact.startswith(TOKEN_PREFIX):
        raise TokenError(f"not a meshd join token (a token starts with {TOKEN_PREFIX!r})")
    if len(compact) > MAX_TOKEN_CHARS:
        raise TokenError("not a meshd join token (far too long)")
    body = compact[len(TOKEN_PREFIX) :]
    if not body.isascii() or not re.fullmatch(r"[A-Za-z0-9_-]*", body) or len(body) % 4 == 1:
        raise TokenError("token is damaged: it is not base64url text (was it cut or mangled?)")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError("token is damaged: it is not base64url text") from exc
    # Unused low bits of the last character are ignored by the decoder; insist on the
    # one canonical spelling so that changing any character is noticed.
    if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != body:
        raise TokenError("token is damaged: it is not canonical base64url text")
    return raw


def _read_token(raw: bytes) -> Token:
    reader = BinaryReader(raw, "token")
    reader.header(_MAGIC, _FORMAT_VERSION)
    network_name = read_name(reader, "network name")
    ca_public_key = reader.raw(KEY_LEN)
    gossip_key = reader.raw(KEY_LEN)
    cidr4 = _network4(reader.raw(4), reader.u8(), reader)
    has_v6 = reader.u8()
    if has_v6 not in (0, 1):
        raise reader.fail("bad IPv6 range flag")
    cidr6 = _network6(reader.raw(16), reader.u8(), reader) if has_v6 else None
    issued_at = reader.u64()
    expires_at = reader.u64()
    count = reader.u8()
    if count > MAX_SEEDS:
        raise reader.fail(f"more than {MAX_SEEDS} seeds")
    seeds = []
    for _ in range(count):
        endpoint = reader.text()
        enrol_port = reader.u16()
        public_key = encode_key(reader.raw(KEY_LEN))
        seeds.append(Seed(endpoint, enrol_port, public_key, reader.address()))
    enrol_secret = reader.raw(KEY_LEN)
    enrol_cert = Certificate.decode(reader.long_bytes())
    signature = reader.raw(SIGNATURE_LEN)
    reader.end()
    if issued_at > expires_at:
        raise reader.fail("issued after it expires")
    return Token(
        network_name=network_name,
        ca_public_key=ca_public_key,
        gossip_key=gossip_key,
        cidr4=cidr4,
        cidr6=cidr6,
        seeds=tuple(seeds),
        enrolment=EnrolmentKey.from_secret(enrol_secret, enrol_cert),
        issued_at=issued_at,
        expires_at=expires_at,
        signature=signature,
    )


def _network4(packed: bytes, prefix: int, reader: BinaryReader) -> IPv4Network:
    try:
        return IPv4Network((packed, prefix), strict=True)
    except ValueError as exc:
        raise reader.fail("bad IPv4 range") from exc


def _network6(packed: bytes, prefix: int, reader: BinaryReader) -> IPv6Network:
    try:
        return IPv6Network((packed, prefix), strict=True)
    except ValueError as exc:
        raise reader.fail("bad IPv6 range") from exc


def parse_token(text: str, now: int) -> Token:
    """Decode and check a token's text; TokenError says in one line what is wrong.

    Checks, in order: it looks like a token, it decodes, the CA signature
    matches, the enrolment key is the CA's, it is not expired at ``now``.
    """
    raw = _decode_text(text)
    try:
        token = _read_token(raw)
    except (DecodeError, IdentityError) as exc:
        raise TokenError(f"token is damaged or truncated ({exc})") from exc
    signed = raw[: -len(token.signature)]
    try:
        VerifyKey(token.ca_public_key).verify(signed, token.signature)
    except (BadSignatureError, ValueError, TypeError) as exc:
        raise TokenError("token has been tampered with: its signature does not match") from exc
    enrol_cert = token.enrolment.cert
    try:
        verify_cert(enrol_cert, token.ca_public_key, enrol_cert.not_before)
    except IdentityError as exc:
        raise TokenError(f"token's enrolment key is not signed by its CA ({exc})") from exc
    if (
        enrol_cert.role is not Role.ENROL
        or enrol_cert.network_id != token.network_id
        or token.expires_at > enrol_cert.not_after
    ):
        raise TokenError("token's enrolment certificate does not fit the token")
    if now > token.expires_at:
        raise TokenError(
            f"token expired at {utc(token.expires_at)} ({ago(token.expires_at, now)}); "
            "make a new one with 'meshd token create'"
        )
    if now + CLOCK_SKEW < token.issued_at:
        raise TokenError(
            f"token is not valid before {utc(token.issued_at)}; check this machine's clock"
        )
    return token


def check_network(token: Token, network_id: str) -> None:
    """Refuse a token for another network than ``network_id``."""
    if token.network_id != network_id.strip().lower():
        raise TokenError(
            f"token is for network {token.network_name!r} ({token.network_id}), "
            f"not {network_id.strip()}"
        )


def read_token_source(
    source: str | None,
    *,
    environ: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
) -> str:
    """The token text from a file path, ``"-"`` (stdin), ``"env:NAME"`` or None ($MESHD_TOKEN).

    Never take a token from argv: ``ps`` shows it to every user.
    """
    env = os.environ if environ is None else environ
    if source is None or source.startswith("env:"):
        name = TOKEN_ENV if source is None else source[4:]
        value = env.get(name, "")
        if not value.strip():
            if source is None:
                raise TokenError(
                    f"no token given: pass a token file, '-' for stdin, or set ${TOKEN_ENV}"
                )
            raise TokenError(f"environment variable {name} holds no token")
        return value.strip()
    if source == "-":
        text = (sys.stdin if stdin is None else stdin).read(MAX_TOKEN_CHARS + 1)
        if not text.strip():
            raise TokenError("no token on standard input")
        return text.strip()
    path = Path(source)
    try:
        mode = path.stat().st_mode
        with path.open(encoding="utf-8", errors="replace") as handle:
            text = handle.read(MAX_TOKEN_CHARS + 1)
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        log.warning(
            "token file %s is readable by others (mode %o); chmod 600 it", path, mode & 0o777
        )
    if not text.strip():
        raise TokenError(f"token file {path} is empty")
    return text.strip()
