"""Taking a lab down: its processes, namespaces, stale WireGuard sockets and files.

Works from the lab's id alone (names are derived from it, see
:mod:`meshd.lab.plan`), so it also cleans up after a crashed ``up``. A process is
identified by its pid *and* the kernel's start time recorded when it was spawned,
so a reused pid is never killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshd.errors import LabError
from meshd.lab import netns
from meshd.lab.plan import netns_prefix

log = logging.getLogger(__name__)

STATE_FILE = "lab.json"
STOP_TIMEOUT = 5.0
WIREGUARD_SOCKET_DIR = Path("/var/run/wireguard")


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot); None if gone or a zombie.

    Recorded with each spawned pid, so a later ``down`` never kills an
    unrelated process that happens to reuse the number.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, start: int | None = None) -> bool:
    now = process_start_time(pid)
    return now is not None and (start is None or now == start)


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read lab state {path}: {exc}") from exc
    if not isinstance(data, dict) or "plan" not in data:
        raise LabError(f"{path} is not a lab state file")
    data.setdefault("processes", [])
    return data


def lab_namespaces(lab_id: str) -> list[str]:
    prefix = netns_prefix(lab_id)
    return [name for name in netns.list_netns() if name.startswith(prefix)]


def teardown(lab_id: str, directory: Path, children: Mapping[int, subprocess.Popen[bytes]]) -> bool:
    netns.require_root()
    namespaces = lab_namespaces(lab_id)
    state = None
    with contextlib.suppress(LabError):
        state = read_state(directory / STATE_FILE)
    if not namespaces and state is None and not directory.exists():
        return False
    log.info("taking down lab %s", lab_id)
    # Processes first: a namespace lives on while a process is inside it.
    victims: dict[int, int | None] = {}
    for proc in (state or {}).get("processes", []):
        if alive(proc["pid"], proc.get("start")):
            victims[proc["pid"]] = proc.get("start")
    for name in namespaces:
        for pid in netns.netns_pids(name):
            victims.setdefault(pid, process_start_time(pid))
    victims.pop(os.getpid(), None)
    _stop_processes(victims, children)
    for name in reversed(namespaces):  # hosts before routers before the switch
        netns.delete_netns(name)
    left = lab_namespaces(lab_id)
    if left:
        raise LabError(f"lab {lab_id}: namespaces still present after down: {', '.join(left)}")
    _remove_stale_wireguard_sockets(lab_id)
    shutil.rmtree(directory, ignore_errors=True)
    return True


def _stop_processes(
    victims: Mapping[int, int | None], children: Mapping[int, subprocess.Popen[bytes]]
) -> None:
    def signal_all(sig: int) -> None:
        for pid, start in victims.items():
            if alive(pid, start):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def wait_all(seconds: float) -> bool:
        end = time.monotonic() + seconds
        while True:
            for child in children.values():
                child.poll()  # reaps our own children, which would linger as zombies
            if not any(alive(pid, start) for pid, start in victims.items()):
                return True
            if time.monotonic() > end:
                return False
            time.sleep(0.05)

    if not victims:
        return
    signal_all(signal.SIGTERM)
    if not wait_all(STOP_TIMEOUT):
        log.warning("lab processes ignored SIGTERM for %g s; killing them", STOP_TIMEOUT)
        signal_all(signal.SIGKILL)
        if not wait_all(STOP_TIMEOUT):
            left = [str(pid) for pid, start in victims.items() if alive(pid, start)]
            raise LabError(f"lab processes survived SIGKILL: {', '.join(left)}")


def _remove_stale_wireguard_sockets(lab_id: str) -> None:
    """Remove control sockets of killed wireguard-go processes of this lab.

    Only sockets nobody answers on: a live one may belong to a lab whose id
    merely ends like ours.
    """
    pattern = re.compile(rf"[a-z]{{1,4}}{re.escape(lab_id)}n\d+\.sock")
    with contextlib.suppress(OSError):
        for path in WIREGUARD_SOCKET_DIR.iterdir():
            if not pattern.fullmatch(path.name):
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                except ConnectionRefusedError:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
