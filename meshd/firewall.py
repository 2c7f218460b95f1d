"""meshd's own nftables tables: gossip only through the mesh; a gateway's forwarding.

Serf binds the node's mesh address, but Linux accepts a packet for a local
address on any interface (the weak host model): a neighbour on the underlay
could route to the mesh address and talk to Serf directly, bypassing
WireGuard. The table ``inet meshd`` drops traffic to the gossip address's
gossip and goodbye ports unless it came in on the mesh interface (or loopback).

A gateway (a node that routes to prefixes outside the mesh) gets a second table,
``inet meshd-gateway`` (:class:`Forwarding`): masquerading of mesh traffic leaving
for those prefixes, unless the gateway keeps source addresses; IP forwarding is
switched on with it, and the sysctls are put back as they were when it goes.

Only these tables are touched: each is replaced as a whole in one ``nft``
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
from pathlib import Path

from meshd.errors import FirewallError
from meshd.state import atomic_write
from meshd.types import IPAddress, IPNetwork

log = logging.getLogger(__name__)

TABLE = "meshd"
GATEWAY_TABLE = "meshd-gateway"
FORWARDING_FILE = "forwarding-sysctls.json"
"""In the state directory: the forwarding sysctls' values before meshd changed them."""
FORWARDING_SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")
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
    await _remove_table(TABLE)


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


def gateway_ruleset(mesh_ifname: str, masquerade: Sequence[IPNetwork]) -> str:
    """The gateway table: mesh traffic to ``masquerade`` prefixes leaves with this node's
    address (the hosts there need no route back into the mesh)."""
    rules = []
    for family in ("ip", "ip6"):
        nets = ", ".join(str(n) for n in masquerade if (n.version == 6) == (family == "ip6"))
        if nets:
            rules.append(
                f'    iifname "{mesh_ifname}" oifname != "{mesh_ifname}" '
                f"{family} daddr {{ {nets} }} masquerade\n"
            )
    return (
        f"table inet {GATEWAY_TABLE}\n"
        f"delete table inet {GATEWAY_TABLE}\n"
        f"table inet {GATEWAY_TABLE} {{\n"
        "  chain masquerade_mesh_traffic {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n" + "".join(rules) + "  }\n"
        "}\n"
    )


class Forwarding:
    """IP forwarding and the gateway table of one agent: on while it routes for others.

    The sysctls' values before the first change are kept, and written back by
    :meth:`stop` (a node that was already forwarding stays so). They are kept in
    ``saved_path`` too, before anything changes: an agent that crashed while
    forwarding finds them at its next start and still restores the first values.
    """

    def __init__(
        self, mesh_ifname: str, saved_path: Path, proc_sys: Path = Path("/proc/sys")
    ) -> None:
        self._ifname = mesh_ifname
        self._proc_sys = proc_sys
        self._saved_path = saved_path
        self._saved: dict[str, str] = self._load_saved()
        self._applied: tuple[bool, tuple[IPNetwork, ...]] | None = None

    def _load_saved(self) -> dict[str, str]:
        try:
            data = json.loads(self._saved_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self._saved_path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: str(v) for k, v in data.items() if k in FORWARDING_SYSCTLS}

    async def apply(self, enabled: bool, masquerade: Sequence[IPNetwork]) -> None:
        """Forward (and masquerade to ``masquerade``) when ``enabled``; else undo it all."""
        wanted = (enabled, tuple(masquerade) if enabled else ())
        if wanted == self._applied:
            return
        self._applied = None  # unknown until done
        if not enabled:
            await self.stop()
            self._applied = wanted
            return
        for name in FORWARDING_SYSCTLS:
            self._set(name, "1")
        if wanted[1]:
            await _nft(gateway_ruleset(self._ifname, wanted[1]))
        else:
            await _remove_table(GATEWAY_TABLE)
        self._applied = wanted
        log.info(
            "forwarding on%s",
            f", masquerading to {', '.join(map(str, wanted[1]))}" if wanted[1] else "",
        )

    def _set(self, name: str, value: str) -> None:
        path = self._proc_sys / name
        try:
            current = path.read_text().strip()
            if name not in self._saved:
                self._saved[name] = current
                atomic_write(self._saved_path, json.dumps(self._saved))
            if current != value:
                path.write_text(value + "\n")
        except OSError as exc:
            raise FirewallError(f"cannot set {name.replace('/', '.')}: {exc}") from exc

    async def stop(self) -> None:
        """Remove the gateway table and put the sysctls back; nothing when never applied."""
        if not self._saved and self._applied is None:
            return
        for name, value in list(self._saved.items()):
            try:
                (self._proc_sys / name).write_text(value + "\n")
            except OSError as exc:
                log.warning("cannot restore %s: %s", name.replace("/", "."), exc)
            del self._saved[name]
        self._saved_path.unlink(missing_ok=True)
        await _remove_table(GATEWAY_TABLE)
        self._applied = None


async def _remove_table(name: str) -> None:
    await _nft(f"table inet {name}\ndelete table inet {name}\n")
