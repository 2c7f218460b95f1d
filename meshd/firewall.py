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
import json
import logging
import shutil
import subprocess
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


def _port_in(right: object, port: int) -> bool:
    """Whether an nft JSON match's right-hand side (a number, a range or a set) holds ``port``."""
    if isinstance(right, int):
        return right == port
    if isinstance(right, dict):
        if "range" in right:
            low, high = right["range"]
            return isinstance(low, int) and isinstance(high, int) and low <= port <= high
        if "set" in right:
            return any(_port_in(item, port) for item in right["set"])
    if isinstance(right, list):
        return any(_port_in(item, port) for item in right)
    return False


def dropping_rules(ruleset: object, protocol: str, port: int) -> list[str]:
    """The rules of ``nft -j list ruleset`` output that drop or reject ``protocol`` packets
    to ``port`` on their way in (input and prerouting hooks), each as
    ``"family table chain #handle"``. A rule with further conditions (an interface, a
    source) is listed too: it drops the port for somebody."""
    items = ruleset.get("nftables", []) if isinstance(ruleset, dict) else []
    inbound = {
        (c["family"], c["table"], c["name"])
        for item in items
        if isinstance(item, dict)
        and isinstance(c := item.get("chain"), dict)
        and c.get("hook") in ("input", "prerouting")
    }
    found = []
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        if (rule.get("family"), rule.get("table"), rule.get("chain")) not in inbound:
            continue
        exprs = [e for e in rule.get("expr", []) if isinstance(e, dict)]
        if not any("drop" in e or "reject" in e for e in exprs):
            continue
        for expr in exprs:
            match = expr.get("match")
            if not isinstance(match, dict) or match.get("op") not in ("==", "in"):
                continue
            payload = (
                match.get("left", {}).get("payload", {})
                if isinstance(match.get("left"), dict)
                else {}
            )
            if (
                payload.get("field") == "dport"
                and payload.get("protocol") in (protocol, "th", None)
                and _port_in(match.get("right"), port)
            ):
                found.append(
                    f"{rule['family']} {rule['table']} {rule['chain']} #{rule.get('handle', '?')}"
                )
                break
    return found


def list_ruleset() -> object:
    """The whole ruleset as ``nft -j list ruleset`` prints it (blocking; for the CLI)."""
    binary = shutil.which("nft")
    if binary is None:
        raise FirewallError("the nft command is not installed (Debian package nftables)")
    try:
        done = subprocess.run(
            [binary, "-j", "list", "ruleset"],
            capture_output=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"nft failed: {exc}") from exc
    if done.returncode != 0:
        raise FirewallError(f"nft cannot list the ruleset: {done.stderr.decode().strip()}")
    try:
        return json.loads(done.stdout)
    except ValueError as exc:
        raise FirewallError(f"nft printed no JSON: {exc}") from exc
