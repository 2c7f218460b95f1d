"""Benchmark: applying 1,000 peers, then a one-peer change, through meshd vs ``wg syncconf``.

Both sides drive the same kind of interface, a wireguard-go in the same lab
namespace: meshd's through :class:`meshd.wireguard.WireGuardInterface` (read the
live state over UAPI, plan, one ``set`` transaction), the other through
``wg syncconf`` on a config file (timed as the command a user would run, so it
includes starting ``ip netns exec wg``). Peers get loopback endpoints and no
keepalive, so no packet leaves the namespace. Needs root.

    .venv/bin/python bench/wireguard_apply.py [--peers 1000] [--repeat 3]
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


def make_peers(count: int) -> list[PeerConfig]:
    peers = []
    for i in range(count):
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
    meshd_if = await WireGuardInterface.open(spec, backend="userspace")
    plain = UserspaceBackend(lab.ifname(node, "ws"), node.netns)
    await plain.start()
    conf_dir = lab.node_dir(node)
    results: dict[str, list[float]] = {
        k: [] for k in ("m_full", "m_one", "m_noop", "w_full", "w_one")
    }
    try:
        for _ in range(repeat):
            peers = make_peers(count)
            changed = list(peers)
            changed[count // 2] = replace(peers[count // 2], endpoint="127.0.0.2:30000")

            start = time.perf_counter()
            full = await meshd_if.reconcile(peers)
            results["m_full"].append(time.perf_counter() - start)
            start = time.perf_counter()
            one = await meshd_if.reconcile(changed)
            results["m_one"].append(time.perf_counter() - start)
            start = time.perf_counter()
            noop = await meshd_if.reconcile(changed)
            results["m_noop"].append(time.perf_counter() - start)
            assert len(full.peer_ops) == count, full.operations
            assert len(one.peer_ops) == 1, one.operations
            assert noop.operations == 0, noop.operations
            assert count_peers(lab, node.name, meshd_if.ifname) == count

            full_conf, one_conf = conf_dir / "full.conf", conf_dir / "one.conf"
            write_secret(full_conf, wg_conf(keys.private_key, 51821, peers))
            write_secret(one_conf, wg_conf(keys.private_key, 51821, changed))
            results["w_full"].append(syncconf(lab, node.name, plain.ifname, full_conf))
            results["w_one"].append(syncconf(lab, node.name, plain.ifname, one_conf))
            assert count_peers(lab, node.name, plain.ifname) == count

            # Back to empty for the next round (not timed).
            await meshd_if.reconcile([])
            write_secret(full_conf, wg_conf(keys.private_key, 51821, []))
            syncconf(lab, node.name, plain.ifname, full_conf)
    finally:
        await meshd_if.close()
        await plain.stop()

    def ms(name: str) -> float:
        return statistics.median(results[name]) * 1000

    print(f"wireguard-go {count} peers, median of {repeat} rounds (ms)")
    print(f"{'':28}{'meshd':>10}{'wg syncconf':>14}{'ratio':>8}")
    for label, mine, theirs in (
        (f"{count} peers from scratch", "m_full", "w_full"),
        ("one-peer change afterwards", "m_one", "w_one"),
    ):
        print(f"{label:28}{ms(mine):10.1f}{ms(theirs):14.1f}{ms(mine) / ms(theirs):8.2f}")
    print(f"{'no-op pass (0 operations)':28}{ms('m_noop'):10.1f}")
    print("(wg syncconf times include starting `ip netns exec wg`; meshd's include reading the")
    print(" live state over UAPI, planning and the route check)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    with Lab.create(nodes=1) as lab:
        asyncio.run(bench(lab, args.peers, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
