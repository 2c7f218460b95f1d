"""The ``serf agent`` child: its generated configuration, start, readiness, restarts, stop.

:class:`SerfAgent` writes the agent's files into ``<state_dir>`` (made 0700)::

    serf.json      the agent's config: node name, bind/advertise, RPC address and
                   auth key, profile, file paths  (0600, rewritten atomically at start)
    keyring.json   the gossip encryption keys     (0600, written once; the agent then
                   keeps it, so a key rotated over RPC survives a restart)
    tags.json      the node's tags                (written at start; the agent rewrites it
                   when tags change over RPC, so a crashed agent comes back with the
                   latest record)
    snapshot       the agent's snapshot: a restarted agent re-joins its previous members

Secrets (RPC auth key, gossip keys) are only ever in those files: the argv is
``serf agent -config-file <path>`` and the child environment holds only PATH.
The agent is supervised by :class:`meshd.process.ChildProcess`: it counts as
started once it answers an authenticated ``members`` over RPC; it is restarted
with backoff when it dies and stopped with SIGTERM (no graceful leave: a
restarting meshd is "failed" for a moment, not "left"; use ``SerfClient.leave``
to leave), SIGKILL after a second. A start that fails or is cancelled midway
stops the agent it started, and the agent dies with meshd. Its log lines are
forwarded to the ``meshd.gossip.supervisor.serf`` logger at the level serf
printed (``[DEBUG]``/``[INFO]``/``[WARN]``/``[ERR]``).

With ``netns="NAME"`` the agent runs under ``ip netns exec NAME`` and
:meth:`SerfAgent.client` returns a client that connects inside that namespace.

Public API::

    settings = SerfSettings(node_name=..., state_dir=..., bind_addr=..., rpc_auth_key=..., ...)
    agent = SerfAgent(settings, netns=None, on_restart=None)
    await agent.start()            # SupervisorError / ConfigError / SerfAuthError
    task = asyncio.create_task(agent.supervise())
    client = agent.client()        # a SerfClient for this agent (not yet connected)
    await agent.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshd.errors import ConfigError, DecodeError, SerfConnectionError, StateError
from meshd.gossip.rpc import SerfClient
from meshd.hostport import format_host_port, parse_ip_port
from meshd.process import ChildProcess, RestartHook, find_binary
from meshd.procnet import listens
from meshd.state import atomic_write, ensure_private_dir, write_secret

log = logging.getLogger(__name__)
serf_log = logging.getLogger(f"{__name__}.serf")

PROFILES = ("lan", "wan", "local")

_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERR": logging.ERROR,
    "ERROR": logging.ERROR,
}
_LINE_RE = re.compile(r"^\s*(?:\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(?:\.\d+)? )?\[([A-Z]+)\]\s?(.*)$")


def parse_log_line(line: str) -> tuple[int, str]:
    """The logging level and message of one line serf printed.

    ``    2026/01/01 10:00:00 [WARN] serf: ...`` gives (WARNING, "serf: ...");
    banner lines (``==> ...``) are INFO, the indented banner details DEBUG.
    """
    match = _LINE_RE.match(line)
    if match and match.group(1) in _LEVELS:
        return _LEVELS[match.group(1)], match.group(2)
    text = line.strip()
    if text.startswith("==>"):
        return logging.INFO, text[3:].strip()
    return logging.DEBUG, text


def _forward_line(line: str) -> None:
    level, message = parse_log_line(line)
    serf_log.log(level, "%s", message)


def _check_loopback(rpc_addr: str) -> None:
    try:
        loopback = parse_ip_port(rpc_addr)[0].is_loopback
    except DecodeError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"must be a loopback address and port (the RPC port must never face a network), "
            f"not {rpc_addr!r}",
            key="gossip.rpc_addr",
        )


@dataclass(frozen=True)
class SerfSettings:
    """What meshd tells its Serf agent. ``gossip_keys[0]`` is the primary key."""

    node_name: str
    state_dir: Path
    rpc_auth_key: str = field(repr=False)
    bind_addr: str = "0.0.0.0"
    bind_port: int = 7946
    advertise_addr: str | None = None
    rpc_addr: str = "127.0.0.1:7373"
    gossip_keys: tuple[str, ...] = field(default=(), repr=False)
    profile: str = "lan"
    tags: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "info"
    # Extra serf agent config keys (e.g. "reconnect_timeout"); never secrets.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_loopback(self.rpc_addr)
        if self.profile not in PROFILES:
            raise ConfigError(f"must be one of {', '.join(PROFILES)}", key="gossip.profile")
        if not self.rpc_auth_key:
            raise ConfigError("the Serf RPC port needs an auth key", key="gossip.rpc_auth_key")

    def agent_config(self, directory: Path) -> dict[str, Any]:
        """The serf agent's JSON configuration, with files under ``directory``."""
        config: dict[str, Any] = {
            "node_name": self.node_name,
            "bind": format_host_port(self.bind_addr, self.bind_port),
            "rpc_addr": self.rpc_addr,
            "rpc_auth": self.rpc_auth_key,
            "profile": self.profile,
            "snapshot_path": str(directory / "snapshot"),
            "tags_file": str(directory / "tags.json"),
            "log_level": self.log_level,
            # SIGTERM and SIGINT stop the agent without a leave: a restart is not a departure.
            "leave_on_terminate": False,
            "skip_leave_on_interrupt": True,
        }
        if self.advertise_addr:
            config["advertise"] = self.advertise_addr
        if self.gossip_keys:
            config["keyring_file"] = str(directory / "keyring.json")
        config.update(self.extra)
        return config


class SerfAgent:
    """One supervised ``serf agent``; see the module docstring."""

    def __init__(
        self,
        settings: SerfSettings,
        *,
        serf_binary: str = "serf",
        netns: str | None = None,
        on_restart: RestartHook | None = None,
        ready_timeout: float = 15.0,
        backoff_initial: float = 0.2,
    ) -> None:
        self.settings = settings
        self.netns = netns
        self.directory = Path(settings.state_dir)
        self.config_path = self.directory / "serf.json"
        self.keyring_path = self.directory / "keyring.json"
        self.tags_path = self.directory / "tags.json"
        self.snapshot_path = self.directory / "snapshot"
        self._on_restart = on_restart
        prefix: Sequence[str] = ("ip", "netns", "exec", netns) if netns else ()
        serf = find_binary(serf_binary)
        self._child = ChildProcess(
            f"serf-{settings.node_name}",
            [*prefix, serf, "agent", "-config-file", str(self.config_path)],
            on_line=_forward_line,
            ready=self._answers_rpc,
            ready_timeout=ready_timeout,
            on_restart=self._restarted,
            backoff_initial=backoff_initial,
        )

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def restarts(self) -> int:
        return self._child.restarts

    @property
    def deaths(self) -> int:
        """Times serf died on its own (a restart may still be on its way)."""
        return self._child.deaths

    @property
    def running(self) -> bool:
        return self._child.running

    def client(self, **options: Any) -> SerfClient:
        """A client for this agent's RPC port (in its namespace); call ``connect()`` on it.

        It sends the auth key only after checking that the port is served by this
        agent's own process (see :mod:`meshd.procnet`).
        """
        return SerfClient(
            self.settings.rpc_addr,
            auth_key=self.settings.rpc_auth_key,
            netns=self.netns,
            verify_server=self._serves_rpc,
            **options,
        )

    def _serves_rpc(self) -> bool:
        pid = self.pid
        host, _, port = self.settings.rpc_addr.rpartition(":")
        return pid is not None and listens(pid, host.strip("[]"), int(port))

    def _choose_rpc_port(self) -> None:
        """Keep the configured RPC port when it is free, else take a free one: a port
        squatted by someone else must not keep the agent from starting."""
        host, _, port = self.settings.rpc_addr.rpartition(":")
        bare = host.strip("[]")
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((bare, int(port)))
                return
            except OSError:
                probe.bind((bare, 0))
                free = probe.getsockname()[1]
        log.warning("Serf's RPC port %s is taken by another process; using port %d", port, free)
        self.settings = dataclasses.replace(self.settings, rpc_addr=f"{host}:{free}")

    def write_files(self) -> None:
        """Write serf.json and tags.json, and keyring.json when there is none yet."""
        ensure_private_dir(self.directory)
        config = self.settings.agent_config(self.directory)
        write_secret(self.config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        atomic_write(self.tags_path, json.dumps(dict(self.settings.tags), sort_keys=True) + "\n")
        if self.settings.gossip_keys and not self.keyring_path.exists():
            write_secret(self.keyring_path, json.dumps(list(self.settings.gossip_keys)) + "\n")
        elif self.keyring_path.exists() and self.keyring_path.stat().st_mode & 0o077:
            raise StateError(f"{self.keyring_path} is readable by others; run: chmod 600 it")

    async def start(self) -> None:
        """Write the files, start the agent and wait until it answers RPC."""
        if self.netns is None:  # a probe in another namespace would test the wrong port
            self._choose_rpc_port()
        self.write_files()
        try:
            await self._child.start()
        except BaseException:
            await self._child.stop()
            raise
        log.info(
            "serf agent %s started (pid %s), RPC %s",
            self.settings.node_name,
            self.pid,
            self.settings.rpc_addr,
        )

    async def supervise(self) -> None:
        """Restart the agent whenever it dies, until :meth:`stop`. Run as a task."""
        await self._child.supervise()

    async def stop(self) -> None:
        """Stop the agent (SIGTERM, then SIGKILL) and stop restarting it."""
        await self._child.stop()

    async def _answers_rpc(self) -> None:
        # Polls until the RPC port answers; a wrong auth key is raised at once. Often at
        # first: every join waits for this (serf answers ~100 ms after its start).
        delay = 0.02
        while True:
            client = self.client(stream=None, reconnect=False, timeout=5.0)
            try:
                await client.connect()
                await client.members()
                return
            except SerfConnectionError:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.2)
            finally:
                with contextlib.suppress(Exception):
                    await client.close()

    async def _restarted(self) -> None:
        log.info("serf agent %s restarted (pid %s)", self.settings.node_name, self.pid)
        if self._on_restart is not None:
            await self._on_restart()
