"""meshd itself in a lab: one agent per host, each with its own config and state.

The first host runs ``meshd init``; every other host runs ``meshd join`` through
a randomly chosen earlier host it can reach (so the first node is not special;
in the nat topology, a public host or one of its own site: :func:`choose_seed`),
then each host's ``meshd agent`` is started with :meth:`Lab.spawn`, so ``lab down``
stops them with everything else. Every node's files live in its lab node directory::

    <node_dir>/meshd.toml      its config (name, state dir, a machine-unique interface name)
    <node_dir>/state/          its meshd state directory
    <node_dir>/token           the join token it used (0600)

Public hosts of a nat lab get ``[plugins.nat] public = true`` in their config: the
NAT plugin reads it as "this node is reachable from outside: observe others'
endpoints, relay".

Which mesh pairs should answer (:meth:`MeshLab.expect_mesh_reachable`): in a flat
lab, all. In a nat lab, all when the NAT plugin is installed; without it, only the
pairs with an underlay path one way or the other (a site host opens the tunnel to a
public host or a host of its own site); two hosts in different sites have none.

Used by ``meshd lab up`` (the README's demo), the integration tests and the benchmarks.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from meshd.errors import LabError
from meshd.hostport import format_host_port
from meshd.lab.lab import Lab, NodeRef
from meshd.lab.plan import LabNode, LabPlan
from meshd.plugins import ENTRY_POINT_GROUP
from meshd.state import atomic_write

AGENT = "agent"
WIREGUARD_PORT = 51820
NAT_PLUGIN = "nat"  # its entry point in ENTRY_POINT_GROUP, and its [plugins.nat] table
Progress = Callable[[str], None]


def choose_seed(plan: LabPlan, joiner: str, earlier: Sequence[str], rng: random.Random) -> str:
    """The host ``joiner`` joins through: a random one of ``earlier`` it can reach.

    Drawn from ``earlier`` in its order, so where every host reaches every other
    (flat) the choice is ``rng.choice(earlier)``, as it always was.
    """
    src = plan.node(joiner)
    reachable = [name for name in earlier if plan.expect_reachable(src, plan.node(name))]
    if not reachable:
        where = f"site {src.site}" if src.site else "the internet"
        raise LabError(
            f"{joiner} (in {where}) can reach none of the hosts that joined before it "
            f"({', '.join(earlier) or 'none'}): start with a public host, or one of its site"
        )
    return rng.choice(reachable)


def nat_plugin_installed() -> bool:
    """Whether the NAT plugin is installed (the entry point meshd loads it from)."""
    return bool(metadata.entry_points(group=ENTRY_POINT_GROUP, name=NAT_PLUGIN))


def meshd_argv() -> list[str]:
    """How to run this very meshd (same interpreter, same installation)."""
    return [sys.executable, "-m", "meshd"]


class MeshLab:
    """meshd agents on a lab's hosts; see the module docstring."""

    def __init__(
        self,
        lab: Lab,
        *,
        network: str = "lab",
        cidr: str = "100.80.0.0/16",
        log_level: str = "info",
    ) -> None:
        self.lab = lab
        self.network = network
        self.cidr = cidr
        self.log_level = log_level  # of every agent started (debug: Serf's member events too)

    # --- files ----------------------------------------------------------------

    def _name(self, node: NodeRef) -> str:
        return node if isinstance(node, str) else node.name

    def config_path(self, node: NodeRef) -> Path:
        return self.lab.node_dir(node) / "meshd.toml"

    def state_dir(self, node: NodeRef) -> Path:
        return self.lab.node_dir(node) / "state"

    def write_config(self, node: NodeRef, extra: str = "", *, node_name: str | None = None) -> Path:
        """The node's config: its name (the host's unless ``node_name``), state dir and
        interface; ``extra`` TOML appended."""
        name = self._name(node)
        text = (
            f'[node]\nname = "{node_name or name}"\nstate_dir = "{self.state_dir(name)}"\n'
            f'[wireguard]\ninterface = "{self.lab.ifname(name, "mw")}"\n'
            f"port = {WIREGUARD_PORT}\n{self.plugin_config(name)}{extra}"
        )
        path = self.config_path(name)
        atomic_write(path, text)
        return path

    def plugin_config(self, node: NodeRef) -> str:
        """The node's ``[plugins.*]`` tables: a public host of a nat lab is the NAT
        plugin's observer and relay (flat labs need no NAT traversal)."""
        lab_node = self.lab.node(self._name(node))
        if self.lab.topology == "nat" and lab_node.public:
            return f"[plugins.{NAT_PLUGIN}]\npublic = true\n"
        return ""

    def endpoint(self, node: NodeRef) -> str:
        return format_host_port(self.lab.node(self._name(node)).address, WIREGUARD_PORT)

    def meshd(self, node: NodeRef, *args: str, check: bool = True, timeout: float = 60) -> Any:
        """Run ``meshd --config <node's> ARGS`` inside the node."""
        argv = [*meshd_argv(), "--config", str(self.config_path(node)), *args]
        return self.lab.run(node, argv, check=check, timeout=timeout)

    # --- building the mesh ------------------------------------------------------

    def init(self, node: NodeRef, *, extra_config: str = "") -> None:
        self.write_config(node, extra_config)
        self.meshd(
            node,
            "init",
            "--network",
            self.network,
            "--cidr",
            self.cidr,
            "--endpoint",
            self.endpoint(node),
            "--no-start",
        )

    def token_path(self, node: NodeRef) -> Path:
        return self.lab.node_dir(node) / "token"

    def join(
        self,
        node: NodeRef,
        seed: NodeRef,
        *,
        extra_config: str = "",
        node_name: str | None = None,
    ) -> None:
        """``meshd join`` on ``node`` through ``seed``, with a token made where init ran."""
        first = self.first_node()
        token = self.token_path(node)
        shutil.copyfile(self.state_dir(first) / "join-token", token)
        token.chmod(0o600)
        self.write_config(node, extra_config, node_name=node_name)
        seed_address = self.lab.node(self._name(seed)).address
        self.meshd(
            node,
            "join",
            seed_address,
            "--token-file",
            str(token),
            "--endpoint",
            self.endpoint(node),
            "--no-start",
        )

    def join_and_run(self, node: NodeRef, seed: NodeRef) -> int:
        """``meshd join --foreground`` on ``node`` through ``seed``: the join command
        becomes the node's agent (one Python start-up, as the default detached start
        forks); the lab owns the process as the node's agent. Its pid."""
        first = self.first_node()
        token = self.token_path(node)
        shutil.copyfile(self.state_dir(first) / "join-token", token)
        token.chmod(0o600)
        self.write_config(node, "")
        argv = [
            *meshd_argv(),
            "--config",
            str(self.config_path(node)),
            "--log-level",
            self.log_level,
            "join",
            str(self.lab.node(self._name(seed)).address),
            "--token-file",
            str(token),
            "--endpoint",
            self.endpoint(node),
            "--foreground",
        ]
        return self.lab.spawn(node, argv, name=AGENT)

    def first_node(self) -> str:
        for node in self.lab.nodes:
            if (self.state_dir(node) / "ca.key").exists():
                return node.name
        raise LabError("no node of this lab ran 'meshd init'")

    def start(
        self,
        node: NodeRef,
        *,
        log_level: str | None = None,
        wrapper: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Start the node's agent; ``wrapper`` goes before the command (e.g. ``setpriv``
        with a capability set, to run it as a hardened service would), ``env`` is added
        to its environment (e.g. ``PYTHONPATH`` for a plugin installed elsewhere)."""
        argv = [
            *wrapper,
            *meshd_argv(),
            "--config",
            str(self.config_path(node)),
            "--log-level",
            log_level or self.log_level,
            AGENT,
        ]
        return self.lab.spawn(node, argv, name=AGENT, env=env)

    def stop(self, node: NodeRef, *, sig: int = signal.SIGTERM, wait: float = 15) -> bool:
        """Stop the node's agent (SIGKILL for a crash); True when it was running."""
        if not self.lab.kill(node, AGENT, sig):
            return False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not self.running(node):
                return True
            time.sleep(0.1)
        raise LabError(
            f"the agent on {self._name(node)} did not stop within {wait:g} s; "
            f"its log ends: {self._log_tail(node)}"
        )

    def _log_tail(self, node: NodeRef, lines: int = 3) -> str:
        try:
            text = self.lab.log_path(node, AGENT).read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc.strerror})"
        return " | ".join(text.strip().splitlines()[-lines:])

    def running(self, node: NodeRef) -> bool:
        name = self._name(node)
        return any(
            p["node"] == name and p["name"] == AGENT and p["alive"] for p in self.lab.processes()
        )

    def up(
        self,
        nodes: Sequence[NodeRef] | None = None,
        *,
        seed: int | None = None,
        say: Progress = lambda _: None,
        extra_config: str = "",
    ) -> None:
        """init the first node, join each other through a random earlier one it can
        reach (:func:`choose_seed`), start all; ``extra_config`` goes in every config."""
        chosen = [self._name(n) for n in (nodes or self.lab.nodes)]
        rng = random.Random(seed)
        if len(chosen) > 1:  # before anything starts: a bad order fails at once
            for index, name in enumerate(chosen[1:], start=1):
                choose_seed(self.lab.plan, name, chosen[:index], random.Random(0))
        self.init(chosen[0], extra_config=extra_config)
        self.start(chosen[0])
        say(f"{chosen[0]}: meshd init, agent started")
        self.wait_ready(chosen[0])
        for index, name in enumerate(chosen[1:], start=1):
            via = choose_seed(self.lab.plan, name, chosen[:index], rng)
            self.join(name, via, extra_config=extra_config)
            self.start(name)
            # It may be the next one's seed: its enrolment port must be open first.
            self.wait_ready(name)
            say(f"{name}: joined through {via}, agent started")

    # --- observing -------------------------------------------------------------

    def status(self, node: NodeRef) -> dict[str, Any] | None:
        """``meshd status --json`` of the node, or None when its agent does not answer."""
        done = self.meshd(node, "status", "--json", check=False, timeout=15)
        if done.returncode != 0:
            return None
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def wait_ready(self, node: NodeRef, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.status(node)
            if found is not None:
                return found
            time.sleep(0.2)
        raise LabError(f"the agent on {self._name(node)} did not answer within {timeout:g} s")

    def mesh_address(self, node: NodeRef) -> str:
        """The node's mesh IPv4 address, from its state (the agent need not run)."""
        data = json.loads((self.state_dir(node) / "node.json").read_text())
        return str(data["ipv4"])

    def mesh_addresses(self, nodes: Sequence[NodeRef] | None = None) -> dict[str, str]:
        chosen = [self._name(n) for n in (nodes or self.lab.nodes)]
        return {name: self.mesh_address(name) for name in chosen if self.state_dir(name).exists()}

    def peer_names(self, node: NodeRef) -> set[str] | None:
        """Names of the members this node has as WireGuard peers (None: agent down)."""
        found = self.status(node)
        if found is None:
            return None
        return {p["name"] for p in found["peers"] if p["peer"]}

    def expect_mesh_reachable(self, src: LabNode, dst: LabNode) -> bool:
        """Whether ``src`` should reach ``dst``'s mesh address (see the module docstring)."""
        if self.lab.topology != "nat" or self.nat_traversal:
            return True
        plan = self.lab.plan
        return plan.expect_reachable(src, dst) or plan.expect_reachable(dst, src)

    @functools.cached_property
    def nat_traversal(self) -> bool:
        """Whether pairs without an underlay path should reach each other (NAT plugin)."""
        return nat_plugin_installed()

    def wait_mesh(
        self,
        nodes: Sequence[NodeRef] | None = None,
        *,
        timeout: float = 60,
        say: Progress = lambda _: None,
    ) -> tuple[set[tuple[str, str]], float]:
        """Ping every pair's mesh address until every pair that should answer has
        answered once (:meth:`expect_mesh_reachable`), or ``timeout`` s; ``say`` gets
        a line per round ("mesh: 62/72 pairs after 12 s"). Returns the pairs that
        should answer and have not, and the seconds it took.
        """
        started = time.monotonic()
        chosen = [self._name(n) for n in (nodes or self.lab.nodes)]
        addresses = self.mesh_addresses(chosen)
        plan = self.lab.plan
        expected = {
            (a, b)
            for a in chosen
            for b in chosen
            if a != b and self.expect_mesh_reachable(plan.node(a), plan.node(b))
        }
        pending = set(expected)
        while True:
            matrix = self.lab.ping_matrix(addresses, deadline=1, only=pending)
            pending -= {(p["src"], p["dst"]) for p in matrix["pairs"] if p["reachable"]}
            took = time.monotonic() - started
            say(f"mesh: {len(expected) - len(pending)}/{len(expected)} pairs after {took:.0f} s")
            if not pending or took > timeout:
                return pending, took

    def wait_full_mesh(
        self, nodes: Sequence[NodeRef] | None = None, *, timeout: float = 60
    ) -> float:
        """Wait until every node pings every other node's mesh address that it should
        (:meth:`expect_mesh_reachable`: in a flat lab, all); seconds it took."""
        missing, took = self.wait_mesh(nodes, timeout=timeout)
        if missing:
            pairs = ", ".join(f"{a}->{b}" for a, b in sorted(missing)[:10])
            seen = "; ".join(self._peer_view(a, b) for a, b in sorted(missing)[:4])
            raise LabError(f"no full mesh after {timeout:g} s; missing {pairs} ({seen})")
        return took

    def _peer_view(self, node: str, of: str) -> str:
        """What ``node``'s agent says of its peer ``of``, for a failure message."""
        found = self.status(node)
        rows = [p for p in (found or {"peers": []})["peers"] if p["name"] == of]
        if not rows:
            return f"{node} has no row for {of}" if found else f"{node}'s agent did not answer"
        row = rows[0]
        keys = ("endpoint", "last_handshake", "rx_bytes", "tx_bytes", "via", "path", "path_reason")
        return f"{node} on {of}: " + ", ".join(f"{k} {row.get(k)}" for k in keys)

    def ping_matrix(self, nodes: Sequence[NodeRef] | None = None, **kwargs: Any) -> dict[str, Any]:
        """The lab's ping matrix over mesh addresses (:meth:`expect_mesh_reachable`
        says which pairs should answer)."""
        kwargs.setdefault("expect", self.expect_mesh_reachable)
        return self.lab.ping_matrix(self.mesh_addresses(nodes), **kwargs)
