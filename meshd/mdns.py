"""mDNS (python-zeroconf): meshd nodes advertise ``_meshd._udp`` on their LANs and look
for each other there. Nothing else in meshd imports ``zeroconf``.

What a node advertises (:class:`Advert`), as TXT entries, never a secret::

    v=1  net=<network id>  ca=<CA fingerprint>  key=<WireGuard public key>
    name=<node name>  enrol=<enrolment port>   (enrol only on a node that admits)

with the service's port = its WireGuard port and its addresses = the LAN addresses
it advertises on. An answer is a *hint*: anyone on the LAN can send one. What
decides is the certificate check (enrolment: the seed's chain must lead to the
token's CA) or a WireGuard handshake with the certified key at that address.

    ca_fingerprint(ca_public_key) -> str
    encode_txt(advert) -> dict[str, str];  decode_txt(properties, addresses, port) -> Advert
    LanService(addresses)            # one zeroconf instance bound to those addresses only
        await .start(); await .advertise(advert); await .browse(on_advert); await .close()
    await find_seeds(addresses, network_id, ca_fp, timeout=5, settle=0.5, report=...)

Only IPv4 for now: the LAN addresses given, never loopback or the mesh interface
(zeroconf binds every interface unless told which, see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshd.errors import DecodeError, MeshdError
from meshd.types import IPAddress

log = logging.getLogger(__name__)

SERVICE_TYPE = "_meshd._udp.local."
TXT_VERSION = "1"
RESOLVE_TIMEOUT_MS = 1500
_KEY_RE = re.compile(r"[A-Za-z0-9+/]{42,43}=?")
_HEX_RE = re.compile(r"[0-9a-f]{16,64}")
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def ca_fingerprint(ca_public_key: bytes) -> str:
    """The CA key's fingerprint as an advert carries it: SHA-256, 32 hex digits."""
    return hashlib.sha256(ca_public_key).hexdigest()[:32]


@dataclass(frozen=True)
class Advert:
    """One node's ``_meshd._udp`` advertisement, as published or as heard (a hint)."""

    name: str
    network_id: str
    ca_fingerprint: str
    public_key: str
    addresses: tuple[IPAddress, ...]
    port: int  # its WireGuard port
    enrol_port: int | None = None  # None: this node admits nobody

    @property
    def instance(self) -> str:
        """The service instance name: the node name and a piece of its key (unique)."""
        tag = hashlib.sha256(self.public_key.encode()).hexdigest()[:8]
        return f"{self.name}-{tag}"


def encode_txt(advert: Advert) -> dict[str, str]:
    txt = {
        "v": TXT_VERSION,
        "net": advert.network_id,
        "ca": advert.ca_fingerprint,
        "key": advert.public_key,
        "name": advert.name,
    }
    if advert.enrol_port is not None:
        txt["enrol"] = str(advert.enrol_port)
    return txt


def _text(properties: Mapping[Any, Any], key: str) -> str | None:
    value = properties.get(key.encode(), properties.get(key))
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise DecodeError(f"TXT {key} is not ASCII") from None
    return str(value)


def _port(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise DecodeError(f"{what} {text!r} is not a port")
    return int(text)


def decode_txt(properties: Mapping[Any, Any], addresses: Iterable[str], port: int | None) -> Advert:
    """An advert from what mDNS resolved; DecodeError for anything that is not one of ours."""
    if _text(properties, "v") != TXT_VERSION:
        raise DecodeError("not a version 1 meshd advert")
    fields: dict[str, str] = {}
    for key, pattern in (("net", _HEX_RE), ("ca", _HEX_RE), ("key", _KEY_RE), ("name", _NAME_RE)):
        value = _text(properties, key)
        if value is None or not pattern.fullmatch(value):
            raise DecodeError(f"TXT {key} is missing or malformed")
        fields[key] = value
    wg_port = _port(None if port is None else str(port), "service port")
    if wg_port is None:
        raise DecodeError("the service has no port")
    found: list[IPAddress] = []
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise DecodeError(f"address {text!r} is not an IP address") from None
        if not (address.is_loopback or address.is_link_local or address.is_multicast):
            found.append(address)
    if not found:
        raise DecodeError("the service has no usable address")
    return Advert(
        name=fields["name"],
        network_id=fields["net"],
        ca_fingerprint=fields["ca"],
        public_key=fields["key"],
        addresses=tuple(found),
        port=wg_port,
        enrol_port=_port(_text(properties, "enrol"), "TXT enrol"),
    )


OnAdvert = Callable[[str, Advert], None]
"""Called in the loop with the instance name and the advert, for every advert heard
(again after each change). Two instances may claim one key: one of them lies."""
OnGone = Callable[[str], None]
"""Called in the loop with the instance name of an advert withdrawn or expired."""
GOODBYE_TIMEOUT = 0.3  # the agent's shutdown gives each task 0.5 s


class MdnsError(MeshdError):
    """mDNS could not be started on the given addresses."""


class LanService:
    """One zeroconf instance on ``addresses`` (the LAN side of this machine only)."""

    def __init__(self, addresses: Sequence[IPAddress]) -> None:
        self.addresses = tuple(a for a in addresses if a.version == 4)
        self._zc: Any = None
        self._browser: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if not self.addresses:
            raise MdnsError("no LAN address to run mDNS on")
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        try:
            self._zc = AsyncZeroconf(
                interfaces=[str(a) for a in self.addresses], ip_version=IPVersion.V4Only
            )
        except OSError as exc:
            raise MdnsError(f"mDNS on {', '.join(map(str, self.addresses))}: {exc}") from exc

    async def advertise(self, advert: Advert) -> None:
        """Publish ``advert`` on this instance's addresses (probing takes about a second)."""
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{advert.instance}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(str(a)) for a in self.addresses],
            port=advert.port,
            properties=encode_txt(advert),
            server=f"{advert.instance}.local.",
        )
        from zeroconf import Error

        try:
            registered = await self._zc.async_register_service(info, allow_name_change=True)
            await registered
        except Error as exc:
            raise MdnsError(f"advertising {advert.instance}: {exc}") from exc

    async def browse(self, on_advert: OnAdvert, on_gone: OnGone | None = None) -> None:
        """Hear every ``_meshd._udp`` advert on the LAN; ``on_advert`` gets the valid ones,
        ``on_gone`` the instance name of one withdrawn or expired."""
        from zeroconf import ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser

        def changed(
            zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            if state_change is ServiceStateChange.Removed:
                if on_gone is not None:
                    on_gone(name.removesuffix("." + SERVICE_TYPE))
                return
            instance = name.removesuffix("." + SERVICE_TYPE)
            task = asyncio.get_running_loop().create_task(self._resolve(instance, on_advert))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[changed])

    async def _resolve(self, instance: str, on_advert: OnAdvert) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}")
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS: %s did not resolve", instance)
            return
        try:
            advert = decode_txt(info.properties or {}, info.parsed_addresses(), info.port)
        except DecodeError as exc:
            log.debug("mDNS: ignoring %s: %s", instance, exc)
            return
        on_advert(instance, advert)

    async def close(self) -> None:
        """Say goodbye (adverts withdrawn) and close the sockets."""
        for task in self._tasks:
            task.cancel()
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(GOODBYE_TIMEOUT):
                    await self._zc.async_unregister_all_services()
            with contextlib.suppress(Exception):
                await self._zc.async_close()
            self._zc = None


async def find_seeds(
    addresses: Sequence[IPAddress],
    network_id: str,
    ca_fp: str,
    *,
    timeout: float = 5.0,
    settle: float = 0.5,
    report: Callable[[str], None] = lambda _line: None,
) -> list[Advert]:
    """Seeds of network ``network_id`` (CA ``ca_fp``) heard on the LAN, in the order heard.

    Browses until ``settle`` s after the first match (others answer within the same
    burst), or ``timeout`` s with none. Adverts of other networks are reported and
    left out; an advert that claims the network is only a hint (the caller's
    enrolment checks the seed's certificate).
    """
    found: dict[str, Advert] = {}
    first = asyncio.Event()
    others: set[str] = set()

    def heard(instance: str, advert: Advert) -> None:
        if advert.network_id != network_id or advert.ca_fingerprint != ca_fp:
            if instance not in others:
                others.add(instance)
                report(f"{advert.name} ({advert.addresses[0]}) is of another network")
            return
        if advert.enrol_port is None or instance in found:
            return
        found[instance] = advert
        report(f"found seed {advert.name} at {advert.addresses[0]}:{advert.enrol_port}")
        first.set()

    service = LanService(addresses)
    await service.start()
    started = time.monotonic()
    try:
        await service.browse(heard)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await first.wait()
        if found:
            await asyncio.sleep(max(0.0, min(settle, timeout - (time.monotonic() - started))))
    finally:
        await service.close()
    return list(found.values())
