"""Route grants: CA-signed approvals of one prefix behind one node.

A node may advertise any prefix in its record; the others use it only when the
network CA approved it (``meshd route approve NODE PREFIX`` on the CA machine).
Every node verifies a grant on its own, with the CA key from its token: no
server is asked. A grant (~110 bytes) travels like a revocation: one Serf user
event, then anti-entropy with members whose trust digest differs
(:mod:`meshd.agent.exchange`), and it is persisted in ``<state_dir>/route-grants``.

A grant names the node (its certificate binds the name) and covers the prefix
and every prefix inside it.

Public API::

    RouteGrant.encode() / .decode(data) / .covers(name, prefix); verify_grant(grant, ca_key)
    sign_grant(signing_key, *, network_id, name, prefix, granted_at)
    GrantList.add(grant, ca_key) / .approved(name, prefixes) / .encode() / .decode(data, ca_key)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from nacl.signing import SigningKey

from meshd.binary import BinaryReader, BinaryWriter
from meshd.pki.certificate import (
    FORMAT_VERSION,
    KEY_ID_LEN,
    SIGNATURE_LEN,
    Roots,
    SignedValue,
    check_ca_statement,
    check_name,
    decode_signed,
    key_id,
    read_name,
)
from meshd.types import IPNetwork

GRANT_MAGIC = b"MG"
_GRANT_LIST_MAGIC = b"MH"


@dataclass(frozen=True)
class RouteGrant(SignedValue):
    """A CA-signed statement: node ``name`` may carry traffic for ``prefix``."""

    network_id: str
    name: str
    prefix: IPNetwork
    granted_at: int
    issuer_key_id: bytes
    signature: bytes = field(default=b"", repr=False)
    kind: ClassVar[str] = "route grant"

    def signed_part(self) -> bytes:
        return (
            BinaryWriter()
            .header(GRANT_MAGIC, FORMAT_VERSION)
            .raw(bytes.fromhex(self.network_id))
            .raw(self.issuer_key_id)
            .text(self.name)
            .address(self.prefix.network_address)
            .u8(self.prefix.prefixlen)
            .u64(self.granted_at)
            .getvalue()
        )

    def encode(self) -> bytes:
        return self.signed_encoding()

    @classmethod
    def decode(cls, data: bytes) -> RouteGrant:
        """Parse a grant; IdentityError if malformed. The signature is not checked."""

        def read(reader: BinaryReader) -> RouteGrant:
            network_id = reader.raw(KEY_ID_LEN).hex()
            issuer = reader.raw(KEY_ID_LEN)
            name = read_name(reader, "name")
            address = reader.address()
            length = reader.u8()
            try:
                prefix = ipaddress.ip_network((address, length))
            except ValueError as exc:
                raise reader.fail(f"bad prefix: {exc}") from None
            granted_at = reader.u64()
            signature = reader.raw(SIGNATURE_LEN)
            return cls(network_id, name, prefix, granted_at, issuer, signature)

        return decode_signed(data, "route grant", GRANT_MAGIC, read)

    def covers(self, name: str, prefix: IPNetwork) -> bool:
        return (
            name == self.name
            and prefix.version == self.prefix.version
            and prefix.subnet_of(self.prefix)  # type: ignore[arg-type]
        )


def sign_grant(
    signing_key: SigningKey, *, network_id: str, name: str, prefix: IPNetwork, granted_at: int
) -> RouteGrant:
    check_name(name, what="node name")
    unsigned = RouteGrant(
        network_id=network_id,
        name=name,
        prefix=prefix,
        granted_at=granted_at,
        issuer_key_id=key_id(bytes(signing_key.verify_key)),
    )
    return unsigned.signed_by(signing_key)


def verify_grant(grant: RouteGrant, ca_public_key: bytes | Roots) -> None:
    """Check a grant was signed by the network CA."""
    check_ca_statement(
        grant,
        grant.network_id,
        grant.issuer_key_id,
        ca_public_key,
        f"route grant of {grant.prefix} to {grant.name!r}",
    )


class GrantList:
    """The verified route grants a node knows (gossiped, persisted by the agent)."""

    def __init__(self) -> None:
        self._all: dict[bytes, RouteGrant] = {}
        self._by_name: dict[str, list[RouteGrant]] = {}

    def add(self, grant: RouteGrant, ca_public_key: bytes | Roots) -> bool:
        """Verify and keep ``grant``; True when it was new."""
        verify_grant(grant, ca_public_key)
        encoded = grant.encode()
        if encoded in self._all:
            return False
        self._all[encoded] = grant
        self._by_name.setdefault(grant.name, []).append(grant)
        return True

    def approved(self, name: str, prefixes: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
        """Those of ``prefixes`` (advertised by node ``name``) some grant covers, in order."""
        grants = self._by_name.get(name, ())
        return tuple(p for p in prefixes if any(g.covers(name, p) for g in grants))

    def encode(self) -> bytes:
        writer = BinaryWriter().header(_GRANT_LIST_MAGIC, FORMAT_VERSION)
        writer.u32(len(self._all))
        for encoded in self._all:
            writer.long_bytes(encoded)
        return writer.getvalue()

    @classmethod
    def decode(cls, data: bytes, ca_public_key: bytes | Roots) -> GrantList:
        """Read :meth:`encode`'s output, verifying every grant again."""

        def read(reader: BinaryReader) -> GrantList:
            grants = cls()
            for _ in range(reader.u32()):
                grants.add(RouteGrant.decode(reader.long_bytes()), ca_public_key)
            return grants

        return decode_signed(data, "route grant list", _GRANT_LIST_MAGIC, read)

    def __iter__(self) -> Iterator[RouteGrant]:
        return iter(self._all.values())

    def __len__(self) -> int:
        return len(self._all)
