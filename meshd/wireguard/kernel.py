"""The kernel backend: the Linux WireGuard module through pyroute2's generic netlink.

The interface is an ordinary ``wireguard`` link (created through
:mod:`meshd.netlink`); its keys and peers are set over the ``wireguard`` generic
netlink family. There is no daemon to supervise. Each peer operation is one
netlink message, applied in the plan's order (ops that give prefixes come first,
so a prefix moving between peers always has an owner).

Only machines with the module exercise this backend; ``backend = "auto"`` falls
back to :mod:`meshd.wireguard.userspace` where creating the link fails.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
from collections.abc import Sequence
from typing import Any

from meshd.b64 import encode_b64
from meshd.errors import NetlinkError, WireGuardError
from meshd.hostport import format_host_port
from meshd.netlink import Netlink, netns_socket
from meshd.types import IPNetwork
from meshd.wireguard.backend import (
    DeviceConfig,
    DeviceState,
    OpKind,
    PeerOp,
    PeerState,
    RestartHook,
    normalize_endpoint,
    parse_endpoint,
    preshared_or_none,
    sorted_networks,
)

log = logging.getLogger(__name__)

_NETLINK_GENERIC = 16  # linux/netlink.h; the socket module does not name it


def _key_text(value: Any) -> str | None:
    # pyroute2 hands keys back as an NLA object, base64 bytes or raw bytes by version.
    if value is None:
        return None
    if hasattr(value, "get") and not isinstance(value, (bytes, str)):
        value = value.get("value") or value.get("key")
    if isinstance(value, bytes):
        return encode_b64(value) if len(value) == 32 else value.decode()
    return str(value)


def _peer_dict(op: PeerOp) -> dict[str, Any]:
    peer: dict[str, Any] = {"public_key": op.public_key}
    if op.kind is OpKind.REMOVE:
        peer["remove"] = True
        return peer
    if op.kind is OpKind.UPDATE:
        peer["update_only"] = True
    if op.preshared_key is not None:
        peer["preshared_key"] = op.preshared_key
    if op.endpoint is not None:
        address, port = parse_endpoint(op.endpoint)
        peer["endpoint_addr"] = str(address)
        peer["endpoint_port"] = port
    if op.keepalive is not None:
        peer["persistent_keepalive"] = op.keepalive
    if op.allowed_ips is not None:
        peer["replace_allowed_ips"] = True
        peer["allowed_ips"] = [net.with_prefixlen for net in op.allowed_ips]
    return peer


class KernelBackend:
    """A kernel WireGuard interface ``ifname`` in namespace ``netns``."""

    name = "kernel"

    def __init__(self, ifname: str, netns: str | None = None) -> None:
        self.ifname = ifname
        self.netns = netns
        self._stopped = asyncio.Event()

    def _socket(self) -> Any:
        # pyroute2 (about 10 MiB and 70-100 ms to import) is loaded only once there is
        # a kernel interface to talk to: with wireguard-go, the agent never needs it.
        from pyroute2 import AsyncWireGuard

        if self.netns:
            return AsyncWireGuard(use_socket=netns_socket(self.netns, _NETLINK_GENERIC))
        return AsyncWireGuard()

    async def _genl(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """One pyroute2 call, on a plain selector loop in a worker thread: pyroute2's
        asyncio netlink opens AF_NETLINK datagram endpoints, which uvloop (the agent's
        loop when installed) refuses with "invalid family" (pyroute2 #1335)."""

        def on_selector_loop() -> Any:
            with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                return runner.run(self._genl_here(what, method, *args, **kwargs))

        return await asyncio.to_thread(on_selector_loop)

    async def _genl_here(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError

        try:
            wg = self._socket()
        except OSError as exc:
            raise WireGuardError(f"{self.ifname}: {what}: {exc.strerror or exc}") from exc
        try:
            await wg.setup_endpoint()
            result = await getattr(wg, method)(*args, **kwargs)
            if hasattr(result, "__aiter__"):
                return [msg async for msg in result]
            return result
        except PyrouteNetlinkError as exc:
            hint = " (no WireGuard kernel module?)" if exc.code == errno.ENOENT else ""
            raise WireGuardError(f"{self.ifname}: {what}: {exc.args[-1]}{hint}") from exc
        except (OSError, ValueError) as exc:
            raise WireGuardError(f"{self.ifname}: {what}: {exc}") from exc
        finally:
            wg.close()

    async def start(self) -> None:
        try:
            async with Netlink(self.netns) as nl:
                await nl.create_link(self.ifname, "wireguard")
        except NetlinkError as exc:
            raise WireGuardError(f"kernel WireGuard unavailable for {self.ifname}: {exc}") from exc
        self._stopped.clear()

    async def stop(self) -> None:
        self._stopped.set()
        try:
            async with Netlink(self.netns) as nl:
                await nl.delete_link(self.ifname)
        except NetlinkError as exc:
            raise WireGuardError(f"removing {self.ifname}: {exc}") from exc

    async def supervise(self) -> None:
        # A kernel interface has no process that could die.
        await self._stopped.wait()

    def set_restart_hook(self, hook: RestartHook | None) -> None:
        del hook  # never called: see supervise()

    @property
    def restarts(self) -> int:
        return 0

    async def configure_device(self, config: DeviceConfig) -> None:
        await self._genl(
            "setting private key and port",
            "set",
            self.ifname,
            listen_port=config.listen_port,
            fwmark=config.fwmark,
            private_key=config.private_key,
        )

    async def read_state(self) -> DeviceState:
        msgs = await self._genl("reading state", "info", self.ifname)
        public_key: str | None = None
        listen_port = 0
        fwmark: int | None = None
        # A big device comes in several messages; a peer's allowed IPs may span two.
        peers: dict[str, dict[str, Any]] = {}
        for msg in msgs:
            public_key = _key_text(msg.get_attr("WGDEVICE_A_PUBLIC_KEY")) or public_key
            listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port
            fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or fwmark
            for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
                key = _key_text(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
                if key is None:
                    continue
                entry = peers.setdefault(key, {"allowed": []})
                for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ():
                    if ip.get("addr"):
                        entry["allowed"].append(ipaddress.ip_network(ip["addr"], strict=False))
                endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
                if endpoint is not None and endpoint.get("port"):
                    entry["endpoint"] = normalize_endpoint(
                        format_host_port(endpoint["addr"], endpoint["port"])
                    )
                handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
                if handshake is not None and handshake.get("tv_sec"):
                    entry["handshake"] = handshake["tv_sec"] + handshake.get("tv_nsec", 0) / 1e9
                psk = _key_text(peer.get_attr("WGPEER_A_PRESHARED_KEY"))
                if psk is not None:
                    entry["psk"] = preshared_or_none(psk)
                for attr, name in (
                    ("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", "keepalive"),
                    ("WGPEER_A_RX_BYTES", "rx"),
                    ("WGPEER_A_TX_BYTES", "tx"),
                ):
                    value = peer.get_attr(attr)
                    if value is not None:
                        entry[name] = value
        states = []
        for key, entry in peers.items():
            allowed: list[IPNetwork] = entry["allowed"]
            states.append(
                PeerState(
                    public_key=key,
                    endpoint=entry.get("endpoint"),
                    allowed_ips=sorted_networks(allowed),
                    keepalive=entry.get("keepalive") or None,
                    preshared_key=entry.get("psk"),
                    last_handshake=entry.get("handshake"),
                    rx_bytes=int(entry.get("rx", 0)),
                    tx_bytes=int(entry.get("tx", 0)),
                )
            )
        return DeviceState(
            public_key=public_key,
            listen_port=int(listen_port),
            fwmark=fwmark or None,
            peers=tuple(states),
        )

    async def apply(self, ops: Sequence[PeerOp]) -> None:
        # A failure stops here; ops before it stay applied and the next pass repairs the rest.
        for op in ops:
            await self._genl(str(op), "set", self.ifname, peer=_peer_dict(op))


def kernel_module_loaded() -> bool:
    """Whether the WireGuard module is loaded now (``auto`` also tries to load it)."""
    return os.path.isdir("/sys/module/wireguard")
