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
  interface shows there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from meshd.lab import netns
from meshd.lab.lab import Lab

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
