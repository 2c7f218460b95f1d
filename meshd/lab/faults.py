"""Faults a lab can inject, for the chaos tests and benchmarks.

- :func:`partition` splits two groups of hosts with nftables rules in their own
  namespaces (table ``inet meshd_fault``): both ways, or one way (``one_way``: the
  second group no longer hears the first, the first still hears the second).
  :func:`heal` removes the table again. Only underlay packets are dropped, by source
  address, so everything a host does with the hosts of its own group goes on.
- :func:`netem` puts loss and delay on a host's underlay interface (``tc netem``);
  :func:`clear_netem` takes it off. Kernels built without netem (some VM kernels)
  refuse it: :func:`random_loss` drops a share of what the host sends with nftables
  instead (loss only, no delay); :func:`heal` takes that off too.
- :func:`netns_processes` and :func:`interfaces` list what lives in a host's
  namespace: after a crash, a leaked ``serf`` or ``wireguard-go`` or an orphaned
  interface shows there; :func:`stray_processes` names what should not be there.
- :func:`fill_up` fills a (small) file system; :func:`state_problems` says which of
  a node's state files no longer parse, or which temporary files were left behind.
"""

from __future__ import annotations

import collections
import errno
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from meshd.errors import MeshdError
from meshd.lab import netns
from meshd.lab.lab import Lab
from meshd.lab.mesh import AGENT
from meshd.node import NodeStore
from meshd.pki.trust import Trust

FAULT_TABLE = "meshd_fault"
LOSS_TABLE = "meshd_loss"


def _drop_from(sources: Iterable[str]) -> str:
    addresses = ", ".join(sorted(sources))
    return (
        f"table inet {FAULT_TABLE} {{\n"
        "  chain input {\n"
        "    type filter hook input priority -10; policy accept;\n"
        f"    ip saddr {{ {addresses} }} drop\n"
        "  }\n"
        "}\n"
    )


def partition(
    lab: Lab, first: Sequence[str], second: Sequence[str], *, one_way: bool = False
) -> None:
    """Cut ``first`` from ``second`` (``one_way``: only ``second`` stops hearing ``first``)."""
    first_addresses = [lab.node(n).address for n in first]
    second_addresses = [lab.node(n).address for n in second]
    for node in second:
        netns.load_nft(lab.netns_of(node), _drop_from(first_addresses))
    if not one_way:
        for node in first:
            netns.load_nft(lab.netns_of(node), _drop_from(second_addresses))


def heal(lab: Lab, nodes: Iterable[str]) -> None:
    """Remove every rule :func:`partition` added on ``nodes`` (those without any too)."""
    for node in nodes:
        lab.run(node, ["nft", "delete", "table", "inet", FAULT_TABLE], check=False)
        lab.run(node, ["nft", "delete", "table", "inet", LOSS_TABLE], check=False)


def random_loss(lab: Lab, node: str, percent: int) -> None:
    """Drop ``percent`` % of the packets ``node`` sends on its underlay interface, at random."""
    ruleset = (
        f"table inet {LOSS_TABLE} {{\n"
        "  chain output {\n"
        "    type filter hook output priority -10; policy accept;\n"
        f'    oifname "{lab.node(node).interface}" numgen random mod 100 < {percent} drop\n'
        "  }\n"
        "}\n"
    )
    netns.load_nft(lab.netns_of(node), ruleset)


def netem(lab: Lab, node: str, *, loss_percent: float, delay_ms: int) -> None:
    """Loss and delay on every packet ``node`` sends on its underlay interface."""
    lab.run(
        node,
        [
            "tc", "qdisc", "replace", "dev", lab.node(node).interface, "root", "netem",
            "loss", f"{loss_percent}%", "delay", f"{delay_ms}ms",
        ],
    )  # fmt: skip


def clear_netem(lab: Lab, node: str) -> None:
    lab.run(node, ["tc", "qdisc", "del", "dev", lab.node(node).interface, "root"], check=False)


class Process(NamedTuple):
    pid: int
    parent: int
    command: str  # /proc/<pid>/comm


def netns_processes(lab: Lab, node: str) -> list[Process]:
    """Every process in ``node``'s network namespace (gone ones skipped)."""
    found = []
    for pid in netns.netns_pids(lab.netns_of(node)):
        try:
            command = Path(f"/proc/{pid}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        parent = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")
        )
        found.append(Process(pid, parent, command))
    return found


def interfaces(lab: Lab, node: str) -> set[str]:
    """Names of the network interfaces in ``node``'s namespace."""
    out = lab.run(node, ["ip", "-o", "link", "show"]).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def stray_processes(lab: Lab, node: str) -> list[str]:
    """What is wrong in ``node``'s namespace: anything but one meshd agent (started by
    the lab), its one serf and its one wireguard-go. Empty when all is well."""
    agents = [
        p["pid"] for p in lab.processes() if p["node"] == node and p["name"] == AGENT and p["alive"]
    ]
    if len(agents) != 1:
        return [f"{len(agents)} agents"]
    agent = agents[0]
    found = netns_processes(lab, node)
    children = collections.Counter(p.command for p in found if p.parent == agent)
    strays = [f"{p.command} (pid {p.pid})" for p in found if agent not in (p.pid, p.parent)]
    counts = [f"{children[c]} {c}" for c in ("serf", "wireguard-go") if children[c] != 1]
    return strays + counts


def fill_up(directory: Path) -> Path:
    """Fill the file system of ``directory`` with one file until ENOSPC; that file
    (absent when the file system was full already)."""
    filler = directory / "filler"
    try:
        with filler.open("wb") as handle:
            while True:
                handle.write(bytes(64 * 1024))
                handle.flush()
    except OSError as exc:  # also when it was full already (then no filler exists)
        if exc.errno != errno.ENOSPC:
            raise
    return filler


def state_problems(state_dir: Path) -> list[str]:
    """Which state files of a node do not parse (node, trust files, peer cache, JSON),
    and which temporary files were left behind. Empty when all is whole."""
    problems = [f"{p.name} left behind" for p in state_dir.rglob(".*.tmp")]
    try:
        store = NodeStore(state_dir)
        Trust(store.load().ca_public_key, state_dir)  # revocations, roots, grants, clients
        store.load_peers()
    except MeshdError as exc:
        problems.append(str(exc))
    for path in state_dir.rglob("*.json"):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: {exc}")
    return problems
