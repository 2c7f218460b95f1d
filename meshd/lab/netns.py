"""Network namespaces through the ``ip`` and ``nft`` commands.

The lab's one adapter to iproute2 and nftables: every failure becomes a
LabError that names the command and what it printed. Commands, not netlink,
because the lab must work exactly as an admin would type it (and a reader can
replay any step by hand).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from meshd.errors import LabError
from meshd.netns import NETNS_DIR

log = logging.getLogger(__name__)

NETNS_RUN_DIR = Path(NETNS_DIR)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("not root: the lab creates network namespaces; run it as root (sudo)")


def require_binaries(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise LabError(
            f"missing program(s): {', '.join(missing)} "
            "(Debian packages: iproute2, nftables, iputils-ping)"
        )


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = 30,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its text output; LabError if it cannot run (or fails, with check)."""
    try:
        done = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} not found: {exc.strerror}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout:g} s") from exc
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise LabError(
            f"{' '.join(argv)} failed (exit {done.returncode})"
            + (f": {detail[-1]}" if detail else "")
        )
    return done


def exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside ``netns``."""
    return ["ip", "netns", "exec", netns, *argv]


def start(
    netns: str, argv: Sequence[str], *, log_file: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the background inside ``netns``, output appended to ``log_file``."""
    try:
        with open(log_file, "ab") as out:
            return subprocess.Popen(
                exec_argv(netns, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env),
                # Its own session: a Ctrl-C meant for the caller does not reach it.
                start_new_session=True,
            )
    except OSError as exc:
        raise LabError(f"cannot start {argv[0]} in {netns}: {exc.strerror}") from exc


def list_netns() -> list[str]:
    """Names of all named network namespaces on this machine."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LabError(f"cannot list {NETNS_RUN_DIR}: {exc.strerror}") from exc


def add_netns(name: str) -> None:
    run(["ip", "netns", "add", name])


def delete_netns(name: str) -> None:
    """Delete a namespace; a missing one is fine (down is idempotent)."""
    done = run(["ip", "netns", "delete", name], check=False)
    if done.returncode != 0 and name in list_netns():
        raise LabError(f"cannot delete namespace {name}: {done.stderr.strip()}")


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name``."""
    done = run(["ip", "netns", "pids", name], check=False)
    if done.returncode != 0:
        return []
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def ip_batch(netns: str, commands: Sequence[str]) -> None:
    """Run several ``ip`` commands inside ``netns`` in one process."""
    if commands:
        run(["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n")


def set_sysctl(netns: str, key: str, value: str) -> None:
    run(exec_argv(netns, ["sysctl", "-q", "-w", f"{key}={value}"]))


def load_nft(netns: str, ruleset: str) -> None:
    """Load an nftables ruleset (the text of an ``nft -f`` file) inside ``netns``."""
    run(exec_argv(netns, ["nft", "-f", "-"]), input=ruleset)
