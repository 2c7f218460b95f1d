"""The network CA and enrolment keys: what signs certificates and revocations.

A network is its CA key: ``network_id`` is a hash of the CA public key, so two
networks with the same name never collide and a token cannot name one network
while carrying another's key. The CA signs node certificates, enrolment keys
(short-lived: a join token carries one, and a joining node signs its own node
certificate with it, so admission works while the CA machine is offline) and
revocations. Certificates and the chain rule are :mod:`meshd.pki.certificate`.

Public API::

    NetworkCA.generate(name) / NetworkCA.from_secret(name, secret)
      .public_key .network_id .secret
      .issue_node_cert(name, public_key, addresses, *, lifetime, now) -> Certificate
      .issue_enrolment_key(*, lifetime, node_lifetime, now) -> EnrolmentKey
      .revoke(cert, *, now, include_key=True) -> Revocation
      .revoke_key(name, public_key, *, now) -> Revocation
      .cross_sign(successor, *, now) -> Certificate         (CA rotation)
      .renew(cert, *, now) -> Certificate                   (CA rotation)
    EnrolmentKey.sign_node_cert(name, public_key, addresses, *, lifetime, now) -> Certificate
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from nacl.signing import SigningKey

from meshd.errors import IdentityError
from meshd.identity import decode_key, encode_key
from meshd.pki.certificate import (
    DEFAULT_NODE_LIFETIME,
    MAX_TIME,
    NO_SERIAL,
    Certificate,
    Role,
    check_name,
    check_window,
    network_id_of,
    now_or,
    sign_certificate,
    signing_key_from,
)
from meshd.pki.client import ClientRecord, sign_client
from meshd.pki.grant import RouteGrant, sign_grant
from meshd.pki.revocation import Revocation, sign_revocation
from meshd.types import IPAddress, IPNetwork

# A cross-signature must outlive every certificate renewed under it (they keep
# their own end of validity, at most DEFAULT_NODE_LIFETIME away): members that
# still trust only the old CA accept the new one through it.
CROSS_LIFETIME = 2 * DEFAULT_NODE_LIFETIME


class _SigningKey:
    """What a holder of an Ed25519 signing key shows of it."""

    signing_key: SigningKey

    @property
    def secret(self) -> bytes:
        """The 32-byte Ed25519 seed; store it with :func:`meshd.state.write_secret`."""
        return bytes(self.signing_key)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)


@dataclass(frozen=True)
class EnrolmentKey(_SigningKey):
    """A CA-signed, short-lived Ed25519 key that signs node certificates.

    Whoever holds it can make node certificates until ``cert.not_after``: it
    travels inside join tokens, which makes a token a bearer secret.
    """

    signing_key: SigningKey = field(repr=False)
    cert: Certificate

    @classmethod
    def from_secret(cls, secret: bytes, cert: Certificate) -> EnrolmentKey:
        key = signing_key_from(secret, "an enrolment key")
        if cert.role is not Role.ENROL:
            raise IdentityError(f"{cert.describe()} is not an enrolment certificate")
        if bytes(key.verify_key) != cert.public_key_bytes:
            raise IdentityError("the enrolment key does not match its certificate")
        return cls(signing_key=key, cert=cert)

    def sign(self, message: bytes) -> bytes:
        """A detached Ed25519 signature (the enrolment protocol's proof of holding the token)."""
        return self.signing_key.sign(message).signature

    def sign_node_cert(
        self,
        name: str,
        public_key: str,
        addresses: Iterable[IPAddress],
        *,
        lifetime: int | None = None,
        now: int | None = None,
    ) -> Certificate:
        """A node certificate, valid from ``now`` for ``lifetime`` (default: the most allowed)."""
        now = now_or(now)
        check_window(self.cert, now)
        lifetime = self.cert.max_child_lifetime if lifetime is None else lifetime
        if not 0 < lifetime <= self.cert.max_child_lifetime:
            raise IdentityError(
                f"this enrolment key signs certificates of at most "
                f"{self.cert.max_child_lifetime} s, not {lifetime} s"
            )
        return sign_certificate(
            self.signing_key,
            role=Role.NODE,
            network_id=self.cert.network_id,
            name=name,
            public_key=public_key,
            addresses=addresses,
            not_before=now,
            not_after=now + lifetime,
        )


@dataclass(frozen=True)
class NetworkCA(_SigningKey):
    """The network's root key. Its secret stays on admin machines (0600, never logged)."""

    name: str
    signing_key: SigningKey = field(repr=False)

    @classmethod
    def generate(cls, name: str) -> NetworkCA:
        return cls(name=check_name(name, what="network name"), signing_key=SigningKey.generate())

    @classmethod
    def from_secret(cls, name: str, secret: bytes) -> NetworkCA:
        return cls(
            name=check_name(name, what="network name"),
            signing_key=signing_key_from(secret, "a CA secret key"),
        )

    @property
    def network_id(self) -> str:
        return network_id_of(self.public_key)

    def issue_node_cert(
        self,
        name: str,
        public_key: str,
        addresses: Iterable[IPAddress],
        *,
        lifetime: int = DEFAULT_NODE_LIFETIME,
        now: int | None = None,
    ) -> Certificate:
        """A node certificate signed by the CA directly (e.g. the first node at ``meshd init``)."""
        now = now_or(now)
        return sign_certificate(
            self.signing_key,
            role=Role.NODE,
            network_id=self.network_id,
            name=name,
            public_key=public_key,
            addresses=addresses,
            not_before=now,
            not_after=now + lifetime,
        )

    def issue_enrolment_key(
        self,
        *,
        lifetime: int,
        node_lifetime: int = DEFAULT_NODE_LIFETIME,
        name: str = "enrol",
        now: int | None = None,
    ) -> EnrolmentKey:
        """A new enrolment key valid ``lifetime`` s; its node certs may live ``node_lifetime`` s."""
        if lifetime <= 0 or node_lifetime <= 0:
            raise IdentityError("lifetimes must be positive")
        now = now_or(now)
        key = SigningKey.generate()
        cert = sign_certificate(
            self.signing_key,
            role=Role.ENROL,
            network_id=self.network_id,
            name=name,
            public_key=encode_key(bytes(key.verify_key)),
            addresses=(),
            not_before=now,
            not_after=now + lifetime,
            max_child_lifetime=node_lifetime,
        )
        return EnrolmentKey(signing_key=key, cert=cert)

    def revoke(
        self, cert: Certificate, *, now: int | None = None, include_key: bool = True
    ) -> Revocation:
        """Revoke ``cert`` by serial and, with ``include_key``, every certificate of its key."""
        return sign_revocation(
            self.signing_key,
            network_id=self.network_id,
            name=cert.name,
            serial=cert.serial,
            public_key=cert.public_key if include_key else "",
            revoked_at=now_or(now),
        )

    def revoke_key(self, name: str, public_key: str, *, now: int | None = None) -> Revocation:
        """Revoke every certificate of the WireGuard key ``public_key`` (``name`` is for
        people): for a machine no member remembers, or a key replaced by a rotation."""
        decode_key(public_key, what="the key to revoke")
        return sign_revocation(
            self.signing_key,
            network_id=self.network_id,
            name=check_name(name),
            serial=NO_SERIAL,
            public_key=public_key,
            revoked_at=now_or(now),
        )

    def cross_sign(self, successor: NetworkCA, *, now: int | None = None) -> Certificate:
        """A root certificate: this CA vouches that ``successor``'s key is a CA of the
        same network (``meshd ca rotate``). Members that trust only this key accept
        chains of the successor that carry it."""
        now = now_or(now)
        if successor.public_key == self.public_key:
            raise IdentityError("a CA cannot cross-sign itself")
        return sign_certificate(
            self.signing_key,
            role=Role.ROOT,
            network_id=self.network_id,
            name=self.name,
            public_key=encode_key(successor.public_key),
            addresses=(),
            not_before=now,
            not_after=min(now + CROSS_LIFETIME, MAX_TIME),
        )

    def renew(self, cert: Certificate, *, now: int | None = None) -> Certificate:
        """``cert`` issued again by this CA: same name, key, addresses and end of validity
        (a rotation moves the issuer, it does not extend anyone's certificate)."""
        now = now_or(now)
        if cert.role is not Role.NODE:
            raise IdentityError(f"{cert.describe()} is not a node certificate")
        check_window(cert, now)
        return sign_certificate(
            self.signing_key,
            role=Role.NODE,
            network_id=self.network_id,
            name=cert.name,
            public_key=cert.public_key,
            addresses=cert.addresses,
            not_before=min(now, cert.not_after),
            not_after=cert.not_after,
        )

    def grant_route(self, name: str, prefix: IPNetwork, *, now: int | None = None) -> RouteGrant:
        """Approve ``prefix`` (and every prefix inside it) behind node ``name``."""
        return sign_grant(
            self.signing_key,
            network_id=self.network_id,
            name=check_name(name),
            prefix=prefix,
            granted_at=now_or(now),
        )

    def sign_client(
        self,
        name: str,
        public_key: str,
        address: IPAddress,
        gateway: str,
        *,
        now: int | None = None,
    ) -> ClientRecord:
        """Describe a plain WireGuard client of node ``gateway``."""
        return sign_client(
            self.signing_key,
            network_id=self.network_id,
            name=name,
            public_key=public_key,
            address=address,
            gateway=gateway,
            issued_at=now_or(now),
        )
