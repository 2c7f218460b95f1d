"""Benchmark: applying 1,000 peers, then one-peer changes, through meshd vs ``wg syncconf``.

Both sides drive the same kind of interface, a wireguard-go in the same lab
namespace: meshd's through :class:`meshd.wireguard.WireGuardInterface` (plan from
what the last pass left, one ``set`` transaction), the other through
``wg syncconf`` on a config file (timed as the command a user would run, so it
includes starting ``ip netns exec wg``). Peers get loopback endpoints and no
keepalive, so no packet leaves the namespace. Needs root.

Each round: 1,000 peers from scratch, one peer's endpoint changed, one peer added,
that peer removed again, then meshd alone: a no-op pass (with freshly built, equal
PeerConfigs, as the agent computes every pass), a full check with nothing to do (the
periodic re-read of the device and its routes) and one ``peer_stats`` read.

    .venv/bin/python bench/wireguard_apply.py [--peers 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from meshd.b64 import encode_b64
from meshd.identity import WireGuardKeyPair
from meshd.lab import Lab
from meshd.state import write_secret
from meshd.types import PeerConfig
from meshd.wireguard import InterfaceSpec, WireGuardInterface
from meshd.wireguard.userspace import UserspaceBackend


class Clock:
    """Moved by hand: the full check is timed when the bench asks for it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_peers(count: int, first: int = 0) -> list[PeerConfig]:
    peers = []
    for i in range(first, first + count):
        # Any 32 bytes are a usable public key for configuration purposes.
        key = encode_b64(os.urandom(32))
        address = ipaddress.ip_address("100.64.0.0") + 10 + i
        peers.append(
            PeerConfig(
                public_key=key,
                allowed_ips=(ipaddress.ip_network(f"{address}/32"),),
                endpoint=f"127.0.0.1:{20000 + i}",
            )
        )
    return peers


def wg_conf(private_key: str, port: int, peers: list[PeerConfig]) -> str:
    lines = ["[Interface]", f"PrivateKey = {private_key}", f"ListenPort = {port}", ""]
    for peer in peers:
        lines += [
            "[Peer]",
            f"PublicKey = {peer.public_key}",
            f"AllowedIPs = {', '.join(n.with_prefixlen for n in peer.allowed_ips)}",
            f"Endpoint = {peer.endpoint}",
            "",
        ]
    return "\n".join(lines)


def syncconf(lab: Lab, node: str, ifname: str, path: Path) -> float:
    start = time.perf_counter()
    lab.run(node, ["wg", "syncconf", ifname, str(path)])
    return time.perf_counter() - start


def count_peers(lab: Lab, node: str, ifname: str) -> int:
    return len(lab.run(node, ["wg", "show", ifname, "peers"]).stdout.split())


def rebuilt(peers: list[PeerConfig]) -> list[PeerConfig]:
    """Equal peers in new objects down to the prefixes, as the agent's desired state is."""
    return [
        replace(p, allowed_ips=tuple(ipaddress.ip_network(str(n)) for n in p.allowed_ips))
        for p in peers
    ]


ROWS = (
    ("from scratch", "full"),
    ("one-peer change (endpoint)", "one"),
    ("one peer added", "add"),
    ("one peer removed", "del"),
)


async def bench(lab: Lab, count: int, repeat: int) -> None:
    node = lab.nodes[0]
    keys = WireGuardKeyPair.generate()
    spec = InterfaceSpec(
        ifname=lab.ifname(node, "wm"),
        private_key=keys.private_key,
        listen_port=51820,
        addresses=(ipaddress.ip_interface("100.64.0.1/10"),),
        netns=node.netns,
    )
    clock = Clock()
    meshd_if = await WireGuardInterface.open(spec, backend="userspace", clock=clock)
    plain = UserspaceBackend(lab.ifname(node, "ws"), node.netns)
    await plain.start()
    # Up like meshd's: wireguard-go starts a peer's goroutines only on an up device, so a
    # down one would flatter wg syncconf (by ~15 ms for 1,000 new peers).
    lab.run(node.name, ["ip", "link", "set", plain.ifname, "up"])
    conf_dir = lab.node_dir(node)
    results: dict[str, list[float]] = {}

    def timed(name: str, started: float) -> None:
        results.setdefault(name, []).append(time.perf_counter() - started)

    conf = conf_dir / "wg.conf"

    async def meshd_side(steps: dict[str, list[PeerConfig]]) -> None:
        for step, desired in steps.items():
            start = time.perf_counter()
            result = await meshd_if.reconcile(desired)
            timed(f"m_{step}", start)
            assert len(result.peer_ops) == (count if step == "full" else 1), result
        fresh = rebuilt(steps["one"])
        start = time.perf_counter()
        noop = await meshd_if.reconcile(fresh)
        timed("m_noop", start)
        assert noop.operations == 0, noop.operations
        clock.now += meshd_if.full_check_interval
        checks, fresh = meshd_if.full_checks, rebuilt(steps["one"])
        start = time.perf_counter()
        check = await meshd_if.reconcile(fresh)
        timed("m_check", start)
        assert check.operations == 0
        assert meshd_if.full_checks == checks + 1
        start = time.perf_counter()
        stats = await meshd_if.peer_stats()
        timed("m_stats", start)
        assert len(stats) == count == count_peers(lab, node.name, meshd_if.ifname)
        await meshd_if.reconcile([])  # back to empty (not timed)

    async def wg_side(steps: dict[str, list[PeerConfig]]) -> None:
        for step, desired in steps.items():
            write_secret(conf, wg_conf(keys.private_key, 51821, desired))
            results.setdefault(f"w_{step}", []).append(syncconf(lab, node.name, plain.ifname, conf))
        assert count_peers(lab, node.name, plain.ifname) == count
        write_secret(conf, wg_conf(keys.private_key, 51821, []))
        syncconf(lab, node.name, plain.ifname, conf)  # back to empty (not timed)

    try:
        for round_ in range(repeat):
            peers = make_peers(count)
            changed = list(peers)
            changed[count // 2] = replace(peers[count // 2], endpoint="127.0.0.2:30000")
            added = [*changed, *make_peers(1, first=count)]
            steps = {"full": peers, "one": changed, "add": added, "del": changed}
            # Who goes first alternates: the one going second finds the machine (and Go's
            # garbage collector after 1,000 peers were dropped) in a different state.
            sides = (meshd_side, wg_side) if round_ % 2 == 0 else (wg_side, meshd_side)
            for side in sides:
                await side(steps)
    finally:
        await meshd_if.close()
        await plain.stop()

    def ms(name: str) -> float:
        return statistics.median(results[name]) * 1000

    print(f"wireguard-go {count} peers, median of {repeat} rounds (ms)")
    print(f"{'':28}{'meshd':>10}{'wg syncconf':>14}{'ratio':>8}")
    for label, step in ROWS:
        mine, theirs = ms(f"m_{step}"), ms(f"w_{step}")
        print(f"{label:28}{mine:10.1f}{theirs:14.1f}{mine / theirs:8.2f}")
    print(f"{'no-op pass (0 operations)':28}{ms('m_noop'):10.1f}")
    print(f"{'full check, nothing to do':28}{ms('m_check'):10.1f}")
    print(f"{'peer_stats (one read)':28}{ms('m_stats'):10.1f}")
    print("(wg syncconf times include starting `ip netns exec wg`; a meshd full check reads")
    print(" the device over UAPI and its routes over netlink, every 30 s or after drift)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    with Lab.create(nodes=1) as lab:
        asyncio.run(bench(lab, args.peers, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
