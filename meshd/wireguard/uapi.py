"""The WireGuard cross-platform UAPI text protocol: encode ``set=1``, parse ``get=1``.

Pure functions, no I/O (https://www.wireguard.com/xplatform/): a request is
``key=value`` lines ending with an empty line; keys travel as lowercase hex; the
answer to ``get=1`` lists the device's keys, then each peer starting at its
``public_key`` line, then ``errno=N``. :mod:`meshd.wireguard.userspace` moves the
text over the socket.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from meshd.errors import IdentityError, WireGuardError
from meshd.identity import decode_key, encode_key, public_key_of
from meshd.wireguard.backend import (
    DeviceConfig,
    DeviceState,
    OpKind,
    PeerOp,
    PeerState,
    key_hex,
    normalize_endpoint,
    parse_network,
    preshared_or_none,
    sorted_networks,
)

GET_REQUEST = b"get=1\n\n"


def key_to_hex(key: str, *, what: str = "key") -> str:
    try:
        return key_hex(key)
    except IdentityError:
        decode_key(key, what=what)  # raises again, naming what the key is
        raise


# Cached: a full read converts the same 1,000 keys every time (errors are not cached).
@functools.lru_cache(maxsize=1 << 16)
def _key_of(text: str) -> str | None:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return encode_key(raw) if len(raw) == 32 else None


def hex_to_key(text: str, *, what: str = "key") -> str:
    key = _key_of(text)
    if key is not None:
        return key
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise WireGuardError(f"UAPI: {what} is not hex") from exc
    raise WireGuardError(f"UAPI: {what} is {len(raw)} bytes, not 32")


def encode_set(device: DeviceConfig | None, ops: Sequence[PeerOp]) -> bytes:
    """One ``set=1`` transaction: the device settings (if given), then every peer op in order.

    Never ``replace_peers``: peers not named keep their sessions. An ``UPDATE`` carries
    ``update_only`` so a peer removed meanwhile is not re-created half-configured.
    """
    lines = ["set=1"]
    if device is not None:
        lines.append(f"private_key={key_to_hex(device.private_key, what='private key')}")
        if device.listen_port is not None:
            lines.append(f"listen_port={device.listen_port}")
        if device.fwmark is not None:
            lines.append(f"fwmark={device.fwmark}")
    for op in ops:
        lines.append(f"public_key={key_to_hex(op.public_key, what='peer public key')}")
        if op.kind is OpKind.REMOVE:
            lines.append("remove=true")
            continue
        if op.kind is OpKind.UPDATE:
            lines.append("update_only=true")
        if op.preshared_key is not None:
            lines.append(f"preshared_key={key_to_hex(op.preshared_key, what='preshared key')}")
        if op.endpoint is not None:
            lines.append(f"endpoint={normalize_endpoint(op.endpoint)}")
        if op.keepalive is not None:
            lines.append(f"persistent_keepalive_interval={op.keepalive}")
        if op.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines.extend(f"allowed_ip={net.with_prefixlen}" for net in op.allowed_ips)
    return ("\n".join(lines) + "\n\n").encode("ascii")


def parse_errno(text: str) -> int:
    """The ``errno`` of an answer to ``set=1``; WireGuardError when there is none."""
    for line in text.splitlines():
        if line.startswith("errno="):
            try:
                return int(line[6:])
            except ValueError as exc:
                raise WireGuardError(f"UAPI: bad errno line {line!r}") from exc
    raise WireGuardError("UAPI: answer without errno")


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise WireGuardError(f"UAPI: {key}={value!r} is not a number") from exc


def _count(fields: dict[str, str], key: str) -> int:
    value = fields.get(key)
    return 0 if value is None else _int(key, value)


def _peer(fields: dict[str, str], allowed: list[str]) -> PeerState:
    endpoint = fields.get("endpoint")
    psk = fields.get("preshared_key")
    if psk is not None:
        psk = hex_to_key(psk, what="preshared key")
    networks = []
    for value in allowed:
        try:
            networks.append(parse_network(value))
        except WireGuardError as exc:
            raise WireGuardError(f"UAPI: allowed_ip={value!r} is not a prefix") from exc
    seconds = _count(fields, "last_handshake_time_sec")
    nanoseconds = _count(fields, "last_handshake_time_nsec")
    return PeerState(
        hex_to_key(fields["public_key"], what="peer public key"),
        None if endpoint is None else normalize_endpoint(endpoint),
        sorted_networks(networks),
        _count(fields, "persistent_keepalive_interval") or None,
        preshared_or_none(psk),
        seconds + nanoseconds / 1e9 if seconds or nanoseconds else None,
        _count(fields, "rx_bytes"),
        _count(fields, "tx_bytes"),
    )


def parse_get(text: str) -> DeviceState:
    """The device state in an answer to ``get=1``; WireGuardError on a non-zero errno.

    Keys newer versions add (and ``protocol_version``) are ignored. The lines are
    gathered per peer and converted once (1,000 peers: ~10,000 lines a read, and the
    agent reads every 2.5 s for the handshakes).
    """
    device: dict[str, str] = {}
    peers: list[PeerState] = []
    fields: dict[str, str] | None = None  # the current peer's lines
    allowed: list[str] = []
    errno: int | None = None
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise WireGuardError(f"UAPI: malformed line {line[:40]!r}")
        if key == "allowed_ip":
            if fields is not None:
                allowed.append(value)
        elif key == "public_key":
            if fields is not None:
                peers.append(_peer(fields, allowed))
            fields, allowed = {key: value}, []
        elif key == "errno":
            errno = _int(key, value)
        elif fields is None:
            device[key] = value
        else:
            fields[key] = value
    if fields is not None:
        peers.append(_peer(fields, allowed))
    if errno is None:
        raise WireGuardError("UAPI: answer to get=1 without errno (truncated?)")
    if errno != 0:
        raise WireGuardError(f"UAPI: get=1 failed with errno {errno}")
    private_key = device.get("private_key")
    public_key = None
    if private_key is not None:
        public_key = public_key_of(hex_to_key(private_key, what="private key"))
    listen_port = _count(device, "listen_port")
    fwmark = _count(device, "fwmark") or None
    return DeviceState(
        public_key=public_key, listen_port=listen_port, fwmark=fwmark, peers=tuple(peers)
    )
