"""Helpers of the NAT tests (tests/integration/test_nat.py): a nat lab with meshd on
every host, outage measurement by ping, and who reports whom as not alive.

    with nat_mesh(nodes=9, sites=3, public=2, nat_type="restricted") as mesh:
        joined = time.monotonic()          # nat_mesh yields right after the last join
        mesh.wait_full_mesh(timeout=30)    # every pair that should answer (MeshLab's rule)
        # an outage, measured while something breaks, in another thread:
        with ThreadPoolExecutor(1) as pool:
            gap = pool.submit(ping_gaps, mesh, "n3", mesh.mesh_address("n4"), 20)
            mesh.stop("n1", sig=signal.SIGKILL)
            print(f"longest gap {gap.result():.2f} s")

The hosts: n1..nP public, then the others dealt round-robin over the sites (see
:mod:`meshd.lab.plan`); public hosts have ``[plugins.nat] public = true``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from meshd.lab import Lab
from meshd.lab.lab import NodeRef
from meshd.lab.mesh import MeshLab
from tests.integration.conftest import mesh_lab

# "[1764597600.123456] 64 bytes from 100.80.1.2: icmp_seq=3 ttl=64 time=0.31 ms"
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from ", re.MULTILINE)


@contextlib.contextmanager
def nat_mesh(
    nodes: int = 9,
    sites: int = 3,
    public: int = 2,
    nat_type: str = "restricted",
    *,
    seed: int | None = None,
    log_level: str | None = None,
) -> Iterator[MeshLab]:
    """A nat lab with a meshd agent on every host, joined (``MeshLab.up``: each host
    through an earlier one it can reach), taken down at the end. Yields right after
    the last agent answered: the caller waits for what it means to show."""
    with mesh_lab(
        nodes,
        topology="nat",
        sites=sites,
        public=public,
        nat_type=nat_type,
        log_level=log_level,
    ) as mesh:
        mesh.up(seed=seed)
        yield mesh


def longest_gap(ping_output: str, started: float, ended: float) -> float:
    """The longest time (s) without a reply in the output of ``ping -D``, between
    ``started`` and ``ended`` (wall-clock, as ``-D`` prints): no reply at all is
    the whole span."""
    replies = sorted(float(stamp) for stamp in _REPLY.findall(ping_output))
    edges = [started, *(t for t in replies if started <= t <= ended), ended]
    return max(later - earlier for earlier, later in itertools.pairwise(edges))


def ping_gaps(
    lab: Lab | MeshLab, src: NodeRef, dst_addr: str, seconds: float, interval: float = 0.2
) -> float:
    """Ping ``dst_addr`` from ``src`` every ``interval`` s for ``seconds`` s; the longest
    time without a reply (s), from the start, between replies, or to the end.

    One ``ping -D -O`` process, its reply timestamps parsed: a measurement, not a
    sampling. Blocks for ``seconds``: run it in a thread while something breaks.
    """
    target = lab.lab if isinstance(lab, MeshLab) else lab
    argv = ["ping", "-n", "-D", "-O", "-i", f"{interval:g}", "-w", str(math.ceil(seconds))]
    started = time.time()
    done = target.run(src, [*argv, dst_addr], check=False, timeout=seconds + 15)
    ended = time.time()
    return longest_gap(done.stdout, started, ended)


@dataclass(frozen=True)
class MemberSighting:
    """``observer``'s ``meshd status`` showed ``member`` in gossip state ``state``."""

    observer: str
    member: str
    state: str


def member_states(mesh: MeshLab, nodes: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """Each node's view (``meshd status --json``): member name -> gossip state, itself
    "alive"; a node whose agent does not answer maps to {}."""
    names = list(nodes) if nodes is not None else [n.name for n in mesh.lab.nodes]
    views: dict[str, dict[str, str]] = {}
    for name in names:
        status = mesh.status(name)
        if status is None:
            views[name] = {}
            continue
        view = {peer["name"]: peer["gossip"] for peer in status["peers"]}
        view[status["node"]["name"]] = "alive"
        views[name] = view
    return views


def all_alive(views: dict[str, dict[str, str]], members: Sequence[str]) -> bool:
    """Whether every view lists exactly ``members``, all alive."""
    wanted = dict.fromkeys(members, "alive")
    return all(view == wanted for view in views.values())


def watch_members(mesh: MeshLab, seconds: float) -> tuple[int, list[MemberSighting]]:
    """Poll every node's view for ``seconds``; the number of full rounds and every
    sighting of a member in a state other than alive (failed, left, ...).

    A poll samples: a member failed and back between two rounds of one node is not
    seen here. Serf's own events (``EventMemberFailed`` in agent logs at debug level)
    catch those: :func:`serf_failures`.
    """
    deadline = time.monotonic() + seconds
    rounds = 0
    seen: list[MemberSighting] = []
    while time.monotonic() < deadline:
        for observer, view in member_states(mesh).items():
            seen += [MemberSighting(observer, m, s) for m, s in view.items() if s != "alive"]
        rounds += 1
    return rounds, seen


def serf_failures(mesh: MeshLab) -> dict[str, list[str]]:
    """Per node, the lines of its agent log where Serf marked a member failed (needs the
    agents at log level debug, e.g. ``nat_mesh(log_level="debug")``)."""
    found: dict[str, list[str]] = {}
    for node in mesh.lab.nodes:
        path = mesh.lab.log_path(node, "agent")
        with contextlib.suppress(FileNotFoundError):
            lines = path.read_text(errors="replace").splitlines()
            found[node.name] = [line for line in lines if "EventMemberFailed" in line]
    return found
