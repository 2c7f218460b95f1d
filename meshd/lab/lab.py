"""The lab: N hosts in network namespaces on one machine, built, used and torn down.

A :class:`Lab` is made by :meth:`Lab.create` (builds it) or :meth:`Lab.load`
(a lab another process built, from its state file). Everything it makes is
named from its id (see :mod:`meshd.lab.plan`), and :meth:`Lab.down` finds
leftovers by that name, so a crashed ``up`` is cleaned up as well as a good one.

Isolation: no lab namespace has a link to the root namespace. The bridges live
in a lab-owned switch namespace ("hub" for flat, "inet" for nat), so nothing a
test sends can leave the machine, and there is no route that could try.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from meshd.errors import LabError, MeshdError
from meshd.lab import netns
from meshd.lab.plan import (
    BRIDGE_IFNAME,
    HOST_IFNAME,
    ROUTER_LAN_IFNAME,
    ROUTER_WAN_IFNAME,
    LabNode,
    LabPlan,
    LabRouter,
    ifname,
    lab_id_of_netns,
    plan_lab,
    random_lab_id,
    validate_lab_id,
)
from meshd.lab.teardown import (
    STATE_FILE,
    alive,
    lab_namespaces,
    process_start_time,
    read_state,
    teardown,
)
from meshd.state import atomic_write, ensure_private_dir

log = logging.getLogger(__name__)

ENV_LAB_DIR = "MESHD_LAB_DIR"
DEFAULT_LAB_DIR = Path("/run/meshd-lab")

Progress = Callable[[str], None]
NodeRef = LabNode | str

# The NAT of a home router: hosts behind it open conversations, nobody outside
# does (unsolicited inbound is dropped, on the router and through it).
_ROUTER_RULESET = """\
table ip meshd_lab {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        iifname "{wan}" drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        iifname "{wan}" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan}" {masquerade}
    }}
}}
"""


def router_ruleset(nat_type: str) -> str:
    """The nftables ruleset of a site router for one of :data:`NAT_TYPES`."""
    # Plain masquerade keeps the source port when it is free (conntrack), like most
    # consumer routers; fully-random maps every new destination to a random port.
    masquerade = "masquerade fully-random" if nat_type == "symmetric" else "masquerade"
    return _ROUTER_RULESET.format(wan=ROUTER_WAN_IFNAME, masquerade=masquerade)


def lab_base_dir(base_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where labs keep their state: ``base_dir``, else $MESHD_LAB_DIR, else /run/meshd-lab."""
    if base_dir is not None:
        return Path(base_dir)
    return Path(os.environ.get(ENV_LAB_DIR) or DEFAULT_LAB_DIR)


def host_mac(index: int) -> str:
    """The fixed MAC of lab host ``index``'s interface (locally administered)."""
    return f"02:6d:6c:00:{index >> 8:02x}:{index & 0xFF:02x}"


def _bridge_port(
    bridge: str, port: str, peer: str, peer_netns: str, mac: str | None = None
) -> list[str]:
    """A veth pair as ``ip -batch`` lines: ``port`` on ``bridge``, ``peer`` in ``peer_netns``."""
    address = f" address {mac}" if mac else ""
    return [
        f"link add {port} type veth peer name {peer}{address} netns {peer_netns}",
        f"link set {port} master {bridge}",
        f"link set {port} up",
    ]


class Lab:
    """A built lab. See the module docstring; the constructor is internal."""

    def __init__(self, plan: LabPlan, directory: Path) -> None:
        self.plan = plan
        self.dir = directory
        # Popen objects of children this process spawned, so `down` can reap them
        # (an unreaped child stays a zombie and looks alive to `kill -0`).
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ---- construction -------------------------------------------------

    @classmethod
    def create(
        cls,
        nodes: int = 3,
        topology: str = "flat",
        lab_id: str | None = None,
        *,
        sites: int = 2,
        public: int = 1,
        nat_type: str = "restricted",
        base_dir: str | os.PathLike[str] | None = None,
        progress: Progress | None = None,
    ) -> Lab:
        """Build a lab of ``nodes`` hosts and return it; on any failure nothing is left behind.

        ``topology`` "flat": all hosts on one bridge. "nat": ``public`` hosts
        on an "internet" bridge, the rest spread over ``sites`` sites, each
        behind a router that masquerades and drops unsolicited inbound traffic;
        ``nat_type`` "symmetric" makes those routers pick a random port per
        destination (see :data:`meshd.lab.plan.NAT_TYPES`).
        """
        netns.require_root()
        netns.require_binaries("ip", "sysctl", *(["nft"] if topology == "nat" else []))
        lab_id = validate_lab_id(lab_id) if lab_id is not None else random_lab_id()
        plan = plan_lab(lab_id, nodes, topology, sites=sites, public=public, nat_type=nat_type)
        directory = lab_base_dir(base_dir) / lab_id
        exists = LabError(
            f"lab {lab_id} already exists; remove it with: meshd lab down --lab {lab_id}"
        )
        if lab_namespaces(lab_id):
            raise exists
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            # The claim: of two processes creating the same lab, exactly one gets here,
            # and only that one may clean up after a failure.
            directory.mkdir(mode=0o700)
        except FileExistsError:
            raise exists from None
        except OSError as exc:
            raise LabError(f"cannot create {directory}: {exc.strerror}") from exc
        say = progress or (lambda line: log.info("%s", line))
        lab = cls(plan, directory)
        try:
            lab._write_state({"processes": []})
            lab._build(say)
        except BaseException:
            # Also on Ctrl-C: a half-built lab is worse than none.
            with contextlib.suppress(MeshdError):
                lab.down()
            raise
        return lab

    @classmethod
    def load(cls, lab_id: str, *, base_dir: str | os.PathLike[str] | None = None) -> Lab:
        """The lab ``lab_id`` that some process built, from its state file."""
        directory = lab_base_dir(base_dir) / validate_lab_id(lab_id)
        state = read_state(directory / STATE_FILE)
        if state is None:
            raise LabError(f"no lab {lab_id!r}; start one with: meshd lab up --lab {lab_id}")
        return cls(LabPlan.from_dict(state["plan"]), directory)

    def _build(self, say: Progress) -> None:
        plan = self.plan
        say(
            f"lab {plan.lab_id}: {plan.topology}, {len(plan.nodes)} hosts"
            + (f", {len(plan.routers)} sites" if plan.routers else "")
        )
        for name in plan.namespaces:
            netns.add_netns(name)
        say(f"  {len(plan.namespaces)} namespaces")
        # The switch first: its batch creates the veth pairs into hosts and routers.
        switch_cmds = ["link set lo up", f"link add {BRIDGE_IFNAME} type bridge"]
        switch_cmds.append(f"link set {BRIDGE_IFNAME} up")
        on_switch: list[tuple[str, str, str, str | None]] = [
            (n.name, HOST_IFNAME, n.netns, host_mac(n.index)) for n in plan.nodes if n.site is None
        ]
        on_switch += [(r.name, ROUTER_WAN_IFNAME, r.netns, None) for r in plan.routers]
        for port, peer, peer_netns, mac in on_switch:
            switch_cmds += _bridge_port(BRIDGE_IFNAME, port, peer, peer_netns, mac)
        netns.ip_batch(plan.switch, switch_cmds)
        netns.set_sysctl(plan.switch, "net.ipv4.ip_forward", "0")
        for router in plan.routers:
            self._build_router(router)
            say(f"  router {router.name}: {router.wan_address} <- NAT <- {router.lan_cidr}")
        switched = [n for n in plan.nodes if n.site is None]
        for node in plan.nodes:
            cmds = [
                "link set lo up",
                f"addr add {node.cidr} dev {node.interface}",
                f"link set {node.interface} up",
            ]
            if node.site is None:
                # Neighbours known from the start: a new host makes every other one ARP
                # for it at once, and 40 hosts' broadcasts through one software bridge
                # overflow the kernel's backlog (1,000 frames): hosts then lost each
                # other for seconds, in bare Serf as in meshd.
                cmds += [
                    f"neigh replace {other.address} lladdr {host_mac(other.index)} "
                    f"dev {node.interface} nud permanent"
                    for other in switched
                    if other is not node
                ]
            if node.gateway:
                cmds.append(f"route add default via {node.gateway}")
            netns.ip_batch(node.netns, cmds)
            # Explicit: a new namespace inherits ip_forward from the root namespace.
            netns.set_sysctl(node.netns, "net.ipv4.ip_forward", "0")
        say(f"  {len(plan.nodes)} hosts up")

    def _build_router(self, router: LabRouter) -> None:
        cmds = [
            "link set lo up",
            f"link add {ROUTER_LAN_IFNAME} type bridge",
            f"addr add {router.lan_address}/{router.prefixlen} dev {ROUTER_LAN_IFNAME}",
            f"link set {ROUTER_LAN_IFNAME} up",
            f"addr add {router.wan_address}/{router.prefixlen} dev {ROUTER_WAN_IFNAME}",
            f"link set {ROUTER_WAN_IFNAME} up",
        ]
        for node in self.plan.nodes:
            if node.site == router.site:
                cmds += _bridge_port(ROUTER_LAN_IFNAME, node.name, node.interface, node.netns)
        netns.ip_batch(router.netns, cmds)
        netns.set_sysctl(router.netns, "net.ipv4.ip_forward", "1")
        netns.load_nft(router.netns, router_ruleset(self.plan.nat_type or "restricted"))

    # ---- what it is ---------------------------------------------------

    @property
    def lab_id(self) -> str:
        return self.plan.lab_id

    @property
    def topology(self) -> str:
        return self.plan.topology

    @property
    def nodes(self) -> list[LabNode]:
        """The hosts (not routers or switches)."""
        return list(self.plan.nodes)

    @property
    def routers(self) -> list[LabRouter]:
        return list(self.plan.routers)

    def node(self, name: str) -> LabNode:
        """The host called ``name`` ("n1"); LabError if there is none."""
        return self.plan.node(name)

    def netns_of(self, target: NodeRef) -> str:
        """The namespace of a host (LabNode or name), a router ("r1") or the switch."""
        if isinstance(target, LabNode):
            return target.netns
        if target in ("hub", "inet", "switch"):
            return self.plan.switch
        if re.fullmatch(r"r\d+", target):
            return self.plan.router(target).netns
        return self.plan.node(target).netns

    def _name_of(self, target: NodeRef) -> str:
        name = target.name if isinstance(target, LabNode) else target
        self.netns_of(name)  # validates it
        return name

    def node_dir(self, node: NodeRef) -> Path:
        """A per-node scratch directory (0700), e.g. for a node's meshd state_dir and config."""
        return ensure_private_dir(self.dir / "nodes" / self._name_of(node))

    def log_path(self, node: NodeRef, name: str) -> Path:
        """Where :meth:`spawn` sends the output of process ``name`` on ``node``."""
        _check_process_name(name)
        return self.dir / "logs" / f"{self._name_of(node)}.{name}.log"

    def ifname(self, node: NodeRef, prefix: str = "wg") -> str:
        """An interface name for ``node`` unique on the whole machine (<= 15 characters)."""
        return ifname(self.lab_id, self._name_of(node), prefix)

    def expect_reachable(self, src: NodeRef, dst: NodeRef) -> bool:
        """Whether ``src`` should reach ``dst``'s underlay address in this topology."""
        return self.plan.expect_reachable(self._node(src), self._node(dst))

    def _node(self, node: NodeRef) -> LabNode:
        return node if isinstance(node, LabNode) else self.plan.node(node)

    # ---- doing things in it -------------------------------------------

    def run(
        self,
        node: NodeRef,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``node`` and wait; text output captured.

        With ``check``, a non-zero exit is a LabError naming the command and
        its last line of output.
        """
        return netns.run(
            netns.exec_argv(self.netns_of(node), argv), check=check, timeout=timeout, input=input
        )

    def spawn(
        self,
        node: NodeRef,
        argv: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Start ``argv`` in the background inside ``node``; return its pid.

        Output goes to :meth:`log_path` (node, name). The process is recorded in
        the state file, so :meth:`down` (from any process) stops it. The child
        gets only PATH plus ``env``, never this process's environment.
        """
        target = self.netns_of(node)
        node_name = self._name_of(node)
        log_file = self.log_path(node_name, name)
        ensure_private_dir(log_file.parent)
        child_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        child_env.update(env or {})
        with self._locked_state() as state:
            for proc in state["processes"]:
                if (proc["node"], proc["name"]) == (node_name, name) and alive(
                    proc["pid"], proc["start"]
                ):
                    raise LabError(f"{name} is already running on {node_name} (pid {proc['pid']})")
            child = netns.start(target, argv, log_file=log_file, env=child_env)
            self._children[child.pid] = child
            state["processes"] = [
                p
                for p in state["processes"]
                if (p["node"], p["name"]) != (node_name, name) and alive(p["pid"], p["start"])
            ]
            state["processes"].append(
                {
                    "node": node_name,
                    "name": name,
                    "pid": child.pid,
                    "start": process_start_time(child.pid),
                    "argv": list(argv),
                }
            )
        log.debug("spawned %s on %s: pid %d", name, node_name, child.pid)
        return child.pid

    def processes(self) -> list[dict[str, Any]]:
        """The processes :meth:`spawn` started, each with an ``alive`` flag."""
        state = read_state(self.dir / STATE_FILE) or {"processes": []}
        return [{**p, "alive": alive(p["pid"], p["start"])} for p in state.get("processes", [])]

    def kill(self, node: NodeRef, name: str, sig: int = signal.SIGTERM) -> bool:
        """Send ``sig`` to spawned process ``name`` on ``node``; False if it is not running."""
        node_name = self._name_of(node)
        for proc in self.processes():
            if (proc["node"], proc["name"]) == (node_name, name) and proc["alive"]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc["pid"], sig)
                return True
        return False

    def link_down(self, node: NodeRef) -> None:
        """Cut ``node`` off its network (its underlay interface goes down)."""
        lab_node = self._node(node)
        netns.ip_batch(lab_node.netns, [f"link set {lab_node.interface} down"])

    def link_up(self, node: NodeRef) -> None:
        """Undo :meth:`link_down` (the default route comes back too)."""
        lab_node = self._node(node)
        cmds = [f"link set {lab_node.interface} up"]
        if lab_node.gateway:
            cmds.append(f"route replace default via {lab_node.gateway}")
        netns.ip_batch(lab_node.netns, cmds)

    def ping(self, src: NodeRef, address: str, *, deadline: float = 3) -> float | None:
        """Ping ``address`` from ``src`` until one answer or ``deadline`` s; RTT in ms or None.

        A ``deadline`` under 1 s sends a single probe and waits that long for it.
        """
        if deadline >= 1:
            # Resend every 0.2 s until one answer: the first may wait for ARP or a handshake.
            wait = ["-i", "0.2", "-w", str(math.ceil(deadline))]
        else:
            wait = ["-W", f"{deadline:g}"]
        done = self.run(
            src, ["ping", "-n", "-c", "1", *wait, address], check=False, timeout=deadline + 10
        )
        if done.returncode != 0:
            return None
        found = re.search(r"time[=<]([\d.]+) ?ms", done.stdout)
        return float(found.group(1)) if found else 0.0

    def ping_matrix(
        self,
        addresses: Mapping[str, str] | None = None,
        *,
        deadline: float = 3,
        expect: Callable[[LabNode, LabNode], bool] | None = None,
        only: Collection[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Every host pings every other host; the result per pair and an overall ``ok``.

        Default ``addresses``: the underlay, where the topology decides what
        should answer (nat: nobody reaches into a site); with ``addresses``
        given (node name -> address, e.g. mesh addresses) the hosts named there
        ping each other and every pair should answer, unless ``expect(src, dst)``
        says otherwise. ``only``: just these (src, dst) pairs of names.
        Returns ``{"ok": bool, "pairs": [{"src", "dst", "address", "reachable",
        "expected", "rtt_ms"}, ...], "failed": ["n1->n2", ...]}``.
        """
        netns.require_binaries("ping")
        targets = (
            dict(addresses)
            if addresses is not None
            else {n.name: n.address for n in self.plan.nodes}
        )
        # Only the hosts named take part: a mesh may cover part of the lab.
        jobs = [
            (src, self.plan.node(dst), address)
            for src in self.plan.nodes
            if src.name in targets
            for dst, address in targets.items()
            if dst != src.name and (only is None or (src.name, dst) in only)
        ]
        if expect is None:
            expect = (lambda _s, _d: True) if addresses is not None else self.plan.expect_reachable

        def probe(job: tuple[LabNode, LabNode, str]) -> dict[str, Any]:
            src, dst, address = job
            expected = expect(src, dst)
            # A pair that should fail costs its whole deadline: keep that one short.
            rtt = self.ping(src, address, deadline=deadline if expected else 0.5)
            return {
                "src": src.name,
                "dst": dst.name,
                "address": address,
                "reachable": rtt is not None,
                "expected": expected,
                "rtt_ms": rtt,
            }

        # Pings mostly wait, so many at once even on 2 cores.
        with ThreadPoolExecutor(max_workers=32) as pool:
            pairs = list(pool.map(probe, jobs))
        failed = [f"{p['src']}->{p['dst']}" for p in pairs if p["reachable"] != p["expected"]]
        return {"ok": not failed, "pairs": pairs, "failed": failed}

    # ---- state --------------------------------------------------------

    def _write_state(self, extra: Mapping[str, Any]) -> None:
        state = {"version": 1, "created": time.time(), "plan": self.plan.to_dict(), **extra}
        atomic_write(self.dir / STATE_FILE, json.dumps(state, indent=2) + "\n")

    @contextlib.contextmanager
    def _locked_state(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the state file under a lock (two processes may spawn at once)."""
        try:
            lock = open(self.dir / ".lock", "a")  # noqa: SIM115 - held across the yield
        except OSError as exc:
            raise LabError(f"lab {self.lab_id} is gone ({exc.strerror})") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = read_state(self.dir / STATE_FILE)
            if state is None:
                raise LabError(f"lab {self.lab_id} has no state file; was it taken down?")
            yield state
            atomic_write(self.dir / STATE_FILE, json.dumps(state, indent=2) + "\n")

    # ---- teardown -----------------------------------------------------

    def down(self) -> None:
        """Stop every process, delete every namespace and file of this lab. Idempotent."""
        teardown(self.lab_id, self.dir, self._children)

    @classmethod
    def down_by_id(cls, lab_id: str, *, base_dir: str | os.PathLike[str] | None = None) -> bool:
        """Tear down lab ``lab_id`` from whatever is left of it; False if nothing was."""
        directory = lab_base_dir(base_dir) / validate_lab_id(lab_id)
        return teardown(lab_id, directory, {})

    @classmethod
    def down_all(cls, *, base_dir: str | os.PathLike[str] | None = None) -> list[str]:
        """Tear down every lab on this machine (other users' too!); return their ids."""
        ids = {lab_id for name in netns.list_netns() if (lab_id := lab_id_of_netns(name))}
        base = lab_base_dir(base_dir)
        with contextlib.suppress(OSError):
            ids |= {p.name for p in base.iterdir() if (p / STATE_FILE).exists()}
        for lab_id in sorted(ids):
            cls.down_by_id(lab_id, base_dir=base_dir)
        return sorted(ids)

    @classmethod
    def list_ids(cls, *, base_dir: str | os.PathLike[str] | None = None) -> list[str]:
        """Ids of labs on this machine (by state file or by namespace)."""
        ids = {lab_id for name in netns.list_netns() if (lab_id := lab_id_of_netns(name))}
        with contextlib.suppress(OSError):
            ids |= {p.name for p in lab_base_dir(base_dir).iterdir() if (p / STATE_FILE).exists()}
        return sorted(ids)

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def __repr__(self) -> str:
        return f"<Lab {self.lab_id} {self.topology} nodes={len(self.plan.nodes)}>"


def _check_process_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or name.startswith("."):
        raise LabError(f"bad process name {name!r}: use letters, digits, '_', '-', '.'")
