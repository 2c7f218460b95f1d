"""meshd itself in a lab: one agent per host, each with its own config and state.

The first host runs ``meshd init``; every other host runs ``meshd join`` through
a randomly chosen earlier host (so the first node is not special), then each
host's ``meshd agent`` is started with :meth:`Lab.spawn`, so ``lab down`` stops
them with everything else. Every node's files live in its lab node directory::

    <node_dir>/meshd.toml      its config (name, state dir, a machine-unique interface name)
    <node_dir>/state/          its meshd state directory
    <node_dir>/token           the join token it used (0600)

Used by ``meshd lab up`` (the README's demo), the integration tests and the benchmarks.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meshd.errors import LabError
from meshd.hostport import format_host_port
from meshd.lab.lab import Lab, NodeRef
from meshd.state import atomic_write

AGENT = "agent"
WIREGUARD_PORT = 51820
Progress = Callable[[str], None]


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
            f"port = {WIREGUARD_PORT}\n{extra}"
        )
        path = self.config_path(name)
        atomic_write(path, text)
        return path

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

    def first_node(self) -> str:
        for node in self.lab.nodes:
            if (self.state_dir(node) / "ca.key").exists():
                return node.name
        raise LabError("no node of this lab ran 'meshd init'")

    def start(self, node: NodeRef, *, log_level: str | None = None) -> int:
        argv = [
            *meshd_argv(),
            "--config",
            str(self.config_path(node)),
            "--log-level",
            log_level or self.log_level,
            AGENT,
        ]
        return self.lab.spawn(node, argv, name=AGENT)

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
    ) -> None:
        """init the first node, join each other through a random earlier one, start all."""
        chosen = [self._name(n) for n in (nodes or self.lab.nodes)]
        rng = random.Random(seed)
        self.init(chosen[0])
        self.start(chosen[0])
        say(f"{chosen[0]}: meshd init, agent started")
        self.wait_ready(chosen[0])
        for index, name in enumerate(chosen[1:], start=1):
            via = rng.choice(chosen[:index])
            self.join(name, via)
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

    def wait_full_mesh(
        self, nodes: Sequence[NodeRef] | None = None, *, timeout: float = 60
    ) -> float:
        """Wait until every node pings every other node's mesh address; seconds it took."""
        started = time.monotonic()
        chosen = [self._name(n) for n in (nodes or self.lab.nodes)]
        addresses = self.mesh_addresses(chosen)
        pending = {(a, b) for a in chosen for b in chosen if a != b}
        while pending:
            for src, dst in sorted(pending):
                if self.lab.ping(src, addresses[dst], deadline=0.5) is not None:
                    pending.discard((src, dst))
            if pending and time.monotonic() - started > timeout:
                missing = ", ".join(f"{a}->{b}" for a, b in sorted(pending)[:10])
                raise LabError(f"no full mesh after {timeout:g} s; missing {missing}")
        return time.monotonic() - started

    def ping_matrix(self, nodes: Sequence[NodeRef] | None = None, **kwargs: Any) -> dict[str, Any]:
        """The lab's ping matrix over mesh addresses (every pair must answer)."""
        return self.lab.ping_matrix(self.mesh_addresses(nodes), **kwargs)
