"""Revocations: CA-signed records naming a certificate serial and/or a WireGuard key.

A :class:`RevocationList` only ever holds verified ones, and a chain in which any
certificate matches one is refused (:func:`meshd.pki.certificate.verify_chain`;
a revoked enrolment key refuses only what it signs afterwards). A revocation
(~150 bytes) fits a Serf user event.

Public API::

    Revocation.encode() / .decode(data); verify_revocation(rev, roots)
    sign_revocation(signing_key, *, network_id, name, serial, public_key, revoked_at)
    RevocationList.add(rev, roots) / .find(cert) / .encode() / .decode(data, roots)
      .keep_only(roots) -> how many were dropped

A revocation signed by any trusted CA key covers certificates of every trusted
key: during a CA rotation a member holds a certificate of the old CA and one of
the new, and revoking one must revoke both (its serial differs, its WireGuard
key does not). Only verified revocations enter a list, so this widens nothing
beyond the keys the node already trusts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from nacl.signing import SigningKey

from meshd.binary import BinaryReader, BinaryWriter
from meshd.identity import decode_key, encode_key
from meshd.pki.certificate import (
    FORMAT_VERSION,
    KEY_ID_LEN,
    KEY_LEN,
    NO_SERIAL,
    SERIAL_LEN,
    SIGNATURE_LEN,
    Certificate,
    Roots,
    SignedValue,
    check_ca_statement,
    check_name,
    decode_signed,
    key_id,
    read_name,
)

_REVOCATION_MAGIC = b"MR"
_REVOCATION_LIST_MAGIC = b"ML"


@dataclass(frozen=True)
class Revocation(SignedValue):
    """A CA-signed statement: the certificate ``serial`` and/or the key ``public_key`` is out.

    ``name`` says whom it concerns, for people; matching uses serial and key only.
    """

    network_id: str
    name: str
    serial: bytes
    public_key: str
    revoked_at: int
    issuer_key_id: bytes
    signature: bytes = field(default=b"", repr=False)
    kind: ClassVar[str] = "revocation"

    def signed_part(self) -> bytes:
        writer = (
            BinaryWriter()
            .header(_REVOCATION_MAGIC, FORMAT_VERSION)
            .raw(bytes.fromhex(self.network_id))
            .raw(self.issuer_key_id)
            .raw(self.serial)
        )
        if self.public_key:
            writer.u8(1).raw(decode_key(self.public_key, what="revoked key"))
        else:
            writer.u8(0)
        return writer.text(self.name).u64(self.revoked_at).getvalue()

    def encode(self) -> bytes:
        return self.signed_encoding()

    @classmethod
    def decode(cls, data: bytes) -> Revocation:
        """Parse a revocation; IdentityError if malformed. The signature is not checked."""

        def read(reader: BinaryReader) -> Revocation:
            network_id = reader.raw(KEY_ID_LEN).hex()
            issuer = reader.raw(KEY_ID_LEN)
            serial = reader.raw(SERIAL_LEN)
            has_key = reader.u8()
            if has_key not in (0, 1):
                raise reader.fail("bad key flag")
            public_key = encode_key(reader.raw(KEY_LEN)) if has_key else ""
            name = read_name(reader, "name")
            revoked_at = reader.u64()
            signature = reader.raw(SIGNATURE_LEN)
            if serial == NO_SERIAL and not public_key:
                raise reader.fail("names neither a serial nor a key")
            return cls(network_id, name, serial, public_key, revoked_at, issuer, signature)

        return decode_signed(data, "revocation", _REVOCATION_MAGIC, read)

    def matches(self, cert: Certificate) -> bool:
        if self.serial != NO_SERIAL and cert.serial == self.serial:
            return True
        return bool(self.public_key) and cert.public_key == self.public_key


def sign_revocation(
    signing_key: SigningKey,
    *,
    network_id: str,
    name: str,
    serial: bytes,
    public_key: str,
    revoked_at: int,
) -> Revocation:
    check_name(name, what="revoked name")
    unsigned = Revocation(
        network_id=network_id,
        name=name,
        serial=serial,
        public_key=public_key,
        revoked_at=revoked_at,
        issuer_key_id=key_id(bytes(signing_key.verify_key)),
    )
    return unsigned.signed_by(signing_key)


def verify_revocation(revocation: Revocation, roots: bytes | Roots) -> None:
    """Check a revocation was signed by a trusted CA key of the network."""
    check_ca_statement(
        revocation,
        revocation.network_id,
        revocation.issuer_key_id,
        roots,
        f"revocation of {revocation.name!r}",
    )


class RevocationList:
    """The verified revocations a node knows (gossiped, persisted by the agent)."""

    def __init__(self) -> None:
        self._by_serial: dict[bytes, Revocation] = {}
        self._by_key: dict[str, Revocation] = {}
        self._all: dict[bytes, Revocation] = {}

    def add(self, revocation: Revocation, roots: bytes | Roots) -> bool:
        """Verify and keep ``revocation``; True when it was new."""
        verify_revocation(revocation, roots)
        encoded = revocation.encode()
        if encoded in self._all:
            return False
        self._all[encoded] = revocation
        if revocation.serial != NO_SERIAL:
            self._by_serial[revocation.serial] = revocation
        if revocation.public_key:
            self._by_key[revocation.public_key] = revocation
        return True

    def find(self, cert: Certificate) -> Revocation | None:
        """The revocation that covers ``cert``, if any."""
        for found in (self._by_serial.get(cert.serial), self._by_key.get(cert.public_key)):
            if found is not None and found.matches(cert):
                return found
        return None

    def revokes_key(self, public_key: str) -> bool:
        """Whether a revocation names this key (a removed plain WireGuard client)."""
        return public_key in self._by_key

    def encode(self) -> bytes:
        """All revocations, for the agent's state file."""
        writer = BinaryWriter().header(_REVOCATION_LIST_MAGIC, FORMAT_VERSION)
        writer.u32(len(self._all))
        for encoded in self._all:
            writer.long_bytes(encoded)
        return writer.getvalue()

    def keep_only(self, roots: Roots) -> int:
        """Drop what no key of ``roots`` signed (after a CA key is retired); how many."""
        kept = [r for r in self._all.values() if roots.find(r.issuer_key_id) is not None]
        dropped = len(self._all) - len(kept)
        if dropped:
            self._all.clear()
            self._by_serial.clear()
            self._by_key.clear()
            for revocation in kept:
                self.add(revocation, roots)
        return dropped

    @classmethod
    def decode(cls, data: bytes, roots: bytes | Roots) -> RevocationList:
        """Read :meth:`encode`'s output, verifying every revocation again (one signed by
        a CA key no longer trusted, e.g. retired, is left out)."""
        trusted = Roots.of(roots)

        def read(reader: BinaryReader) -> RevocationList:
            revoked = cls()
            for _ in range(reader.u32()):
                revocation = Revocation.decode(reader.long_bytes())
                if trusted.find(revocation.issuer_key_id) is not None:
                    revoked.add(revocation, trusted)
            return revoked

        return decode_signed(data, "revocation list", _REVOCATION_LIST_MAGIC, read)

    def __iter__(self) -> Iterator[Revocation]:
        return iter(self._all.values())

    def __len__(self) -> int:
        return len(self._all)
