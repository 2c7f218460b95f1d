"""What ``meshd doctor`` asks of a running agent: facts only, judged by :mod:`meshd.doctor`.

The control command ``doctor`` answers with what only the agent knows and
``status`` does not carry: its Serf child (pid, running, restarts), the live
interface's port, and every member's gossip state and record version.

A record's version is its publisher's wall clock in milliseconds at the time it
was published (:meth:`meshd.agent.presence.Presence.record`), and an agent
republishes at least every ``republish_interval(N)`` (its loop notices within
``HEARD_RECHECK`` plus half a resync interval). That is what the doctor measures clock skew with: a
version ahead of our clock means the peer's clock is ahead by at least that
much; one older than the republish interval means it is behind by at least the
excess. ``now`` is the agent's clock when it answers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshd.agent.presence import HEARD_RECHECK, RESYNC_INTERVAL, republish_interval
from meshd.agent.runtime import Runtime
from meshd.desired import current_incarnations
from meshd.errors import MeshdError
from meshd.types import Member


def record_max_age(members: int) -> float:
    """How old a live member's record may be before its clock is suspect, in seconds.
    Each node sizes its heartbeat by the mesh it sees: twice ours leaves room for a
    member that sees more."""
    return republish_interval(2 * members) + HEARD_RECHECK + RESYNC_INTERVAL


class Diagnosis:
    """The agent's side of ``meshd doctor``."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def report(self, request: Mapping[str, Any]) -> dict[str, Any]:
        rt = self._rt
        listen_port: int | None = None
        device_error = None
        try:
            listen_port = (await rt.iface.state()).listen_port
        except MeshdError as exc:
            device_error = str(exc)
        serf: dict[str, Any] = {"running": False, "pid": None, "restarts": 0, "died": 0}
        if rt.has_gossip:
            agent = rt.gossip.serf
            running = agent.running and agent.pid is not None and _process_alive(agent.pid)
            # "died" counts at once; "restarts" only once the new Serf answers (a loaded
            # lab's doctor, run in between, saw a new pid and 0 restarts and said ok).
            serf = {
                "running": running,
                "pid": agent.pid,
                "restarts": agent.restarts,
                "died": agent.deaths,
            }
        serf["joined"] = rt.joined.is_set()
        # Versions from the live view: a heartbeat runs no pass, so the snapshot's lag.
        live = rt.gossip.view.members if rt.has_gossip else {}
        members = [
            {
                "name": m.name,
                "state": m.state.value,
                "certified": m.certified,
                "certificate_error": m.certificate_error,
                "record_version": _version(live.get(m.serf_name, m)),
            }
            for m in sorted(current_incarnations(rt.snapshot.others(rt.name)), key=lambda m: m.name)
        ]
        return {
            "now": time.time(),
            "record_max_age": record_max_age(len(members) + 1),
            "interface": {
                "name": rt.iface.ifname,
                "backend": rt.iface.backend_name,
                "configured_port": rt.config.wireguard.port,
                "listen_port": listen_port,
                "error": device_error,
                "mtu": rt.config.wireguard.mtu,
            },
            "enrol": {"enabled": rt.config.enrol.enabled, "port": rt.config.enrol.port},
            "serf": serf,
            "members": members,
        }


def _version(member: Member) -> int | None:
    return member.record.version if member.record else None


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a child killed a moment ago is a zombie until the event loop
    reaps it, and until then it still counted as running (a loaded lab's doctor said ok
    right after Serf was killed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])
