"""The deterministic binary format of certificates, revocations, tokens and revocation pages.

Big-endian fixed-width integers, byte strings prefixed with their length (one
byte for ``short_bytes``, two for ``long_bytes``), UTF-8 text as short bytes,
an IP address as its version byte and packed bytes, and a header of magic bytes
and a format version. One value has one encoding: the reader refuses what the
writer would never write (a truncated field, an unknown address family, trailing
bytes once :meth:`BinaryReader.end` is called).

The reader raises :class:`meshd.errors.DecodeError`, which is no MeshdError: its
caller knows what the bytes were meant to be and converts it
(``raise IdentityError(str(exc)) from exc``). The writer raises ``ValueError``
for a value the format cannot hold, which is the caller's mistake.

    data = BinaryWriter().header(b"MC", 1).u16(7).text("n1").getvalue()
    reader = BinaryReader(data, "certificate")
    reader.header(b"MC", 1); reader.u16(); reader.text(); reader.end()
"""

from __future__ import annotations

import ipaddress
import struct

from meshd.errors import DecodeError
from meshd.types import IPAddress

# Values a reader accepts as u64: they also fit a signed 64-bit integer, which is what
# the other side's time and duration types hold.
MAX_U64 = 2**63 - 1

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class BinaryWriter:
    """Builds one encoding; every method returns the writer, so calls chain."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def raw(self, data: bytes) -> BinaryWriter:
        self._parts.append(data)
        return self

    def u8(self, value: int) -> BinaryWriter:
        if not 0 <= value <= 0xFF:
            raise ValueError(f"a byte holds 0 to 255, not {value}")
        return self.raw(bytes((value,)))

    def u16(self, value: int) -> BinaryWriter:
        return self.raw(_pack(_U16, value))

    def u32(self, value: int) -> BinaryWriter:
        return self.raw(_pack(_U32, value))

    def u64(self, value: int) -> BinaryWriter:
        return self.raw(_pack(_U64, value))

    def short_bytes(self, data: bytes) -> BinaryWriter:
        if len(data) > 0xFF:
            raise ValueError(f"a short field holds at most 255 bytes, got {len(data)}")
        return self.u8(len(data)).raw(data)

    def long_bytes(self, data: bytes) -> BinaryWriter:
        if len(data) > 0xFFFF:
            raise ValueError(f"a field holds at most 65535 bytes, got {len(data)}")
        return self.u16(len(data)).raw(data)

    def text(self, value: str) -> BinaryWriter:
        return self.short_bytes(value.encode("utf-8"))

    def address(self, address: IPAddress) -> BinaryWriter:
        return self.u8(address.version).raw(address.packed)

    def header(self, magic: bytes, version: int) -> BinaryWriter:
        return self.raw(magic).u8(version)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


def _pack(layout: struct.Struct, value: int) -> bytes:
    try:
        return layout.pack(value)
    except struct.error as exc:
        raise ValueError(f"{value} does not fit {layout.size} bytes") from exc


class BinaryReader:
    """Reads what :class:`BinaryWriter` wrote; a shortfall or junk is a DecodeError.

    ``what`` names the value for the message: ``malformed certificate: truncated``.
    """

    def __init__(self, data: bytes, what: str) -> None:
        self._data = bytes(data)
        self._pos = 0
        self.what = what

    def fail(self, reason: str) -> DecodeError:
        """The error to raise for a decoded value its caller finds wrong."""
        return DecodeError(f"malformed {self.what}: {reason}")

    def raw(self, count: int) -> bytes:
        end = self._pos + count
        if end > len(self._data):
            raise self.fail("truncated")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return self.raw(1)[0]

    def u16(self) -> int:
        value: int = _U16.unpack(self.raw(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack(self.raw(4))[0]
        return value

    def u64(self) -> int:
        """A u64 of at most :data:`MAX_U64`."""
        value: int = _U64.unpack(self.raw(8))[0]
        if value > MAX_U64:
            raise self.fail("number out of range")
        return value

    def short_bytes(self) -> bytes:
        return self.raw(self.u8())

    def long_bytes(self) -> bytes:
        return self.raw(self.u16())

    def text(self) -> str:
        try:
            return self.short_bytes().decode("utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            raise self.fail("text is not UTF-8") from exc

    def address(self) -> IPAddress:
        return self.address_of(self.u8())

    def address_of(self, version: int) -> IPAddress:
        """The packed address of IP ``version`` (a version byte the caller read itself)."""
        if version == 4:
            return ipaddress.IPv4Address(self.raw(4))
        if version == 6:
            return ipaddress.IPv6Address(self.raw(16))
        raise self.fail(f"unknown address family {version}")

    def header(self, magic: bytes, version: int) -> None:
        """Check the magic bytes and the format version :meth:`BinaryWriter.header` wrote."""
        if self.raw(len(magic)) != magic:
            raise self.fail("not a meshd encoding (wrong magic)")
        found = self.u8()
        if found != version:
            raise self.fail(f"unsupported format version {found}")

    @property
    def remaining(self) -> int:
        """How many bytes are left to read."""
        return len(self._data) - self._pos

    def end(self) -> None:
        """Refuse trailing bytes: one value, one encoding."""
        if self.remaining:
            raise self.fail(f"{self.remaining} unexpected trailing bytes")
