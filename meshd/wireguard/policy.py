"""Default routes through the mesh (an exit node), by policy routing as ``wg-quick`` does.

A plain default route into the mesh interface would also capture WireGuard's own
UDP packets to its peers' endpoints, and replace the machine's own default route.
Instead, when a peer's allowed IPs hold ``0.0.0.0/0`` (or ``::/0``):

- the device marks its own packets with :data:`EXIT_FWMARK`;
- table :data:`EXIT_TABLE` holds one route, ``default dev <mesh interface>``;
- rule ``not fwmark EXIT_FWMARK lookup EXIT_TABLE`` sends every other packet there,
  after rule ``lookup main suppress_prefixlength 0``: the main table still decides
  for everything but its default route (the LAN, the mesh range, the underlay).

So WireGuard's own packets keep the main table, default route included, and the
machine's default route is never touched. Everything is removed when the default
route is no longer wanted, and when the interface closes. Done with the ``ip``
command (iproute2); errors become :class:`~meshd.errors.NetlinkError`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil

from meshd.errors import NetlinkError

log = logging.getLogger(__name__)

EXIT_FWMARK = 0x6D65  # "me"
EXIT_TABLE = 0x6D65
SUPPRESS_PRIORITY = 30_800
EXIT_PRIORITY = 30_801
IP_TIMEOUT = 5.0


async def _ip(netns: str | None, *args: str, check: bool = True) -> str:
    binary = shutil.which("ip")
    if binary is None:
        raise NetlinkError("the ip command is not installed (Debian package iproute2)")
    argv = [binary, *(("-n", netns) if netns else ()), *args]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(IP_TIMEOUT):
            out, err = await proc.communicate()
    except (TimeoutError, OSError) as exc:
        raise NetlinkError(f"{' '.join(args)}: {exc or 'timed out'}") from exc
    if check and proc.returncode != 0:
        raise NetlinkError(f"ip {' '.join(args)}: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


async def _rule_present(netns: str | None, family: str, priority: int) -> bool:
    return bool((await _ip(netns, family, "rule", "show", "priority", str(priority))).strip())


async def route_default(netns: str | None, ifname: str, version: int) -> None:
    """Send this family's traffic without a more specific route into ``ifname``."""
    family = f"-{version}"
    await _ip(
        netns, family, "route", "replace", "default", "dev", ifname,
        "table", str(EXIT_TABLE), "proto", "109",
    )  # fmt: skip
    if not await _rule_present(netns, family, SUPPRESS_PRIORITY):
        await _ip(
            netns, family, "rule", "add", "table", "main", "suppress_prefixlength", "0",
            "priority", str(SUPPRESS_PRIORITY),
        )  # fmt: skip
    if not await _rule_present(netns, family, EXIT_PRIORITY):
        await _ip(
            netns, family, "rule", "add", "not", "fwmark", str(EXIT_FWMARK),
            "table", str(EXIT_TABLE), "priority", str(EXIT_PRIORITY),
        )  # fmt: skip
    log.info("%s: IPv%d default route through the mesh (policy routing)", ifname, version)


async def unroute_default(netns: str | None, version: int) -> None:
    """Remove what :func:`route_default` made for this family; absent parts are fine."""
    family = f"-{version}"
    for priority in (EXIT_PRIORITY, SUPPRESS_PRIORITY):
        while await _rule_present(netns, family, priority):
            await _ip(netns, family, "rule", "del", "priority", str(priority))
    await _ip(netns, family, "route", "flush", "table", str(EXIT_TABLE), check=False)
