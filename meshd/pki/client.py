"""Client records: CA-signed descriptions of plain WireGuard clients (phones, laptops).

A client runs only a stock WireGuard app: it is no member, publishes nothing and
gossips nothing. The network CA signs what the mesh needs to know of it: its
name, WireGuard key, mesh address and the gateway node it dials. Client records
travel and persist like route grants and revocations (one broadcast, then the
trust digest's anti-entropy; ``<state_dir>/clients``), so a gateway that restarts,
or a client moved to another gateway (a newer record of the same name), needs no
server. A client is removed by revoking its key (:class:`Revocation`).

Public API::

    ClientRecord.encode() / .decode(data); sign_client(signing_key, *, network_id, name,
        public_key, address, gateway, issued_at); verify_client(record, ca_public_key)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from nacl.signing import SigningKey

from meshd.binary import BinaryReader, BinaryWriter
from meshd.identity import decode_key, encode_key
from meshd.pki.certificate import (
    FORMAT_VERSION,
    KEY_ID_LEN,
    KEY_LEN,
    SIGNATURE_LEN,
    Roots,
    SignedValue,
    check_ca_statement,
    check_name,
    decode_signed,
    key_id,
    read_name,
)
from meshd.types import IPAddress

CLIENT_MAGIC = b"MC"


@dataclass(frozen=True)
class ClientRecord(SignedValue):
    """A CA-signed statement: client ``name`` has this key and address, behind ``gateway``."""

    network_id: str
    name: str
    public_key: str
    address: IPAddress
    gateway: str
    issued_at: int
    issuer_key_id: bytes
    signature: bytes = field(default=b"", repr=False)
    kind: ClassVar[str] = "client record"

    def signed_part(self) -> bytes:
        return (
            BinaryWriter()
            .header(CLIENT_MAGIC, FORMAT_VERSION)
            .raw(bytes.fromhex(self.network_id))
            .raw(self.issuer_key_id)
            .text(self.name)
            .raw(decode_key(self.public_key, what="client key"))
            .address(self.address)
            .text(self.gateway)
            .u64(self.issued_at)
            .getvalue()
        )

    def encode(self) -> bytes:
        return self.signed_encoding()

    @classmethod
    def decode(cls, data: bytes) -> ClientRecord:
        """Parse a client record; IdentityError if malformed. The signature is not checked."""

        def read(reader: BinaryReader) -> ClientRecord:
            network_id = reader.raw(KEY_ID_LEN).hex()
            issuer = reader.raw(KEY_ID_LEN)
            name = read_name(reader, "name")
            public_key = encode_key(reader.raw(KEY_LEN))
            address = reader.address()
            gateway = read_name(reader, "gateway")
            issued_at = reader.u64()
            signature = reader.raw(SIGNATURE_LEN)
            return cls(network_id, name, public_key, address, gateway, issued_at, issuer, signature)

        return decode_signed(data, "client record", CLIENT_MAGIC, read)


def sign_client(
    signing_key: SigningKey,
    *,
    network_id: str,
    name: str,
    public_key: str,
    address: IPAddress,
    gateway: str,
    issued_at: int,
) -> ClientRecord:
    check_name(name, what="client name")
    check_name(gateway, what="gateway name")
    decode_key(public_key, what="client key")
    unsigned = ClientRecord(
        network_id=network_id,
        name=name,
        public_key=public_key,
        address=address,
        gateway=gateway,
        issued_at=issued_at,
        issuer_key_id=key_id(bytes(signing_key.verify_key)),
    )
    return unsigned.signed_by(signing_key)


def verify_client(record: ClientRecord, ca_public_key: bytes | Roots) -> None:
    check_ca_statement(
        record,
        record.network_id,
        record.issuer_key_id,
        ca_public_key,
        f"client record of {record.name!r}",
    )
