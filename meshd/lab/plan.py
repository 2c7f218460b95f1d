"""The lab's plan: names and addresses, derived from the lab id alone.

Pure functions, no root, no side effects: everything the lab creates is named
from its id, so ``lab down`` can find leftovers by name prefix even when the
state file is gone (a crashed or killed ``lab up``).

Naming (``<id>`` is 1-8 of ``[a-z0-9]``):

    namespaces   meshd-lab-<id>-n1 ... -nN      hosts
                 meshd-lab-<id>-hub              flat: holds the bridge
                 meshd-lab-<id>-inet             nat: the "internet" bridge
                 meshd-lab-<id>-r1 ...           nat: one router per site
    interfaces   eth0 in a host, wan/lan in a router, br0 + one veth per
                 neighbour (named after it) in a switch namespace; these
                 only need to be unique inside their own namespace.
    wireguard    ifname(): <prefix><id><node>, e.g. wgab12n3 - unique across
                 the machine, because wireguard-go's control sockets are global.

Addresses come from 198.18.0.0/15 (RFC 2544, benchmarking), never routed:

    flat   hosts 198.18.0.<i>/24
    nat    "internet" 198.18.0.0/24: router of site s at .<s>, public hosts at .<100+k>
           site s LAN 198.19.<s>.0/24: its router .1, its hosts .2, .3, ...
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from meshd.errors import LabError

NETNS_PREFIX = "meshd-lab-"
TOPOLOGIES = ("flat", "nat")
# restricted: Linux's plain masquerade - the source port is kept where it can be, and only
#   the peer a host wrote to may answer (port-restricted cone): hole punching works.
# symmetric: every new destination gets a random port - hole punching fails, relays needed.
NAT_TYPES = ("restricted", "symmetric")
LAB_ID_PATTERN = re.compile(r"[a-z0-9]{1,8}")
IFNAME_MAX = 15  # IFNAMSIZ - 1
MAX_NODES = 250
MAX_SITES = 99
HOST_IFNAME = "eth0"
BRIDGE_IFNAME = "br0"
ROUTER_WAN_IFNAME = "wan"
ROUTER_LAN_IFNAME = "lan"
FLAT_PREFIX = "198.18.0"
INET_PREFIX = "198.18.0"
SITE_PREFIX = "198.19"
PUBLIC_BASE = 100
MAX_PUBLIC = 150  # 198.18.0.101 .. .250


def validate_lab_id(lab_id: str) -> str:
    """Return ``lab_id`` if it is usable in every name the lab derives from it."""
    if not LAB_ID_PATTERN.fullmatch(lab_id):
        raise LabError(
            f"bad lab id {lab_id!r}: use 1-8 characters of a-z and 0-9 "
            "(it goes into interface names, which are limited to 15 characters)"
        )
    return lab_id


def random_lab_id() -> str:
    """A fresh short id, e.g. for a test; 6 hex digits make a collision unlikely."""
    return secrets.token_hex(3)


def netns_prefix(lab_id: str) -> str:
    """Every namespace of lab ``lab_id`` starts with this (ids contain no '-')."""
    return f"{NETNS_PREFIX}{validate_lab_id(lab_id)}-"


def netns_name(lab_id: str, member: str) -> str:
    """The namespace of a lab member: a host ("n1"), router ("r1"), "hub" or "inet"."""
    return netns_prefix(lab_id) + member


def lab_id_of_netns(netns: str) -> str | None:
    """The lab id a namespace name belongs to, or None if it is not a lab's."""
    if not netns.startswith(NETNS_PREFIX):
        return None
    lab_id, sep, member = netns[len(NETNS_PREFIX) :].partition("-")
    if not sep or not member or not LAB_ID_PATTERN.fullmatch(lab_id):
        return None
    return lab_id


def ifname(lab_id: str, node: str, prefix: str = "wg") -> str:
    """A network interface name unique on this machine for (prefix, lab, node).

    Unique because node names are "n<digits>": the name splits back into
    prefix + lab id + node unambiguously for a given prefix.
    """
    if not re.fullmatch(r"[a-z]{1,4}", prefix):
        raise LabError(f"bad interface prefix {prefix!r}: use 1-4 letters a-z")
    name = f"{prefix}{validate_lab_id(lab_id)}{node}"
    if len(name) > IFNAME_MAX:
        raise LabError(
            f"interface name {name!r} is longer than {IFNAME_MAX} characters: "
            "use a shorter lab id or prefix"
        )
    return name


@dataclass(frozen=True)
class LabNode:
    """One host of the lab (routers and switches are not hosts)."""

    name: str  # "n1" .. "nN"
    index: int  # 1 .. N
    netns: str
    address: str  # underlay IPv4 address on `interface`
    prefixlen: int
    site: str | None  # "s1" .. in the nat topology, None for flat and public hosts
    public: bool  # reachable from every other host (flat: all; nat: the "internet" hosts)
    gateway: str | None  # default route (nat site hosts: their router); None = no default route
    interface: str = HOST_IFNAME

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True)
class LabRouter:
    """The NAT router of one site (nat topology only)."""

    name: str  # "r1" ..
    site: str  # "s1" ..
    netns: str
    wan_address: str  # on the "internet" bridge
    lan_address: str  # the site hosts' default gateway
    lan_cidr: str  # the site's LAN, e.g. 198.19.1.0/24
    prefixlen: int = 24


@dataclass(frozen=True)
class LabPlan:
    """Everything a lab is made of, as data: what ``up`` builds and the state file keeps."""

    lab_id: str
    topology: str
    switch: str  # the namespace that holds the bridge every host or router hangs on
    nodes: tuple[LabNode, ...]
    routers: tuple[LabRouter, ...] = ()
    nat_type: str | None = None  # nat topology: one of NAT_TYPES

    @property
    def namespaces(self) -> list[str]:
        """All namespaces, switch first (so it exists before anything is linked to it)."""
        return [self.switch, *(r.netns for r in self.routers), *(n.netns for n in self.nodes)]

    def node(self, name: str) -> LabNode:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise LabError(f"unknown node {name!r} in lab {self.lab_id} (nodes: {known})")

    def router(self, name: str) -> LabRouter:
        for router in self.routers:
            if router.name == name or router.site == name:
                return router
        raise LabError(f"unknown router {name!r} in lab {self.lab_id}")

    def expect_reachable(self, src: LabNode, dst: LabNode) -> bool:
        """Whether ``src`` can open a conversation with ``dst``'s underlay address.

        Behind NAT, a host reaches public hosts and its own site; nobody
        outside a site reaches into it.
        """
        if src.name == dst.name:
            return True
        return dst.public or (dst.site is not None and dst.site == src.site)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lab_id": self.lab_id,
            "topology": self.topology,
            "switch": self.switch,
            "nodes": [asdict(n) for n in self.nodes],
            "routers": [asdict(r) for r in self.routers],
            "nat_type": self.nat_type,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabPlan:
        try:
            return cls(
                lab_id=validate_lab_id(str(data["lab_id"])),
                topology=str(data["topology"]),
                switch=str(data["switch"]),
                nodes=tuple(LabNode(**n) for n in data["nodes"]),
                routers=tuple(LabRouter(**r) for r in data.get("routers", ())),
                nat_type=data.get("nat_type"),
            )
        except (KeyError, TypeError) as exc:
            raise LabError(f"lab state is not a lab plan: {exc}") from exc


def plan_lab(
    lab_id: str,
    nodes: int,
    topology: str = "flat",
    *,
    sites: int = 2,
    public: int = 1,
    nat_type: str = "restricted",
) -> LabPlan:
    """The names and addresses of a lab with ``nodes`` hosts.

    nat: hosts n1..n<public> are public (on the "internet" bridge), the others
    are dealt round-robin over ``sites`` sites, each behind its own router.
    """
    validate_lab_id(lab_id)
    if topology not in TOPOLOGIES:
        raise LabError(f"unknown topology {topology!r}: choose one of {', '.join(TOPOLOGIES)}")
    if not 1 <= nodes <= MAX_NODES:
        raise LabError(f"--nodes must be between 1 and {MAX_NODES}, not {nodes}")
    if topology == "flat":
        hosts = tuple(
            LabNode(
                name=f"n{i}",
                index=i,
                netns=netns_name(lab_id, f"n{i}"),
                address=f"{FLAT_PREFIX}.{i}",
                prefixlen=24,
                site=None,
                public=True,
                gateway=None,
            )
            for i in range(1, nodes + 1)
        )
        return LabPlan(lab_id, topology, netns_name(lab_id, "hub"), hosts)
    if nat_type not in NAT_TYPES:
        raise LabError(f"unknown NAT type {nat_type!r}: choose one of {', '.join(NAT_TYPES)}")
    return _plan_nat(lab_id, nodes, sites, public, nat_type)


def _plan_nat(lab_id: str, nodes: int, sites: int, public: int, nat_type: str) -> LabPlan:
    if not 2 <= sites <= MAX_SITES:
        raise LabError(f"the nat topology needs 2 to {MAX_SITES} sites, not {sites}")
    if not 1 <= public <= MAX_PUBLIC:
        raise LabError(f"the nat topology needs at least one public host, not {public}")
    if nodes < public + sites:
        raise LabError(
            f"the nat topology with {sites} sites and {public} public host(s) "
            f"needs at least {public + sites} nodes, not {nodes}"
        )
    routers = tuple(
        LabRouter(
            name=f"r{s}",
            site=f"s{s}",
            netns=netns_name(lab_id, f"r{s}"),
            wan_address=f"{INET_PREFIX}.{s}",
            lan_address=f"{SITE_PREFIX}.{s}.1",
            lan_cidr=f"{SITE_PREFIX}.{s}.0/24",
        )
        for s in range(1, sites + 1)
    )
    hosts: list[LabNode] = []
    per_site = [0] * sites
    for i in range(1, nodes + 1):
        router: LabRouter | None = None
        if i <= public:
            address = f"{INET_PREFIX}.{PUBLIC_BASE + i}"
        else:
            s = (i - public - 1) % sites
            per_site[s] += 1
            if per_site[s] > 253:
                raise LabError(f"site s{s + 1} would have more than 253 hosts")
            router = routers[s]
            address = f"{SITE_PREFIX}.{s + 1}.{1 + per_site[s]}"
        hosts.append(
            LabNode(
                name=f"n{i}",
                index=i,
                netns=netns_name(lab_id, f"n{i}"),
                address=address,
                prefixlen=24,
                site=router.site if router else None,
                public=router is None,
                gateway=router.lan_address if router else None,
            )
        )
    return LabPlan(lab_id, "nat", netns_name(lab_id, "inet"), tuple(hosts), routers, nat_type)
