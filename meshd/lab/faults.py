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
- :func:`delay` puts loss and delay on what a host sends out of its underlay interface
  without netem: a userspace delay line (:mod:`meshd.lab.delayline`) behind a TUN
  device, a mark and policy routing; :func:`clear_delay` takes it off and says what
  it passed and dropped.
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
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from meshd.errors import LabError, MeshdError
from meshd.lab import netns
from meshd.lab.delayline import DelayStats
from meshd.lab.lab import Lab
from meshd.lab.mesh import AGENT
from meshd.node import NodeStore
from meshd.pki.trust import Trust

FAULT_TABLE = "meshd_fault"
LOSS_TABLE = "meshd_loss"
DELAY_DEVICE = "dl0"
DELAY_PROCESS = "delayline"  # its name for Lab.spawn
DELAY_ROUTES = 1616  # the routing table, and the preference of the rule that leads there
DELAY_MARK = 0x1616
DELAY_TABLE = "meshd_delay"


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


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise LabError(f"{what}: not after {timeout:g} s")
        time.sleep(0.05)


def _link_exists(lab: Lab, node: str, device: str) -> bool:
    return lab.run(node, ["ip", "link", "show", "dev", device], check=False).returncode == 0


def _delay_stats_path(lab: Lab, node: str) -> Path:
    return lab.node_dir(node) / "delayline.json"


def _delay_ruleset(interface: str) -> str:
    """Mark what the host sends out of ``interface``; the mark reroutes it (a route chain)."""
    return (
        f"table inet {DELAY_TABLE} {{\n"
        "  chain output {\n"
        "    type route hook output priority mangle; policy accept;\n"
        f'    meta nfproto ipv4 oifname "{interface}" meta mark set {DELAY_MARK:#x}\n'
        "  }\n"
        "}\n"
    )


def delay(
    lab: Lab, node: str, *, delay_ms: float, loss_percent: float = 0, seed: int | None = None
) -> None:
    """What ``netem delay <delay_ms>ms loss <loss_percent>%`` on ``node``'s underlay
    interface does, for kernels without netem: every IPv4 packet ``node`` sends out of
    it is dropped with that probability, else sent ``delay_ms`` later.

    How: the delay line process (:mod:`meshd.lab.delayline`, spawned in the host's
    namespace) creates TUN device ``dl0``. An nftables route chain marks every packet
    the host sends out of its underlay interface, and the changed mark makes the kernel
    route it again: a rule sends the mark to table 1616, whose default route is
    ``dl0``. Routing by mark, not by destination, because a socket may pick its way out
    itself: wireguard-go sends with the interface index its peer's last packet came in
    on (its "sticky" sockets), which a destination rule never sees, but a reroute does.
    What the line writes back comes in on ``dl0`` (unmarked) and the main table forwards
    it out of the underlay interface (forwarding only on ``dl0``; ``accept_local``, as
    its source is the host's own address; no reverse-path filter); a rule keeps later
    rules (an exit node's) off it. The host's own addresses and the mesh's tunnels are
    not delayed themselves (their outer packets are, like any other). A mark the
    host's sockets set (meshd's exit-node fwmark) is overwritten on the way out, after
    it has chosen the route. IPv4 only, as the lab's underlay. A ``LabError`` if the
    line does not come up.
    """
    lab_node = lab.node(node)
    if _link_exists(lab, node, DELAY_DEVICE):
        raise LabError(f"delay line: {node} has one already (clear_delay first)")
    stats = _delay_stats_path(lab, node)
    stats.unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "meshd.lab.delayline", "--device", DELAY_DEVICE,
        "--delay-ms", f"{delay_ms:g}", "--loss-percent", f"{loss_percent:g}",
        "--stats", str(stats), *(["--seed", str(seed)] if seed is not None else []),
    ]  # fmt: skip
    lab.spawn(node, argv, name=DELAY_PROCESS)
    _until(lambda: _link_exists(lab, node, DELAY_DEVICE), 10, f"{node}'s delay line device")
    ns = lab.netns_of(node)
    for key, value in (("forwarding", "1"), ("accept_local", "1"), ("rp_filter", "0")):
        netns.set_sysctl(ns, f"net.ipv4.conf.{DELAY_DEVICE}.{key}", value)
    # The reverse-path filter of a device is the stricter of its own and "all"'s.
    netns.set_sysctl(ns, "net.ipv4.conf.all.rp_filter", "0")
    # The underlay is IPv4; without this the kernel's own IPv6 chatter on dl0 (router
    # solicitations) would come back to it through the line.
    netns.set_sysctl(ns, f"net.ipv6.conf.{DELAY_DEVICE}.disable_ipv6", "1")
    netns.ip_batch(
        ns,
        [
            f"link set {DELAY_DEVICE} up",
            f"route replace default dev {DELAY_DEVICE} table {DELAY_ROUTES}",
            f"rule add pref {DELAY_ROUTES} fwmark {DELAY_MARK:#x} lookup {DELAY_ROUTES}",
            # Back from the line: the main table, whole, before any later rule (an exit
            # node's would send it into the mesh) - the way it first went out.
            f"rule add pref {DELAY_ROUTES + 1} iif {DELAY_DEVICE} lookup main",
        ],
    )
    netns.load_nft(ns, _delay_ruleset(lab_node.interface))


def delay_running(lab: Lab, node: str) -> bool:
    """Whether ``node``'s delay line process is still running."""
    return any(
        p["alive"] for p in lab.processes() if (p["node"], p["name"]) == (node, DELAY_PROCESS)
    )


def clear_delay(lab: Lab, node: str) -> DelayStats | None:
    """Take :func:`delay` off ``node``; what its line passed and dropped (None: it had
    none, or it had died). Packets still in the line are lost, as with a removed qdisc."""
    lab.run(node, ["nft", "delete", "table", "inet", DELAY_TABLE], check=False)
    for pref in (DELAY_ROUTES, DELAY_ROUTES + 1):
        lab.run(node, ["ip", "rule", "del", "pref", str(pref)], check=False)
    lab.run(node, ["ip", "route", "flush", "table", str(DELAY_ROUTES)], check=False)
    running = delay_running(lab, node)
    lab.kill(node, DELAY_PROCESS)
    _until(lambda: not delay_running(lab, node), 10, f"{node}'s delay line ends")
    _until(lambda: not _link_exists(lab, node, DELAY_DEVICE), 10, f"{node}'s {DELAY_DEVICE} goes")
    stats = _delay_stats_path(lab, node)
    if not running or not stats.exists():
        return None
    return DelayStats(**json.loads(stats.read_text()))


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
