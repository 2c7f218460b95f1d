"""The WireGuard data plane for real: wireguard-go in lab namespaces, traffic through tunnels.

Each test builds a lab (unique namespaces and interface names), opens one
:class:`WireGuardInterface` per host through meshd, and checks what a user
would see: pings over tunnel addresses (100.64.0.0/16, CGNAT range, inside the
lab only), ``wg show`` and the counted operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import pytest

from meshd.errors import IdentityError, NetlinkError, WireGuardError
from meshd.hostport import format_host_port
from meshd.identity import WireGuardKeyPair
from meshd.lab import Lab, LabNode
from meshd.netlink import Netlink
from meshd.types import PeerConfig
from meshd.wireguard import InterfaceSpec, WireGuardInterface
from meshd.wireguard.kernel import kernel_module_loaded

pytestmark = pytest.mark.root("wireguard-go", "wg", "ping")

PORT = 51820
SERVICE = "100.100.0.9"  # a prefix outside the interface's /16: it needs a route


def tunnel_ip(index: int) -> str:
    return f"100.64.0.{index}"


def tunnel_ip6(index: int) -> str:
    return f"fd64::{index}"


@dataclass
class Host:
    node: LabNode
    keys: WireGuardKeyPair
    iface: WireGuardInterface
    supervisor: asyncio.Task[None]


class Mesh:
    def __init__(self, lab: Lab, hosts: list[Host]) -> None:
        self.lab = lab
        self.hosts = hosts

    def peer_of(self, host: Host, **changes: object) -> PeerConfig:
        return replace(peer_config(host.node, host.keys), **changes)  # type: ignore[arg-type]

    def full_mesh(self, me: Host) -> list[PeerConfig]:
        return [self.peer_of(other) for other in self.hosts if other is not me]

    async def ping(self, src: Host, address: str, deadline: float = 10) -> float | None:
        """RTT of the first answer within ``deadline`` s, retrying after errors; None if none."""
        end = time.monotonic() + deadline
        while True:
            # The lab's ping blocks: keep the event loop (and the supervisors) running.
            rtt = await asyncio.to_thread(self.lab.ping, src.node, address, deadline=2)
            if rtt is not None or time.monotonic() > end:
                return rtt
            await asyncio.sleep(0.2)


def interface_spec(lab: Lab, node: LabNode, keys: WireGuardKeyPair) -> InterfaceSpec:
    """Node ``n``'s interface: tunnel addresses 100.64.0.n/16 and fd64::n/64."""
    return InterfaceSpec(
        ifname=lab.ifname(node),
        private_key=keys.private_key,
        listen_port=PORT,
        addresses=(
            ipaddress.ip_interface(f"{tunnel_ip(node.index)}/16"),
            ipaddress.ip_interface(f"{tunnel_ip6(node.index)}/64"),
        ),
        netns=node.netns,
    )


def peer_config(node: LabNode, keys: WireGuardKeyPair) -> PeerConfig:
    """How the others reach ``node``: its tunnel addresses through its lab address."""
    return PeerConfig(
        public_key=keys.public_key,
        allowed_ips=(
            ipaddress.ip_network(f"{tunnel_ip(node.index)}/32"),
            ipaddress.ip_network(f"{tunnel_ip6(node.index)}/128"),
        ),
        endpoint=format_host_port(node.address, PORT),
        keepalive=25,
    )


class Clock:
    """A monotonic clock the test moves: full checks come when it says, not after a sleep."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def open_mesh(lab: Lab, clock: Callable[[], float] = time.monotonic) -> AsyncIterator[Mesh]:
    hosts: list[Host] = []
    try:
        for node in lab.nodes:
            keys = WireGuardKeyPair.generate()
            spec = interface_spec(lab, node, keys)
            iface = await WireGuardInterface.open(spec, backend="userspace", clock=clock)
            task = asyncio.create_task(iface.supervise())
            hosts.append(Host(node, keys, iface, task))
        yield Mesh(lab, hosts)
    finally:
        for host in hosts:
            with contextlib.suppress(Exception):
                await host.iface.close()
            host.supervisor.cancel()
            with contextlib.suppress(BaseException):
                await host.supervisor


def run_in_lab(
    lab_factory: Callable[..., Lab],
    scenario: Callable[[Mesh], Awaitable[None]],
    nodes: int = 3,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    lab = lab_factory(nodes=nodes)

    async def main() -> None:
        async with open_mesh(lab, clock) as mesh:
            await scenario(mesh)

    asyncio.run(main())


async def poll(check: Callable[[], Awaitable[bool]], *, deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while not await check():
        if time.monotonic() > end:
            pytest.fail(f"{what} not within {deadline:g} s")
        await asyncio.sleep(0.1)


def wg_dump(lab: Lab, host: Host) -> dict[str, list[str]]:
    """``wg show <ifname> dump``: peer key -> its columns (the private key line dropped)."""
    out = lab.run(host.node, ["wg", "show", host.iface.ifname, "dump"]).stdout
    lines = out.strip().splitlines()[1:]
    return {cols[0]: cols for cols in (line.split("\t") for line in lines)}


def test_three_hosts_talk_reapply_is_a_no_op_and_wg_show_agrees(lab_factory):
    async def scenario(mesh: Mesh) -> None:
        for host in mesh.hosts:
            result = await host.iface.reconcile(mesh.full_mesh(host))
            assert result.operations == 2  # two peers added, no routes (on-link)
        for src in mesh.hosts:
            for dst in mesh.hosts:
                if src is not dst:
                    for address in (tunnel_ip(dst.node.index), tunnel_ip6(dst.node.index)):
                        rtt = await mesh.ping(src, address)
                        assert rtt is not None, f"{src.node.name} -> {address} over the tunnel"
        for host in mesh.hosts:
            again = await host.iface.reconcile(mesh.full_mesh(host))
            assert again.operations == 0
            assert again.peer_ops == ()

        host = mesh.hosts[0]
        stats = {p.public_key: p for p in await host.iface.peer_stats()}
        shown = await asyncio.to_thread(wg_dump, mesh.lab, host)
        assert set(shown) == set(stats) == {p.public_key for p in mesh.full_mesh(host)}
        for key, cols in shown.items():
            _, psk, endpoint, allowed, handshake, rx, tx, keepalive = cols
            mine = stats[key]
            assert psk == "(none)"
            assert endpoint == mine.endpoint
            assert {ipaddress.ip_network(a) for a in allowed.split(",")} == set(mine.allowed_ips)
            assert int(handshake) == int(mine.last_handshake or 0)
            assert int(handshake) > 0
            assert int(rx) >= mine.rx_bytes > 0
            assert int(tx) >= mine.tx_bytes > 0
            assert keepalive == str(mine.keepalive)

    run_in_lab(lab_factory, scenario)


def test_changing_one_peer_touches_only_that_peer(lab_factory):
    async def scenario(mesh: Mesh) -> None:
        a, b, c = mesh.hosts
        for host in mesh.hosts:
            await host.iface.reconcile(mesh.full_mesh(host))
        for dst in (b, c):
            assert await mesh.ping(a, tunnel_ip(dst.node.index)) is not None
        before = {p.public_key: p for p in await a.iface.peer_stats()}
        assert all(p.last_handshake for p in before.values())

        changed = [mesh.peer_of(b, keepalive=10), mesh.peer_of(c)]
        result = await a.iface.reconcile(changed)
        assert [(op.kind.value, op.public_key) for op in result.peer_ops] == [
            ("update", b.keys.public_key)
        ]
        assert result.peer_ops[0].keepalive == 10
        assert result.peer_ops[0].allowed_ips is None  # only the changed field is sent

        after = {p.public_key: p for p in await a.iface.peer_stats()}
        assert after[b.keys.public_key].keepalive == 10
        # Nobody was removed and re-added: every session (handshake time) is the same one.
        for key, peer in before.items():
            assert after[key].last_handshake == peer.last_handshake
        assert after[c.keys.public_key].keepalive == 25
        assert (await a.iface.reconcile(changed)).operations == 0
        assert await mesh.ping(a, tunnel_ip(b.node.index)) is not None

    run_in_lab(lab_factory, scenario)


def test_a_restarted_peer_shakes_hands_at_once_after_a_failed_attempt(lab_factory):
    """WireGuard sends no handshake initiation within 5 s of the last one, even when that
    one could not leave (no endpoint). ``restart_peer`` gives the peer its path and a
    clean slate: the first packet after it starts the handshake."""

    async def scenario(mesh: Mesh) -> None:
        a, b = mesh.hosts
        # Neither end has an endpoint or a keepalive: nobody shakes hands by itself.
        await a.iface.reconcile([mesh.peer_of(b, endpoint=None, keepalive=None)])
        await b.iface.reconcile([mesh.peer_of(a, endpoint=None, keepalive=None)])
        target = tunnel_ip(b.node.index)
        failed = await asyncio.to_thread(mesh.lab.ping, a.node, target, deadline=1)
        assert failed is None  # the attempt went nowhere, and WireGuard now waits 5 s
        endpoint = format_host_port(b.node.address, PORT)
        assert await a.iface.restart_peer(b.keys.public_key, endpoint)
        # Within 2 s of the failed attempt's end: only a fresh peer sends now.
        rtt = await asyncio.to_thread(mesh.lab.ping, a.node, target, deadline=2)
        assert rtt is not None, "no answer through the restarted peer within 2 s"
        live = {p.public_key: p for p in await a.iface.peer_stats()}[b.keys.public_key]
        assert live.endpoint == endpoint
        assert set(live.allowed_ips) == set(mesh.peer_of(b).allowed_ips)
        assert live.keepalive is None
        # The next pass with that endpoint finds the device as it should be.
        again = await a.iface.reconcile([mesh.peer_of(b, keepalive=None)])
        assert again.operations == 0
        assert not await a.iface.restart_peer(WireGuardKeyPair.generate().public_key, endpoint)

    run_in_lab(lab_factory, scenario, nodes=2)


def test_a_prefix_moves_between_peers_and_traffic_follows(lab_factory):
    async def scenario(mesh: Mesh) -> None:
        a, b, c = mesh.hosts
        service = ipaddress.ip_network(f"{SERVICE}/32")
        for host in (b, c):
            await host.iface.reconcile(mesh.full_mesh(host))
        mesh.lab.run(b.node, ["ip", "addr", "add", f"{SERVICE}/32", "dev", "lo"])

        first = await a.iface.reconcile(
            [mesh.peer_of(b, allowed_ips=(*mesh.peer_of(b).allowed_ips, service)), mesh.peer_of(c)]
        )
        assert first.routes.add == (service,)  # outside 100.64.0.0/16: routed into the tunnel
        assert await mesh.ping(a, SERVICE) is not None

        # The address moves to c; while a still sends the prefix to b, nothing answers.
        mesh.lab.run(b.node, ["ip", "addr", "del", f"{SERVICE}/32", "dev", "lo"])
        mesh.lab.run(c.node, ["ip", "addr", "add", f"{SERVICE}/32", "dev", "lo"])
        assert await mesh.ping(a, SERVICE, deadline=2) is None

        moved = await a.iface.reconcile(
            [mesh.peer_of(b), mesh.peer_of(c, allowed_ips=(*mesh.peer_of(c).allowed_ips, service))]
        )
        assert [(op.kind.value, op.public_key) for op in moved.peer_ops] == [
            ("update", c.keys.public_key),  # the gainer first: one UAPI transaction anyway
            ("update", b.keys.public_key),
        ]
        assert len(moved.routes) == 0  # the route stays: only its peer changed
        assert await mesh.ping(a, SERVICE) is not None
        owners = {p.public_key: p.allowed_ips for p in await a.iface.peer_stats()}
        assert service in owners[c.keys.public_key]
        assert service not in owners[b.keys.public_key]

        # Dropping the prefix removes the stale route.
        dropped = await a.iface.reconcile([mesh.peer_of(b), mesh.peer_of(c)])
        assert dropped.routes.remove == (service,)
        async with Netlink(a.node.netns) as nl:
            assert await nl.routes(a.iface.ifname) == ()

    run_in_lab(lab_factory, scenario)


def test_kill_9_of_wireguard_go_is_healed_and_traffic_resumes(lab_factory):
    async def scenario(mesh: Mesh) -> None:
        a, b = mesh.hosts
        service = ipaddress.ip_network(f"{SERVICE}/32")
        mesh.lab.run(b.node, ["ip", "addr", "add", f"{SERVICE}/32", "dev", "lo"])
        await b.iface.reconcile(mesh.full_mesh(b))
        desired = [mesh.peer_of(b, allowed_ips=(*mesh.peer_of(b).allowed_ips, service))]
        await a.iface.reconcile(desired)
        assert await mesh.ping(a, tunnel_ip(b.node.index)) is not None

        backend = a.iface.backend
        checks = a.iface.full_checks
        old_pid = backend.pid  # type: ignore[attr-defined]
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)

        async def healed() -> bool:
            pid = backend.pid  # type: ignore[attr-defined]
            return a.iface.rebuilds >= 1 and pid is not None and pid != old_pid

        await poll(healed, deadline=30, what="wireguard-go restarted and the interface rebuilt")
        assert backend.restarts == 1
        assert a.iface.full_checks == checks + 1  # the rebuild read the new device
        assert await mesh.ping(a, tunnel_ip(b.node.index), deadline=20) is not None
        assert await mesh.ping(a, SERVICE, deadline=10) is not None  # route re-made too
        # The rebuild re-applied everything: the next pass has nothing to do.
        assert (await a.iface.reconcile(desired)).operations == 0
        state = await a.iface.state()
        assert state.public_key == a.keys.public_key
        assert state.listen_port == PORT

    run_in_lab(lab_factory, scenario, nodes=2)


def test_a_change_behind_meshds_back_is_repaired_by_the_next_full_check(lab_factory):
    clock = Clock()

    async def scenario(mesh: Mesh) -> None:
        a, b, c = mesh.hosts
        service = ipaddress.ip_network(f"{SERVICE}/32")
        mesh.lab.run(b.node, ["ip", "addr", "add", f"{SERVICE}/32", "dev", "lo"])
        for host in (b, c):
            await host.iface.reconcile(mesh.full_mesh(host))
        desired = [
            mesh.peer_of(b, allowed_ips=(*mesh.peer_of(b).allowed_ips, service)),
            mesh.peer_of(c),
        ]
        await a.iface.reconcile(desired)
        for address in (tunnel_ip(b.node.index), tunnel_ip(c.node.index), SERVICE):
            assert await mesh.ping(a, address) is not None
        checks = a.iface.full_checks

        # Someone edits the device by hand: b loses its prefixes, c is removed, the route goes.
        ifname = a.iface.ifname
        mesh.lab.run(a.node, ["wg", "set", ifname, "peer", b.keys.public_key, "allowed-ips", ""])
        mesh.lab.run(a.node, ["wg", "set", ifname, "peer", c.keys.public_key, "remove"])
        mesh.lab.run(a.node, ["ip", "route", "del", f"{SERVICE}/32", "dev", ifname])
        mesh.lab.run(a.node, ["wg", "set", ifname, "listen-port", str(PORT + 1)])

        # A pass before the check is due trusts the last pass: no read, nothing done.
        assert (await a.iface.reconcile(desired)).operations == 0
        assert a.iface.full_checks == checks
        assert c.keys.public_key not in await asyncio.to_thread(wg_dump, mesh.lab, a)

        clock.now += a.iface.full_check_interval
        repaired = await a.iface.reconcile(desired)
        assert a.iface.full_checks == checks + 1
        assert sorted((op.kind.value, op.public_key) for op in repaired.peer_ops) == sorted(
            [("update", b.keys.public_key), ("add", c.keys.public_key)]
        )
        assert repaired.routes.add == (service,)
        assert (await a.iface.state()).listen_port == PORT
        for address in (tunnel_ip(b.node.index), tunnel_ip(c.node.index), SERVICE):
            assert await mesh.ping(a, address) is not None, f"{address} after the repair"
        shown = await asyncio.to_thread(wg_dump, mesh.lab, a)
        assert set(shown) == {b.keys.public_key, c.keys.public_key}
        assert (await a.iface.reconcile(desired)).operations == 0

        # The agent's handshake watch reads the device anyway: a drift it sees makes the
        # next pass a full check, without waiting for the interval.
        mesh.lab.run(a.node, ["wg", "set", ifname, "peer", c.keys.public_key, "remove"])
        assert c.keys.public_key not in {p.public_key for p in await a.iface.peer_stats()}
        again = await a.iface.reconcile(desired)
        assert a.iface.full_checks == checks + 2
        assert [(op.kind.value, op.public_key) for op in again.peer_ops] == [
            ("add", c.keys.public_key)
        ]
        assert await mesh.ping(a, tunnel_ip(c.node.index)) is not None
        # ...while a read that agrees with the record costs the next pass nothing.
        await a.iface.peer_stats()
        assert (await a.iface.reconcile(desired)).operations == 0
        assert a.iface.full_checks == checks + 2

    run_in_lab(lab_factory, scenario, clock=clock)


def test_bad_input_changes_nothing_and_names_the_problem(lab_factory):
    async def scenario(mesh: Mesh) -> None:
        a, b, c = mesh.hosts
        good = mesh.full_mesh(a)
        await a.iface.reconcile(good)
        before = await a.iface.state()
        clash = mesh.peer_of(c, allowed_ips=mesh.peer_of(b).allowed_ips)
        with pytest.raises(WireGuardError, match="is on two peers"):
            await a.iface.reconcile([mesh.peer_of(b), clash])
        with pytest.raises(IdentityError, match="peer public key 'bogus'"):
            await a.iface.reconcile([*good, PeerConfig("bogus")])
        after = await a.iface.state()
        assert {(p.public_key, p.allowed_ips, p.endpoint) for p in after.peers} == {
            (p.public_key, p.allowed_ips, p.endpoint) for p in before.peers
        }
        assert (await a.iface.reconcile(good)).operations == 0

        with pytest.raises(NetlinkError, match="no-such-ns"):
            async with Netlink("meshd-no-such-ns-" + mesh.lab.lab_id) as nl:
                await nl.link_index("lo")

    run_in_lab(lab_factory, scenario)


def test_a_second_wireguard_go_for_a_running_interface_is_refused(lab_factory):
    async def scenario(mesh: Mesh) -> None:
        a = mesh.hosts[0]
        spec = replace(a.iface.spec, private_key=WireGuardKeyPair.generate().private_key)
        with pytest.raises(WireGuardError, match="already answers"):
            await WireGuardInterface.open(spec, backend="userspace")
        # The running interface is untouched.
        assert (await a.iface.state()).public_key == a.keys.public_key

    run_in_lab(lab_factory, scenario, nodes=1)


@pytest.mark.skipif(not kernel_module_loaded(), reason="no WireGuard kernel module on this machine")
def test_kernel_backend_talks_to_userspace_peer(lab_factory):
    lab = lab_factory(nodes=2)

    async def main() -> None:
        n1, n2 = lab.nodes
        k1, k2 = WireGuardKeyPair.generate(), WireGuardKeyPair.generate()
        kernel = await WireGuardInterface.open(interface_spec(lab, n1, k1), backend="kernel")
        user = await WireGuardInterface.open(interface_spec(lab, n2, k2), backend="userspace")
        try:
            peer1, peer2 = peer_config(n1, k1), peer_config(n2, k2)
            assert (await kernel.reconcile([peer2])).operations == 1
            await user.reconcile([peer1])
            assert await asyncio.to_thread(lab.ping, n1, "100.64.0.2", deadline=10) is not None
            assert (await kernel.reconcile([peer2])).operations == 0
        finally:
            await kernel.close()
            await user.close()

    asyncio.run(main())


INSIDE_SCRIPT = """
import asyncio, ipaddress, json, sys
from meshd.types import PeerConfig
from meshd.wireguard import InterfaceSpec, WireGuardInterface

async def main(ifname, private_key, peer_key):
    spec = InterfaceSpec(ifname, private_key, 51820, (ipaddress.ip_interface("100.64.0.1/16"),))
    iface = await WireGuardInterface.open(spec)  # netns=None, backend="auto": the agent's path
    try:
        peer = PeerConfig(peer_key, (ipaddress.ip_network("10.20.0.0/24"),), "198.18.9.9:51820")
        first = await iface.reconcile([peer])
        again = await iface.reconcile([peer])
        stats = await iface.peer_stats()
        print(json.dumps({"backend": iface.backend.name, "first": first.operations,
                          "again": again.operations, "peers": [p.public_key for p in stats]}))
    finally:
        await iface.close()

asyncio.run(main(sys.argv[1], sys.stdin.readline().strip(), sys.argv[2]))
"""


def test_the_agent_path_inside_a_namespace_with_defaults(lab_factory):
    """netns=None and backend="auto", run from inside the node's namespace as the agent will."""
    import json
    import sys

    lab = lab_factory(nodes=1)
    node = lab.nodes[0]
    ifname = lab.ifname(node, "ag")
    peer = WireGuardKeyPair.generate().public_key
    # The private key travels on stdin, never argv.
    done = lab.run(
        node,
        [sys.executable, "-c", INSIDE_SCRIPT, ifname, peer],
        input=WireGuardKeyPair.generate().private_key + "\n",
        timeout=60,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected_backend = "kernel" if kernel_module_loaded() else "userspace"
    assert report == {
        "backend": expected_backend,
        "first": 2,  # the peer and the route to 10.20.0.0/24 (not on-link)
        "again": 0,
        "peers": [peer],
    }
    # close() removed the interface.
    assert ifname not in lab.run(node, ["ip", "-o", "link"]).stdout


NO_NET_ADMIN_SCRIPT = """
import asyncio, sys
from meshd.errors import MeshdError
from meshd.netlink import Netlink
from meshd.wireguard.userspace import UserspaceBackend

async def main(ifname):
    async with Netlink() as nl:
        try:
            await nl.create_link(ifname + "d", "dummy")
        except MeshdError as exc:
            print(type(exc).__name__, exc)
    try:
        await UserspaceBackend(ifname).start()
    except MeshdError as exc:
        print(type(exc).__name__, exc)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.root("setpriv")
def test_missing_permission_is_named(lab_factory):
    import sys

    lab = lab_factory(nodes=1)
    node = lab.nodes[0]
    ifname = lab.ifname(node, "np")
    done = lab.run(
        node,
        [
            "setpriv",
            "--bounding-set=-net_admin",
            "--",
            sys.executable,
            "-c",
            NO_NET_ADMIN_SCRIPT,
            ifname,
        ],
        timeout=60,
    )
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(f"NetlinkError creating dummy interface {ifname}d: EPERM")
    assert "needs root / CAP_NET_ADMIN" in lines[0]
    assert lines[1].startswith(f"WireGuardError starting wireguard-go for {ifname}")
    assert "Failed to create TUN device: operation not permitted" in lines[1]
