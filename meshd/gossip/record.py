"""The node-record codec: :class:`meshd.types.NodeRecord` <-> Serf tags.

Serf caps a node's tags at 512 bytes *as the agent encodes them*: one magic
byte followed by the msgpack of the ``map[string]string`` (Go's codec writes
the old msgpack spec, so a 32-255 byte string costs a 3-byte header, not the
2-byte ``str8`` of the new spec). :func:`tags_size` measures exactly that, and
:func:`encode_record` refuses a record that does not fit with a RecordError.

Tags (keys kept to one letter; binary fields are unpadded standard base64)::

    m  codec version ("1"); a record with another value is refused, not misread
    v  record version, decimal
    k  WireGuard public key: base64 of its 32 bytes without the "=" pad
    a  mesh addresses: base64 of (family byte 4|6, then 4|16 address bytes) each
    p  WireGuard UDP port, decimal
    e  endpoint candidates: base64 of one item each, in order:
         4 + 4 address bytes + 2 port bytes      "192.0.2.1:51820"
         6 + 16 address bytes + 2 port bytes     "[2001:db8::1]:51820"
         0 + length byte + UTF-8 text            anything else (host names), verbatim
    r  roles, sorted, comma-separated ([a-z0-9_-], 1-32 chars each)
    n  routes: base64 of (family byte, prefix length, the prefix's significant bytes) each
    c  certificate reference, verbatim text
    x  digest of the revocations this node holds ([A-Za-z0-9_-], at most 16 characters):
       two members with different digests exchange revocations; equal ones need not

Empty optional fields are left out. Tags this codec does not know are ignored
(other software may tag the node), so a record can grow new fields.

Public API:

- ``encode_record(record, *, limit=TAGS_LIMIT, extra_tags=None) -> dict[str, str]``
- ``decode_record(tags) -> NodeRecord``  (raises RecordError, and nothing else, on any input)
- ``tags_size(tags) -> int``; ``RECORD_KEYS``: the tag names the codec owns (to delete stale ones).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

from meshd.b64 import decode_b64, encode_b64
from meshd.binary import BinaryReader, BinaryWriter
from meshd.errors import DecodeError, RecordError
from meshd.hostport import format_host_port, parse_ip_port
from meshd.types import IPAddress, IPNetwork, NodeRecord

T = TypeVar("T")

TAGS_LIMIT = 512
CODEC_VERSION = "1"
RECORD_KEYS = frozenset("mvkapercnx")

_ROLE_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
_DIGEST_RE = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_MAX_ITEMS = 64
_MAX_VERSION = 2**64 - 1


def _old_spec_str(text: str) -> int:
    # fixstr up to 31 bytes, then raw16 / raw32: the old spec has no str8.
    size = len(text.encode("utf-8", "surrogatepass"))
    return size + (1 if size < 32 else 3 if size < 2**16 else 5)


def tags_size(tags: Mapping[str, str]) -> int:
    """The size Serf gives ``tags``: its magic byte plus the map in old-spec msgpack.

    Computed, not packed (msgpack stays inside the RPC client); a unit test checks
    it against msgpack and an integration test against the agent's own limit.
    """
    count = len(tags)
    size = 1 + (1 if count < 16 else 3 if count < 2**16 else 5)
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise RecordError("tags are not a map of strings")
        size += _old_spec_str(key) + _old_spec_str(value)
    return size


def _b64(data: bytes) -> str:
    return encode_b64(data, padded=False)


def _unb64(text: str, what: str) -> bytes:
    try:
        return decode_b64(text, padded=False)
    except DecodeError as exc:
        raise RecordError(f"{what}: {exc}") from exc


def _pack(items: Iterable[T], write: Callable[[BinaryWriter, T], object]) -> bytes:
    writer = BinaryWriter()
    for item in items:
        write(writer, item)
    return writer.getvalue()


def _write_endpoint(writer: BinaryWriter, endpoint: str) -> None:
    try:
        addr, port = parse_ip_port(endpoint)
    except DecodeError:
        pass  # a host name, or text only its author understands: carried verbatim
    else:
        # Binary only when decoding gives back the very same text.
        if format_host_port(addr, port) == endpoint:
            writer.address(addr).u16(port)
            return
    raw = endpoint.encode()
    if not raw or len(raw) > 255:
        raise RecordError(f"endpoint {endpoint!r} must be 1-255 bytes")
    writer.u8(0).short_bytes(raw)


def _write_route(writer: BinaryWriter, route: IPNetwork) -> None:
    significant = (route.prefixlen + 7) // 8
    writer.u8(route.version).u8(route.prefixlen).raw(route.network_address.packed[:significant])


def _check_count(what: str, items: tuple[object, ...] | frozenset[str]) -> None:
    if len(items) > _MAX_ITEMS:
        raise RecordError(f"{what}: at most {_MAX_ITEMS} entries, got {len(items)}")


def encode_record(
    record: NodeRecord,
    *,
    limit: int = TAGS_LIMIT,
    extra_tags: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The Serf tags for ``record``; RecordError if a field is invalid or it does not fit.

    ``extra_tags`` (other tags the node carries) count against ``limit`` but are
    not part of the result.
    """
    key = _unb64(record.public_key.rstrip("="), "public key")
    if len(key) != 32:
        raise RecordError(f"public key must be 32 bytes, got {len(key)}")
    if not record.addresses:
        raise RecordError("a record needs at least one mesh address")
    if not 0 < record.port < 65536:
        raise RecordError(f"port must be 1-65535, got {record.port}")
    if not 0 <= record.version <= _MAX_VERSION:
        raise RecordError(f"version must be 0 to 2**64-1, got {record.version}")
    for what, items in (
        ("addresses", record.addresses),
        ("endpoints", record.endpoints),
        ("roles", record.roles),
        ("routes", record.routes),
    ):
        _check_count(what, items)
    tags = {
        "m": CODEC_VERSION,
        "v": str(record.version),
        "k": _b64(key),
        "a": _b64(_pack(record.addresses, BinaryWriter.address)),
        "p": str(record.port),
    }
    if record.endpoints:
        tags["e"] = _b64(_pack(record.endpoints, _write_endpoint))
    if record.roles:
        bad = sorted(r for r in record.roles if not _ROLE_RE.match(r))
        if bad:
            raise RecordError(f"role names must match [a-z0-9_-]{{1,32}}: {bad!r}")
        tags["r"] = ",".join(sorted(record.roles))
    if record.routes:
        tags["n"] = _b64(_pack(record.routes, _write_route))
    if record.cert:
        tags["c"] = record.cert
    if record.revocations:
        if not _DIGEST_RE.match(record.revocations):
            raise RecordError(f"revocation digest {record.revocations!r} is malformed")
        tags["x"] = record.revocations
    others = {k: v for k, v in (extra_tags or {}).items() if k not in RECORD_KEYS}
    size = tags_size({**others, **tags})
    if size > limit:
        raise RecordError(
            f"node record needs {size} bytes of Serf tags, more than the {limit}-byte limit "
            f"({len(record.endpoints)} endpoints, {len(record.routes)} routes, "
            f"{len(record.cert)}-character certificate reference)"
        )
    return tags


def _reader(text: str, what: str) -> BinaryReader:
    return BinaryReader(_unb64(text, what), what)


def _families(reader: BinaryReader) -> Iterator[int]:
    """The family byte that starts each entry, until the end; at most _MAX_ITEMS entries."""
    count = 0
    while reader.remaining:
        count += 1
        if count > _MAX_ITEMS:
            raise reader.fail(f"more than {_MAX_ITEMS} entries")
        yield reader.u8()


def _decode_addresses(text: str) -> tuple[IPAddress, ...]:
    reader = _reader(text, "addresses")
    addresses = tuple(reader.address_of(family) for family in _families(reader))
    if not addresses:
        raise RecordError("addresses: empty")
    return addresses


def _decode_endpoints(text: str) -> tuple[str, ...]:
    reader = _reader(text, "endpoints")
    endpoints: list[str] = []
    for family in _families(reader):
        if family == 0:
            raw = reader.short_bytes()
            try:
                endpoints.append(raw.decode())
            except UnicodeDecodeError as exc:
                raise RecordError("endpoints: a host name is not UTF-8") from exc
            continue
        addr = reader.address_of(family)
        port = reader.u16()
        if port == 0:
            raise RecordError("endpoints: port 0")
        endpoints.append(format_host_port(addr, port))
    return tuple(endpoints)


def _decode_routes(text: str) -> tuple[IPNetwork, ...]:
    reader = _reader(text, "routes")
    routes: list[IPNetwork] = []
    for family in _families(reader):
        width = {4: 4, 6: 16}.get(family)
        if width is None:
            raise RecordError(f"routes: unknown address family {family}")
        prefixlen = reader.u8()
        if prefixlen > width * 8:
            raise RecordError(f"routes: prefix length {prefixlen} too long")
        packed = reader.raw((prefixlen + 7) // 8).ljust(width, b"\0")
        try:
            routes.append(ipaddress.ip_network((packed, prefixlen)))
        except ValueError as exc:
            raise RecordError(f"routes: {exc}") from exc
    return tuple(routes)


def _decimal(tags: Mapping[str, object], key: str, what: str, low: int, high: int) -> int:
    text = tags.get(key)
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 20:
        raise RecordError(f"{what}: missing or not a decimal number")
    value = int(text)
    if not low <= value <= high:
        raise RecordError(f"{what}: {value} out of range")
    return value


def decode_record(tags: Mapping[str, object]) -> NodeRecord:
    """The record in a member's tags; RecordError for anything missing or malformed.

    Safe on any input, hostile gossip included: no other exception escapes.
    """
    try:
        return _decode(tags)
    except RecordError:
        raise
    except Exception as exc:  # a decoder bug must not take the membership loop down
        raise RecordError(f"undecodable record: {type(exc).__name__}") from exc


def _decode(tags: Mapping[str, object]) -> NodeRecord:
    """The decoder proper: RecordError for bad input, anything else is a bug."""
    try:
        return _decode_fields(tags)
    except DecodeError as exc:  # the binary reader's error, converted at this boundary
        raise RecordError(str(exc)) from exc


def _decode_fields(tags: Mapping[str, object]) -> NodeRecord:
    if not isinstance(tags, Mapping):
        raise RecordError("tags are not a map")
    codec = tags.get("m")
    if codec is None:
        raise RecordError("no meshd record in the tags")
    if codec != CODEC_VERSION:
        raise RecordError(
            f"record codec {codec!r} is not supported (this node reads {CODEC_VERSION!r})"
        )

    def text(key: str) -> str:
        value = tags.get(key, "")
        if not isinstance(value, str):
            raise RecordError(f"tag {key!r} is not a string")
        return value

    key = _unb64(text("k"), "public key")
    if len(key) != 32:
        raise RecordError(f"public key must be 32 bytes, got {len(key)}")
    roles_text = text("r")
    roles = frozenset(roles_text.split(",")) if roles_text else frozenset()
    if len(roles) > _MAX_ITEMS or not all(_ROLE_RE.match(r) for r in roles):
        raise RecordError("roles: malformed")
    endpoints = text("e")
    routes = text("n")
    digest = text("x")
    if digest and not _DIGEST_RE.match(digest):
        raise RecordError("revocation digest: malformed")
    return NodeRecord(
        public_key=encode_b64(key),
        addresses=_decode_addresses(text("a")),
        port=_decimal(tags, "p", "port", 1, 65535),
        endpoints=_decode_endpoints(endpoints) if endpoints else (),
        roles=roles,
        routes=_decode_routes(routes) if routes else (),
        cert=text("c"),
        version=_decimal(tags, "v", "version", 0, _MAX_VERSION),
        revocations=digest,
    )
