"""meshd.netlink against the real kernel, inside a lab namespace (checked with ``ip``)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from meshd.errors import NetlinkError, WireGuardError
from meshd.lab import Lab
from meshd.netlink import MESHD_ROUTE_PROTO, Netlink
from meshd.wireguard.kernel import KernelBackend

pytestmark = pytest.mark.root()

net = ipaddress.ip_network
iface = ipaddress.ip_interface


def test_links_addresses_and_only_our_routes(lab_factory):
    lab: Lab = lab_factory(nodes=1)
    node = lab.nodes[0]
    name = lab.ifname(node, "dm")

    def ip(*argv: str) -> str:
        return lab.run(node, ["ip", *argv]).stdout

    async def scenario() -> None:
        async with Netlink(node.netns) as nl:
            assert await nl.link_index(name) is None
            index = await nl.create_link(name, "bridge")
            assert await nl.create_link(name, "bridge") == index  # kept, not re-made
            assert await nl.link_kind(name) == "bridge"
            with pytest.raises(NetlinkError, match="exists but is a bridge link, not wireguard"):
                await nl.create_link(name, "wireguard")

            await nl.set_link(name, mtu=1380, up=True)
            assert await nl.link_info(name) == (1380, True)
            assert "mtu 1380" in ip("link", "show", name)

            wanted = [iface("100.64.0.1/16"), iface("fd64::1/64")]
            changes = await nl.sync_addresses(name, wanted)
            assert set(changes.added) == set(wanted)
            assert set(await nl.addresses(name)) == set(wanted)
            changes = await nl.sync_addresses(name, [iface("100.64.0.1/16")])
            assert changes.removed == (iface("fd64::1/64"),)
            assert "fd64::1" not in ip("-6", "addr", "show", name)

            # A route somebody else made through the same link is neither listed nor removed.
            ip("route", "add", "10.99.0.0/24", "dev", name)
            await nl.add_routes(name, [net("10.20.0.0/24"), net("fd99::/64")])
            assert set(await nl.routes(name)) == {net("10.20.0.0/24"), net("fd99::/64")}
            assert f"proto {MESHD_ROUTE_PROTO}" in ip("route", "show", "10.20.0.0/24")
            await nl.remove_routes(name, [net("10.20.0.0/24"), net("fd99::/64")])
            await nl.remove_routes(name, [net("10.20.0.0/24")])  # already gone: fine
            assert await nl.routes(name) == ()
            assert "10.99.0.0/24" in ip("route", "show", "dev", name)
            # Nor replaced when meshd wants the same prefix (a gateway's LAN someone routes
            # by hand): it stays, and removing "ours" leaves it there.
            await nl.add_routes(name, [net("10.99.0.0/24")])
            assert await nl.routes(name) == ()
            await nl.remove_routes(name, [net("10.99.0.0/24")])
            assert "10.99.0.0/24" in ip("route", "show", "dev", name)
            assert f"proto {MESHD_ROUTE_PROTO}" not in ip("route", "show", "10.99.0.0/24")

            # The kernel backend refuses to adopt a link that is not WireGuard.
            with pytest.raises(WireGuardError, match="not wireguard"):
                await KernelBackend(name, node.netns).start()

            await nl.delete_link(name)
            await nl.delete_link(name)  # already gone: fine
            assert await nl.link_index(name) is None
            with pytest.raises(NetlinkError, match=f"no interface {name} in {node.netns}"):
                await nl.set_link(name, mtu=1400)

    asyncio.run(scenario())
