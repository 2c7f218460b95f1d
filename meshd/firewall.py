"""meshd's own nftables table: gossip reaches this node only through the mesh.

Serf binds the node's mesh address, but Linux accepts a packet for a local
address on any interface (the weak host model): a neighbour on the underlay
could route to the mesh address and talk to Serf directly, bypassing
WireGuard. The table ``inet meshd`` drops traffic to the gossip address's
gossip and goodbye ports unless it came in on the mesh interface (or loopback).

Only this table is touched: it is replaced as a whole in one ``nft``
transaction, and deleted when the agent stops. Everything is done through the
``nft`` command (Debian's ``nftables``); errors become
:class:`~meshd.errors.FirewallError`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Sequence

from meshd.errors import FirewallError
from meshd.types import IPAddress

log = logging.getLogger(__name__)

TABLE = "meshd"
NFT_TIMEOUT = 5.0


def gossip_ruleset(address: IPAddress, ports: Sequence[int], mesh_ifname: str) -> str:
    """The table, as ``nft -f`` input (replacing any earlier one atomically)."""
    family = "ip6" if address.version == 6 else "ip"
    port_set = ", ".join(str(p) for p in sorted(set(ports)))
    return (
        f"table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        "  chain gossip_only_through_the_mesh {\n"
        "    type filter hook input priority filter - 10; policy accept;\n"
        f'    iifname {{ "{mesh_ifname}", "lo" }} accept\n'
        f"    {family} daddr {address} meta l4proto {{ tcp, udp }} "
        f"th dport {{ {port_set} }} drop\n"
        "  }\n"
        "}\n"
    )


async def _nft(script: str) -> None:
    binary = shutil.which("nft")
    if binary is None:
        raise FirewallError("the nft command is not installed (Debian package nftables)")
    try:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "-f",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(NFT_TIMEOUT):
            _, err = await proc.communicate(script.encode())
    except (TimeoutError, OSError) as exc:
        raise FirewallError(f"nft failed: {exc or 'timed out'}") from exc
    if proc.returncode != 0:
        raise FirewallError(f"nft refused the rules: {err.decode(errors='replace').strip()}")


async def protect_gossip(address: IPAddress, ports: Sequence[int], mesh_ifname: str) -> None:
    """Install (or replace) the table for this gossip address."""
    await _nft(gossip_ruleset(address, ports, mesh_ifname))
    log.info("nftables: gossip to %s accepted only through %s", address, mesh_ifname)


async def remove() -> None:
    """Delete meshd's table (nothing else); no error when there is none."""
    await _nft(f"table inet {TABLE}\ndelete table inet {TABLE}\n")
