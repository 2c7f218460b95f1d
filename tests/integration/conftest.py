"""Shared fixtures of the integration tests: root/binary skips and the lab.

Integration tests run real programs in network namespaces and need root.
Mark them with the ``root`` marker, naming the programs they need besides
``ip``; they are skipped, with the reason, when not root or a program is missing:

    pytestmark = pytest.mark.root("serf", "wireguard-go")    # a whole module
    @requires_root("wg")                                      # one test (same thing)

``eventually(check, timeout, what)`` waits on an observable condition with a deadline.

``lab_factory`` builds labs and tears down every lab it built when the test
ends, passed or failed:

    def test_something(lab_factory):
        lab = lab_factory(nodes=3)                  # flat; or topology="nat"
        lab.run("n1", ["ping", "-c", "1", lab.node("n2").address])

Labs get random ids, so parallel runs (and other people's tests on the same
machine) never share a namespace. Never call ``Lab.down_all()`` from a test:
it would take down other runs' labs too.

A lab's logs (every spawned agent's output) go with it at teardown. For a
post-mortem of a flake, ``MESHD_TEST_LOGS=DIR`` copies them first, to
``DIR/<lab id>/``: take every lab down with :func:`take_down`. meshd agents log
at ``MESHD_TEST_LOG_LEVEL`` (default info; debug adds Serf's own member events).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from meshd.gossip.record import encode_record
from meshd.gossip.supervisor import SerfAgent, SerfSettings
from meshd.hostport import format_host_port
from meshd.identity import WireGuardKeyPair
from meshd.lab import Lab
from meshd.lab.mesh import MeshLab
from meshd.types import NodeRecord

ALWAYS_NEEDED = ("ip",)
MESH_PROGRAMS = ("serf", "wireguard-go", "wg", "ping")


def requires_root(*binaries: str) -> pytest.MarkDecorator:
    """The ``root`` marker: skip unless root and ``binaries`` (plus ``ip``) are installed."""
    return pytest.mark.root(*binaries)


def missing_requirements(binaries: tuple[str, ...] = ()) -> str | None:
    """Why a root test cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [b for b in (*ALWAYS_NEEDED, *binaries) if shutil.which(b) is None]
    if missing:
        return f"needs {', '.join(missing)} installed"
    return None


AGENT_LOG_LEVEL = os.environ.get("MESHD_TEST_LOG_LEVEL", "info")


def take_down(lab: Lab) -> None:
    """``lab.down()``, keeping its logs under $MESHD_TEST_LOGS first when that is set."""
    keep = os.environ.get("MESHD_TEST_LOGS")
    logs = lab.dir / "logs"
    if keep and logs.is_dir():
        shutil.copytree(logs, Path(keep) / lab.lab_id, dirs_exist_ok=True)
    lab.down()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # `timeout 600 pytest` ends with SIGTERM, which kills pytest outright and leaves labs
    # behind; as a KeyboardInterrupt, pytest still runs every fixture's teardown.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("root"):
        reason = missing_requirements(tuple(str(arg) for arg in mark.args))
        if reason:
            pytest.skip(reason)


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """``lab_factory(nodes=3, topology="flat", **kw) -> Lab``; all its labs go down at teardown.

    Extra keywords go to :meth:`Lab.create` (``sites``, ``public``, ``lab_id``).
    """
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    labs: list[Lab] = []

    def make(nodes: int = 3, topology: str = "flat", **kwargs: Any) -> Lab:
        lab = Lab.create(nodes=nodes, topology=topology, **kwargs)
        labs.append(lab)
        return lab

    yield make
    errors = []
    for lab in reversed(labs):
        try:
            take_down(lab)
        except Exception as exc:  # take down the others before reporting
            errors.append(f"{lab.lab_id}: {exc}")
    if errors:
        pytest.fail("lab teardown failed: " + "; ".join(errors))


@contextlib.contextmanager
def mesh_lab(
    nodes: int,
    *,
    up: Sequence[str] = (),
    seed: int | None = None,
    timeout: float = 90,
    topology: str = "flat",
    log_level: str | None = None,
    **lab_options: Any,
) -> Iterator[MeshLab]:
    """A lab of ``nodes`` hosts for real meshd agents, for a module-scoped fixture;
    with ``up``, those hosts already form a full mesh (``MeshLab.up`` with ``seed``).
    Flat unless ``topology="nat"`` (``lab_options``: ``sites``, ``public``, ``nat_type``;
    :func:`tests.integration.natlab.nat_mesh` is made for that).

    It goes down at the end; with ``MESHD_TEST_LOGS=DIR`` its agents' logs are kept
    there first, for a post-mortem (``MESHD_TEST_LOG_LEVEL=debug`` for more, or
    ``log_level``). Skipped, with the reason, when it cannot run.
    """
    reason = missing_requirements(MESH_PROGRAMS)
    if reason:
        pytest.skip(reason)
    lab = Lab.create(nodes=nodes, topology=topology, **lab_options)
    try:
        built = MeshLab(lab, log_level=log_level or AGENT_LOG_LEVEL)
        if up:
            built.up(list(up), seed=seed)
            built.wait_full_mesh(list(up), timeout=timeout)
        yield built
    finally:
        take_down(lab)


def rogue_serf(
    mesh: MeshLab, host: str, name: str, port: int, record: NodeRecord | None = None
) -> SerfAgent:
    """A bare ``serf agent`` holding only the network's gossip keys, bound to ``host``'s
    mesh IPv6 address (so its packets travel through ``host``'s tunnels, as a compromised
    machine's would, and gossip reaches it like meshd's own) and joining the first node's
    gossip. Not started."""
    status = mesh.status(host)
    first = mesh.status("n1")
    assert status is not None, f"the agent on {host} does not answer"
    assert first is not None, "the agent on n1 does not answer"
    address = status["node"]["addresses"][1]
    if record is None:
        record = NodeRecord(
            public_key=WireGuardKeyPair.generate().public_key,
            addresses=(ipaddress.ip_address(f"100.80.250.{port % 250}"),),
            port=51820,
            version=1,
        )
    # The keys Serf uses now, primary first: after a rotation run by another node the
    # host's own gossip.key is stale (the rogue could not join: Serf exits 1).
    keys = json.loads((mesh.state_dir(host) / "serf" / "keyring.json").read_text())
    settings = SerfSettings(
        node_name=name,
        state_dir=Path(mesh.lab.node_dir(host)) / f"rogue-{port}",
        rpc_auth_key=secrets.token_hex(8),
        bind_addr=address,
        bind_port=port,
        advertise_addr=format_host_port(address, port),
        rpc_addr=f"127.0.0.1:{port + 100}",
        gossip_keys=tuple(keys),
        tags=encode_record(record),
        extra={"start_join": [format_host_port(first["node"]["addresses"][1], 7946)]},
    )
    return SerfAgent(settings, netns=mesh.lab.netns_of(host))


def wg_peers(mesh: MeshLab, node: str) -> set[str]:
    """The public keys of the peers on ``node``'s mesh interface, as ``wg`` lists them."""
    out = mesh.lab.run(node, ["wg", "show", mesh.lab.ifname(node, "mw"), "peers"]).stdout
    return set(out.split())


def eventually(
    check: Callable[[], bool], timeout: float, what: str, detail: Callable[[], object] = str
) -> float:
    """Wait until ``check()`` holds, or fail the test naming ``what`` (and ``detail()``).

    Returns how long it took.
    """
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not true after {timeout:g} s {detail()}".rstrip())
        time.sleep(0.2)
    return time.monotonic() - started


class Pinger(threading.Thread):
    """``ping`` from one node to another, 5 per second until stopped, recording each reply."""

    def __init__(self, mesh: MeshLab, src: str, dst: str) -> None:
        super().__init__(daemon=True)
        argv = ["ping", "-n", "-D", "-i", "0.2", "-W", "1", mesh.mesh_address(dst)]
        self.argv = ["ip", "netns", "exec", mesh.lab.netns_of(src), *argv]
        self.replies: list[float] = []  # the kernel's time stamps (-D), seconds
        self.proc: subprocess.Popen[str] | None = None

    def run(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "bytes from" in line and line.startswith("["):
                self.replies.append(float(line[1 : line.index("]")]))

    def answered_since(self, stamp: float) -> bool:
        return any(r > stamp for r in self.replies)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
        self.join(timeout=10)

    def longest_gap(self) -> float:
        stamps = sorted(self.replies)
        return max((b - a for a, b in itertools.pairwise(stamps)), default=float("inf"))


HANDSHAKE_INITIATION = 148  # bytes: the only traffic a peer without a session sends


def refused_twice(mesh: MeshLab, node: str, keys: dict[str, str]) -> bool:
    """Whether each member in ``keys`` (name -> WireGuard key) left two of ``node``'s
    handshake initiations unanswered since ``node``'s agent started (a fresh interface:
    WireGuard resends an unanswered initiation after 5 s). Fails the test at once when
    one was answered, or ``node`` forgot a member (nothing left to refuse)."""
    found = mesh.status(node)
    assert found is not None, f"the agent on {node} does not answer"
    rows = {p["public_key"]: p for p in found["peers"]}
    for name, key in keys.items():
        row = rows.get(key)
        assert row is not None, f"{node} has forgotten {name}: nothing left to refuse"
        assert row["last_handshake"] is None, f"{name} answered {node}'s handshake"
    return all(rows[key]["tx_bytes"] >= 2 * HANDSHAKE_INITIATION for key in keys.values())
