"""Certificates of a network and the chain rule: who is a node of which network.

A network is its CA key: ``network_id`` is a hash of the CA public key, so two
networks with the same name never collide and a token cannot name one network
while carrying another's key.

Certificates come in two roles:

- **node** — binds a node name, its WireGuard public key (base64, as ``wg``
  prints it), its mesh addresses and a validity window to the network.
- **enrol** — binds a short-lived Ed25519 *enrolment key* to the network. The CA
  signs it when a join token is made; the token carries its private half, and a
  joining node signs its own node certificate with it, so admission works while
  the CA machine is offline.

Chain rule (what :func:`verify_chain` accepts), decided here:

- a node certificate signed by the CA directly is valid within its own window;
- a node certificate signed by an enrolment key is valid within its own window
  when the enrolment certificate is signed by the CA, its ``not_before`` lies
  inside the enrolment certificate's window (it was issued while the enrolment
  key was valid) and it lives no longer than the enrolment certificate's
  ``max_child_lifetime``. Its expiry may therefore exceed the enrolment key's:
  a token lives hours, the node certificates made with it live months.
- ``at_admission=True`` (what a seed uses on the enrolment port) also requires
  the enrolment certificate to be valid *now* and the node certificate to be
  freshly made (``not_before`` within :data:`CLOCK_SKEW` of now). Without it, a
  leaked and expired enrolment key could back-date new node certificates; those
  still pass plain :func:`verify_chain` — revoke the enrolment certificate's
  serial to shut them all out — but never a seed, so they never get a tunnel.
- chains are at most one enrolment certificate long; enrolment keys cannot make
  enrolment keys.
- a network may trust several CA keys at once (:class:`Roots`) while its CA is
  rotated. A certificate carries the ``network_id`` of the CA key that signed its
  chain. A **root** certificate (a cross-signature) is an old CA's statement that a
  new CA key belongs to the network: a chain may end with one, and then its
  node/enrolment part may be signed by the new key while the verifier trusts only
  the old one. A chain whose issuing CA is trusted directly ignores it.

Encoding: a small deterministic binary format of fixed-width fields and
length-prefixed strings (:mod:`meshd.binary`, shared with :mod:`meshd.pki.token`),
followed by the 64-byte Ed25519 signature over
everything before it. Every decoder refuses trailing bytes, so the encoding of a
value is unique and flipping any byte either breaks the structure or the
signature. A node certificate is ~190 bytes; a node + enrolment chain ~400.

The signing side (the CA, enrolment keys) is :mod:`meshd.pki.ca`; revocations
are :mod:`meshd.pki.revocation`.

Public API::

    network_id_of(ca_public_key: bytes) -> str
    key_id(public_key: bytes) -> bytes
    Certificate.encode() / Certificate.decode(data)          (IdentityError if malformed)
    CertChain(node, issuers).encode() / .decode(data) / .ref / .verify(ca, now, ...)
    cert_ref(cert) -> str
    verify(cert, signer_public_key, now)
    verify_chain(node_cert, chain, roots, now, *, revoked=None, at_admission=False) -> CA key
    Roots(keys).of(bytes | Roots) / .find(key_id) / .ids
    check_binding(cert, *, name, public_key, addresses)
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from nacl.utils import random

from meshd.binary import MAX_U64, BinaryReader, BinaryWriter
from meshd.errors import DecodeError, IdentityError
from meshd.identity import decode_key, encode_key
from meshd.timetext import utc
from meshd.types import IPAddress

if TYPE_CHECKING:
    from meshd.pki.revocation import RevocationList

KEY_LEN = 32
SIGNATURE_LEN = 64
KEY_ID_LEN = 8
SERIAL_LEN = 8
MAX_ADDRESSES = 8
MAX_CHAIN_LEN = 1
# After the enrolment certificate (if any), one cross-signature of the issuing CA.
MAX_CROSS = 1
# Clocks of machines that have never met disagree; a certificate made "now" on
# one must not be refused as "not yet valid" on another.
CLOCK_SKEW = 300
DAY = 86400
DEFAULT_NODE_LIFETIME = 365 * DAY
MAX_TIME = MAX_U64
T = TypeVar("T")

FORMAT_VERSION = 1
_CERT_MAGIC = b"MC"
_CHAIN_MAGIC = b"MH"
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NO_SERIAL = bytes(SERIAL_LEN)


class Role(enum.IntEnum):
    """What a certificate's key may do."""

    NODE = 1
    ENROL = 2
    ROOT = 3
    """A cross-signature: ``public_key`` is another CA key of the same network."""


def key_id(public_key: bytes) -> bytes:
    """A short, stable identifier of an Ed25519 public key (8 bytes)."""
    return hashlib.blake2b(public_key, digest_size=KEY_ID_LEN, person=b"meshd-key-id").digest()


def network_id_of(ca_public_key: bytes) -> str:
    """The network id: the CA key's id as 16 hex digits."""
    if len(ca_public_key) != KEY_LEN:
        raise IdentityError(f"a CA public key must be {KEY_LEN} bytes, got {len(ca_public_key)}")
    return key_id(ca_public_key).hex()


def check_name(name: str, *, what: str = "name") -> str:
    """``name`` if it is a DNS label (lowercase letters, digits, inner dashes, 1-63)."""
    if not _NAME_RE.fullmatch(name):
        raise IdentityError(f"{what} {name!r} must be a DNS label: a-z, 0-9 and inner '-', 1-63")
    return name


def now_or(now: int | None) -> int:
    return int(time.time()) if now is None else now


def read_name(reader: BinaryReader, what: str) -> str:
    """A DNS label from ``reader``, as :func:`check_name` would accept it."""
    value = reader.text()
    if not _NAME_RE.fullmatch(value):
        raise reader.fail(f"{what} is not a DNS label")
    return value


def decode_signed(data: bytes, what: str, magic: bytes, read: Callable[[BinaryReader], T]) -> T:
    """What ``read`` makes of the encoding of a ``what`` after its header.

    Nothing may trail it; anything malformed is an IdentityError.
    """
    try:
        reader = BinaryReader(data, what)
        reader.header(magic, FORMAT_VERSION)
        value = read(reader)
        reader.end()
    except DecodeError as exc:
        raise IdentityError(str(exc)) from exc
    return value


def signing_key_from(secret: bytes, what: str) -> SigningKey:
    if len(secret) != KEY_LEN:
        raise IdentityError(f"{what} must be {KEY_LEN} bytes, got {len(secret)}")
    return SigningKey(secret)


def check_signature(signer_public_key: bytes, signed: bytes, signature: bytes, what: str) -> None:
    try:
        VerifyKey(signer_public_key).verify(signed, signature)
    except (BadSignatureError, ValueError, TypeError) as exc:
        raise IdentityError(f"{what}: bad signature (tampered, or signed by another key)") from exc


def check_ca_statement(
    value: SignedValue, network_id: str, issuer_key_id: bytes, roots: bytes | Roots, what: str
) -> None:
    """Check a statement the network CA itself signs (revocation, route grant, client
    record): issued by a CA key this node trusts (two while the CA is rotated), of that
    key's network, and its signature holds."""
    ca_public_key = Roots.of(roots).find(issuer_key_id)
    if ca_public_key is None:
        raise IdentityError(f"{what} was not issued by the network CA")
    if network_id != network_id_of(ca_public_key):
        raise IdentityError(f"{what} belongs to network {network_id}")
    check_signature(ca_public_key, value.signed_part(), value.signature, what)


class SignedValue:
    """What certificates, revocations and tokens share: a signed part, then its signature.

    Mixed into frozen dataclasses that have a ``signature`` field (empty until signed).
    """

    __dataclass_fields__: ClassVar[dict[str, Any]]
    kind: ClassVar[str]
    signature: bytes

    def signed_part(self) -> bytes:
        raise NotImplementedError

    def signed_by(self, signing_key: SigningKey) -> Self:
        """This value with ``signing_key``'s signature over :meth:`signed_part`."""
        return dataclasses.replace(self, signature=signing_key.sign(self.signed_part()).signature)

    def signed_encoding(self) -> bytes:
        """The signed part followed by the signature; IdentityError when unsigned."""
        if len(self.signature) != SIGNATURE_LEN:
            raise IdentityError(f"cannot encode an unsigned {self.kind}")
        return self.signed_part() + self.signature


# --- certificates --------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate(SignedValue):
    """A signed binding of a name and a public key to a network.

    ``public_key`` is base64 of 32 bytes: the node's WireGuard key for
    :attr:`Role.NODE`, the enrolment key's Ed25519 key for :attr:`Role.ENROL`.
    ``max_child_lifetime`` (seconds) is how long certificates signed by this
    certificate's key may live; 0 for node certificates, which sign nothing.
    """

    role: Role
    serial: bytes
    network_id: str
    name: str
    public_key: str
    addresses: tuple[IPAddress, ...]
    not_before: int
    not_after: int
    max_child_lifetime: int
    issuer_key_id: bytes
    signature: bytes = field(default=b"", repr=False)
    kind: ClassVar[str] = "certificate"

    def signed_part(self) -> bytes:
        """The bytes the issuer signs: everything but the signature."""
        return (
            BinaryWriter()
            .header(_CERT_MAGIC, FORMAT_VERSION)
            .u8(int(self.role))
            .raw(self.serial)
            .raw(bytes.fromhex(self.network_id))
            .raw(self.issuer_key_id)
            .text(self.name)
            .raw(decode_key(self.public_key, what="certificate public key"))
            .u8(len(self.addresses))
            .raw(b"".join(BinaryWriter().address(a).getvalue() for a in self.addresses))
            .u64(self.not_before)
            .u64(self.not_after)
            .u32(self.max_child_lifetime)
            .getvalue()
        )

    def encode(self) -> bytes:
        return self.signed_encoding()

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        """Parse a certificate; IdentityError if malformed. The signature is not checked."""
        return decode_signed(data, "certificate", _CERT_MAGIC, _read_certificate)

    @property
    def public_key_bytes(self) -> bytes:
        return decode_key(self.public_key, what="certificate public key")

    def describe(self) -> str:
        return f"{self.role.name.lower()} certificate {self.name!r} ({self.serial.hex()})"


def _read_certificate(reader: BinaryReader) -> Certificate:
    try:
        role = Role(reader.u8())
    except ValueError as exc:
        raise reader.fail("unknown role") from exc
    serial = reader.raw(SERIAL_LEN)
    network_id = reader.raw(KEY_ID_LEN).hex()
    issuer = reader.raw(KEY_ID_LEN)
    name = read_name(reader, "name")
    public_key = encode_key(reader.raw(KEY_LEN))
    count = reader.u8()
    if count > MAX_ADDRESSES:
        raise reader.fail(f"more than {MAX_ADDRESSES} addresses")
    addresses = tuple(reader.address() for _ in range(count))
    not_before = reader.u64()
    not_after = reader.u64()
    max_child = reader.u32()
    signature = reader.raw(SIGNATURE_LEN)
    cert = Certificate(
        role=role,
        serial=serial,
        network_id=network_id,
        name=name,
        public_key=public_key,
        addresses=addresses,
        not_before=not_before,
        not_after=not_after,
        max_child_lifetime=max_child,
        issuer_key_id=issuer,
        signature=signature,
    )
    problem = _shape_problem(cert)
    if problem:
        raise reader.fail(problem)
    return cert


def _shape_problem(cert: Certificate) -> str | None:
    """What makes ``cert`` impossible whatever its signature, or None."""
    if cert.not_before > cert.not_after:
        return "not_before is after not_after"
    if cert.role is Role.NODE and cert.max_child_lifetime:
        return "a node certificate cannot sign others"
    if cert.role is Role.NODE and not cert.addresses:
        return "a node certificate needs at least one address"
    if cert.role is Role.ENROL and cert.addresses:
        return "an enrolment certificate carries no addresses"
    if cert.role is Role.ROOT and (cert.addresses or cert.max_child_lifetime):
        return "a root certificate carries no addresses and no child lifetime"
    if len(set(cert.addresses)) != len(cert.addresses):
        return "duplicate addresses"
    return None


def cert_ref(cert: Certificate) -> str:
    """A short reference to a certificate for the gossip tags (16 base32 characters)."""
    digest = hashlib.blake2b(cert.encode(), digest_size=10, person=b"meshd-cert-ref").digest()
    return base64.b32encode(digest).decode("ascii").lower()


def sign_certificate(
    signing_key: SigningKey,
    *,
    role: Role,
    network_id: str,
    name: str,
    public_key: str,
    addresses: Iterable[IPAddress],
    not_before: int,
    not_after: int,
    max_child_lifetime: int = 0,
) -> Certificate:
    check_name(name, what="certificate name")
    decode_key(public_key, what="certificate public key")
    if not 0 <= not_before <= not_after <= MAX_TIME:
        raise IdentityError("a certificate's validity must be 0 <= not_before <= not_after")
    if not 0 <= max_child_lifetime <= 0xFFFFFFFF:
        raise IdentityError("max_child_lifetime out of range")
    unique = tuple(dict.fromkeys(ipaddress.ip_address(a) for a in addresses))
    if len(unique) > MAX_ADDRESSES:
        raise IdentityError(f"a certificate holds at most {MAX_ADDRESSES} addresses")
    unsigned = Certificate(
        role=role,
        serial=random(SERIAL_LEN),
        network_id=network_id,
        name=name,
        public_key=public_key,
        addresses=unique,
        not_before=not_before,
        not_after=not_after,
        max_child_lifetime=max_child_lifetime,
        issuer_key_id=key_id(bytes(signing_key.verify_key)),
    )
    problem = _shape_problem(unsigned)
    if problem:
        raise IdentityError(f"cannot issue this certificate: {problem}")
    return unsigned.signed_by(signing_key)


def check_window(cert: Certificate, now: int) -> None:
    if now + CLOCK_SKEW < cert.not_before:
        raise IdentityError(
            f"{cert.describe()} is not valid before {utc(cert.not_before)} (check the clock)"
        )
    if now > cert.not_after:
        raise IdentityError(f"{cert.describe()} expired at {utc(cert.not_after)}")


def verify(cert: Certificate, signer_public_key: bytes, now: int) -> None:
    """Check ``cert`` was signed by ``signer_public_key`` (Ed25519, raw) and is valid at ``now``."""
    if cert.issuer_key_id != key_id(signer_public_key):
        raise IdentityError(f"{cert.describe()} was issued by another key")
    check_signature(signer_public_key, cert.signed_part(), cert.signature, cert.describe())
    check_window(cert, now)


@dataclass(frozen=True)
class Roots:
    """The CA public keys a node trusts: one, or two while the CA is rotated."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise IdentityError("a node must trust at least one CA key")
        for key in self.keys:
            if len(key) != KEY_LEN:
                raise IdentityError(f"a CA public key must be {KEY_LEN} bytes, got {len(key)}")

    @classmethod
    def of(cls, roots: bytes | Roots) -> Roots:
        return roots if isinstance(roots, Roots) else cls((roots,))

    def find(self, issuer_key_id: bytes) -> bytes | None:
        """The trusted key whose id is ``issuer_key_id``, if any."""
        return next((k for k in self.keys if key_id(k) == issuer_key_id), None)

    @property
    def ids(self) -> tuple[str, ...]:
        """The network id of each key (what ``meshd status`` shows)."""
        return tuple(network_id_of(k) for k in self.keys)


def split_chain(chain: Sequence[Certificate]) -> tuple[Certificate | None, Certificate | None]:
    """(the enrolment certificate, the cross-signature) of a chain's issuers, each optional,
    in that order; IdentityError for any other shape."""
    enrol = chain[0] if chain and chain[0].role is not Role.ROOT else None
    rest = chain[1:] if enrol is not None else chain
    if enrol is not None and enrol.role is not Role.ENROL:
        raise IdentityError(f"{enrol.describe()} cannot sign node certificates")
    if len(rest) > MAX_CROSS or any(c.role is not Role.ROOT for c in rest):
        raise IdentityError(
            f"certificate chain longer than {MAX_CHAIN_LEN} enrolment certificate "
            f"and {MAX_CROSS} root certificate"
        )
    return enrol, (rest[0] if rest else None)


def issuing_key(
    top: Certificate, cross: Certificate | None, roots: Roots, now: int
) -> tuple[bytes, Certificate | None]:
    """The CA key that signed ``top`` (the chain's highest node or enrolment certificate),
    trusted directly or through ``cross``; and the cross-signature it took, if any."""
    direct = roots.find(top.issuer_key_id)
    if direct is not None:
        return direct, None
    if cross is not None and key_id(cross.public_key_bytes) == top.issuer_key_id:
        signer = roots.find(cross.issuer_key_id)
        if signer is not None:
            if cross.network_id != network_id_of(signer):
                raise IdentityError(f"{cross.describe()} belongs to network {cross.network_id}")
            verify(cross, signer, now)
            return cross.public_key_bytes, cross
    if top.network_id not in roots.ids:
        raise IdentityError(f"{top.describe()} belongs to network {top.network_id}")
    raise IdentityError(f"{top.describe()} was not issued by the network CA")


def verify_chain(
    node_cert: Certificate,
    chain: Sequence[Certificate],
    roots: bytes | Roots,
    now: int,
    *,
    revoked: RevocationList | None = None,
    at_admission: bool = False,
) -> bytes:
    """Check ``node_cert`` chains to a trusted CA key; IdentityError says why not.

    ``chain`` is empty (CA-signed node certificate) or the one enrolment
    certificate that signed it, optionally followed by a cross-signature of the
    issuing CA key. See the module docstring for the rules. Returns the CA key
    that issued the chain.
    """
    trusted = Roots.of(roots)
    if node_cert.role is not Role.NODE:
        raise IdentityError(f"{node_cert.describe()} is not a node certificate")
    enrol_cert, cross = split_chain(chain)
    ca_public_key, used_cross = issuing_key(enrol_cert or node_cert, cross, trusted, now)
    network_id = network_id_of(ca_public_key)
    signed = [c for c in (node_cert, enrol_cert) if c is not None]
    for cert in signed:
        if cert.network_id != network_id:
            raise IdentityError(f"{cert.describe()} belongs to network {cert.network_id}")
    checked = [*signed, used_cross] if used_cross is not None else signed
    for cert in checked:
        revocation = revoked.find(cert) if revoked is not None else None
        # A revoked enrolment key signs nothing new; what it signed before stays
        # valid (other machines joined with the same token), unless revoked itself.
        if revocation is not None and not (
            cert.role is Role.ENROL and node_cert.not_before < revocation.revoked_at
        ):
            raise IdentityError(f"{cert.describe()} was revoked at {utc(revocation.revoked_at)}")
    if enrol_cert is None:
        verify(node_cert, ca_public_key, now)
        return ca_public_key
    check_signature(
        ca_public_key, enrol_cert.signed_part(), enrol_cert.signature, enrol_cert.describe()
    )
    verify(node_cert, enrol_cert.public_key_bytes, now)
    if not enrol_cert.not_before - CLOCK_SKEW <= node_cert.not_before <= enrol_cert.not_after:
        raise IdentityError(
            f"{node_cert.describe()} was not made while its enrolment key was valid "
            f"({utc(enrol_cert.not_before)} to {utc(enrol_cert.not_after)})"
        )
    if node_cert.not_after - node_cert.not_before > enrol_cert.max_child_lifetime:
        raise IdentityError(
            f"{node_cert.describe()} lives longer than its enrolment key allows "
            f"({enrol_cert.max_child_lifetime} s)"
        )
    if at_admission:
        check_window(enrol_cert, now)
        if abs(node_cert.not_before - now) > CLOCK_SKEW:
            raise IdentityError(
                f"{node_cert.describe()} was not made just now (not_before "
                f"{utc(node_cert.not_before)}); check the joining machine's clock"
            )
    return ca_public_key


def check_binding(
    cert: Certificate, *, name: str, public_key: str, addresses: Iterable[IPAddress]
) -> None:
    """Check that a gossiped member (name, WireGuard key, addresses) is what ``cert`` binds."""
    if cert.name != name:
        raise IdentityError(f"{cert.describe()} is for {cert.name!r}, not {name!r}")
    if cert.public_key != public_key.strip():
        raise IdentityError(f"{cert.describe()} binds another WireGuard key")
    extra = [str(a) for a in addresses if a not in cert.addresses]
    if extra:
        raise IdentityError(f"{cert.describe()} does not cover address(es) {', '.join(extra)}")


@dataclass(frozen=True)
class CertChain:
    """A node certificate with the certificates that signed it, as fetched from a node."""

    node: Certificate
    issuers: tuple[Certificate, ...] = ()

    def encode(self) -> bytes:
        writer = BinaryWriter().header(_CHAIN_MAGIC, FORMAT_VERSION)
        writer.u8(1 + len(self.issuers))
        for cert in (self.node, *self.issuers):
            writer.long_bytes(cert.encode())
        return writer.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> CertChain:
        """Parse a chain; IdentityError on anything malformed (signatures are not checked)."""

        def read(reader: BinaryReader) -> CertChain:
            count = reader.u8()
            if not 1 <= count <= 1 + MAX_CHAIN_LEN + MAX_CROSS:
                raise reader.fail(f"{count} certificates")
            certs = [Certificate.decode(reader.long_bytes()) for _ in range(count)]
            return cls(node=certs[0], issuers=tuple(certs[1:]))

        return decode_signed(data, "certificate chain", _CHAIN_MAGIC, read)

    @property
    def ref(self) -> str:
        return cert_ref(self.node)

    def verify(
        self,
        roots: bytes | Roots,
        now: int,
        *,
        revoked: RevocationList | None = None,
        at_admission: bool = False,
    ) -> bytes:
        """:func:`verify_chain` of this chain; the CA key that issued it."""
        return verify_chain(
            self.node, self.issuers, roots, now, revoked=revoked, at_admission=at_admission
        )

    @property
    def cross(self) -> Certificate | None:
        """The cross-signature this chain ends with, if any."""
        last = self.issuers[-1] if self.issuers else None
        return last if last is not None and last.role is Role.ROOT else None
