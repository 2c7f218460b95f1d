"""Split DNS through systemd-resolved: the zone's names go to this node's responder.

``resolvectl dns IFACE ADDRESS...`` and ``resolvectl domain IFACE ~ZONE`` on the mesh
interface: the host's resolver sends queries under the zone (and only those, ``~``
makes it a routing-only domain) to the responder on the node's own mesh address.
``resolvectl revert IFACE`` undoes both when the agent stops (the interface going
away would drop them too).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from meshd import IPAddress, format_host_port

log = logging.getLogger(__name__)

RESOLVED_RUNTIME = Path("/run/systemd/resolve")


def resolved_running() -> bool:
    """Whether systemd-resolved runs here and ``resolvectl`` can talk to it."""
    return RESOLVED_RUNTIME.is_dir() and shutil.which("resolvectl") is not None


def split_dns_commands(
    interface: str, addresses: Sequence[IPAddress], zone: str, port: int
) -> list[list[str]]:
    """The ``resolvectl`` calls that route ``zone`` to ``addresses`` on ``interface``."""
    servers = [str(a) if port == 53 else format_host_port(str(a), port) for a in addresses]
    return [
        ["resolvectl", "dns", interface, *servers],
        ["resolvectl", "domain", interface, f"~{zone}"],
    ]


async def _run(argv: list[str]) -> bool:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await process.communicate()
    if process.returncode != 0:
        log.warning("%s failed: %s", " ".join(argv), err.decode(errors="replace").strip())
        return False
    return True


async def set_split_dns(
    interface: str, addresses: Sequence[IPAddress], zone: str, port: int
) -> bool:
    """Route ``zone`` to this node's responder; True when resolved took it."""
    for argv in split_dns_commands(interface, addresses, zone, port):
        if not await _run(argv):
            return False
    log.info("systemd-resolved sends %s to %s on %s", zone, addresses[0], interface)
    return True
