"""``meshd doctor``: checks this machine's node and explains each problem with a fix.

Every check ends as ``ok``, ``warn`` or ``FAIL`` with one line of detail and,
unless ok, one line saying what to do. The doctor asks the agent over the
control socket (``status`` and ``doctor``, see :mod:`meshd.agent.diagnosis`);
when the agent is down it says so and still checks what needs no agent: the
state files, the certificate, the ports the agent will need, and what a crashed
agent left behind.

The checks, in order:

    agent         the control socket answers
    wireguard     backend, interface and UDP port (held by us; free for us when down)
    enrolment     the TCP port answers on this node's endpoint address, and no
                  nftables rule drops it
    serf          the Serf child runs, has not died since the agent started, joined
    members       no member failed, every member certified
    clock         skew against each live member, from the time in its record
    certificate   this node's certificate is neither expired nor expiring (14 days)
    nat           the NAT type and public endpoint this node publishes
    mtu           the mesh MTU plus WireGuard's overhead fits the path to each peer: a
                  full-size echo with "don't fragment", then the route's (learnt) MTU
    state files   secrets 0600, the state directory 0700, nothing others can write
    stale         no interface, wireguard-go or UAPI socket left by a crashed agent

Judgements are pure functions of the facts (``judge_*``), unit-tested; the
probes that gather the facts read /proc, /sys, ``ip`` and ``nft``. The exit
code is 0 when every check is ok, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from meshd import control, firewall, procnet
from meshd.b64 import decode_b64
from meshd.config import Config
from meshd.errors import DecodeError, FirewallError, MeshdError
from meshd.hostport import parse_host_port
from meshd.invocation import CliState
from meshd.node import NodeStore
from meshd.pki.certificate import CLOCK_SKEW, CertChain
from meshd.pki.trust import EXPIRY_WARNING

OK, WARN, FAIL = "ok", "warn", "FAIL"

# WireGuard's per-packet overhead on the underlay: IP header + UDP 8 + WireGuard 32.
WIREGUARD_OVERHEAD = {4: 20 + 8 + 32, 6: 40 + 8 + 32}
# A peer's clock this far off (beyond what the measurement can tell) is worth a warning;
# past CLOCK_SKEW, certificates it signs are refused.
CLOCK_WARN = 30.0
CONNECT_TIMEOUT = 2.0
# Full-size echo probes of the path MTU: at most this many peers, each waited for this long.
MAX_PROBES = 16
PROBE_WAIT = 1
SECRET_FILES = ("wireguard.key", "gossip.key", "ca.key", "join-token", "serf/keyring.json")
WIREGUARD_RUN_DIR = Path("/var/run/wireguard")


@dataclass(frozen=True)
class Check:
    """One check's verdict: ``status`` is ok, warn or FAIL; ``fix`` says what to do."""

    name: str
    status: str
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


# --- judgements (pure) ----------------------------------------------------------


def judge_certificate(not_after: int, now: float) -> Check:
    left = not_after - now
    days = abs(left) / 86400
    fix = (
        "rotate it: meshd key rotate-wireguard --token-file TOKEN "
        "(a token from the CA machine: meshd token create)"
    )
    if left <= 0:
        return Check("certificate", FAIL, f"expired {days:.1f} days ago: peers refuse it", fix)
    if left < EXPIRY_WARNING:
        return Check("certificate", WARN, f"expires in {days:.1f} days", fix)
    return Check("certificate", OK, f"valid for {days:.0f} more days")


def judge_serf(serf: Mapping[str, Any], members: int) -> Check:
    if not serf.get("running"):
        return Check(
            "serf",
            FAIL,
            "the Serf agent is not running: no gossip, no new members",
            "the agent restarts it with back-off; if it keeps dying, read the agent's log "
            "(journalctl -u meshd)",
        )
    died = int(serf.get("died", serf.get("restarts", 0)))
    if died:
        return Check(
            "serf",
            WARN,
            f"running (pid {serf.get('pid')}), but it died {died} time(s) since the agent started",
            "read why in the agent's log (journalctl -u meshd | grep serf); "
            "restart the agent to clear this",
        )
    if members and not serf.get("joined"):
        return Check(
            "serf",
            FAIL,
            f"running (pid {serf.get('pid')}) but joined no other member",
            "check the tunnels to the other members (meshd status: handshakes) "
            "and the mtu and enrolment checks",
        )
    return Check("serf", OK, f"running (pid {serf.get('pid')}), joined")


def judge_members(members: Sequence[Mapping[str, Any]]) -> Check:
    failed = sorted(m["name"] for m in members if m.get("state") == "failed")
    uncertified = sorted(
        f"{m['name']} ({m.get('certificate_error') or 'no certificate yet'})"
        for m in members
        if m.get("state") == "alive" and not m.get("certified")
    )
    if failed:
        return Check(
            "members",
            WARN,
            f"failed (unreachable): {', '.join(failed)}",
            "run 'meshd doctor' on them; a machine gone for good: 'meshd revoke NAME' "
            "on the CA machine (docs/operations.md)",
        )
    if uncertified:
        return Check(
            "members",
            WARN,
            f"not admitted: {', '.join(uncertified)}",
            "a member whose certificate does not verify gets no tunnel; "
            "re-join it with a fresh token",
        )
    alive = sum(1 for m in members if m.get("state") == "alive")
    return Check("members", OK, f"{alive} other member(s) alive, none failed")


def clock_skews(
    members: Sequence[Mapping[str, Any]], now: float, max_age: float
) -> dict[str, float]:
    """Each live member's clock skew that its record proves (seconds, + ahead).

    A record's version is its publisher's clock (ms) when published, and a live
    member republishes within ``max_age``: a version ahead of ``now`` is a clock
    ahead by that much; one older than ``max_age`` is a clock behind by the
    excess. Within that window nothing is proven: 0.
    """
    skews = {}
    for member in members:
        version = member.get("record_version")
        # Older meshd counted versions from 1: no time in them.
        if member.get("state") != "alive" or not isinstance(version, int) or version < 10**12:
            continue
        published = version / 1000
        if published > now:
            skews[member["name"]] = published - now
        elif now - published > max_age:
            skews[member["name"]] = -(now - published - max_age)
        else:
            skews[member["name"]] = 0.0
    return skews


def judge_clock(skews: Mapping[str, float], max_age: float) -> Check:
    if not skews:
        return Check("clock", OK, "no live member to compare with")
    name, worst = max(skews.items(), key=lambda item: abs(item[1]))
    way = "ahead of" if worst > 0 else "behind"
    fix = "run NTP on every machine (systemd-timesyncd or chrony) and check 'timedatectl'"
    if abs(worst) > CLOCK_SKEW:
        return Check(
            "clock",
            FAIL,
            f"{name}'s clock is at least {abs(worst):.0f} s {way} ours: certificates "
            f"are refused past {CLOCK_SKEW} s",
            fix,
        )
    if abs(worst) > CLOCK_WARN:
        return Check(
            "clock", WARN, f"{name}'s clock is at least {abs(worst):.0f} s {way} ours", fix
        )
    return Check(
        "clock",
        OK,
        f"{len(skews)} member(s) within {CLOCK_WARN:.0f} s "
        f"(from their record times: ahead to the second, behind to {max_age:.0f} s)",
    )


def judge_nat(nat: str | None, endpoints: Sequence[str]) -> Check:
    shown = ", ".join(endpoints) or "none"
    if not endpoints:
        return Check(
            "nat",
            WARN,
            "this node publishes no endpoint: only it can start tunnels",
            "set an endpoint (meshd join --endpoint HOST:PORT) or enable the NAT plugin",
        )
    if nat in ("symmetric", "unknown"):
        return Check(
            "nat",
            WARN,
            f"NAT type {nat}: peers behind NAT reach this node through a relay; endpoints {shown}",
            "forward the WireGuard UDP port to this machine, or give it a public address "
            "(docs/nat.md)",
        )
    kind = f"NAT type {nat}" if nat else "no NAT type published (NAT plugin off or undecided)"
    return Check("nat", OK, f"{kind}; endpoints {shown}")


def judge_mtu(mtu: int, paths: Mapping[str, tuple[int, int]]) -> Check:
    """``paths``: peer endpoint -> (IP version, underlay MTU of its route)."""
    if not paths:
        return Check("mtu", OK, f"mesh MTU {mtu}; no peer endpoint to check a path to")
    too_small = {
        endpoint: (version, path_mtu)
        for endpoint, (version, path_mtu) in paths.items()
        if mtu + WIREGUARD_OVERHEAD[version] > path_mtu
    }
    if too_small:
        fitting = min(path - WIREGUARD_OVERHEAD[v] for v, path in too_small.values())
        shown = ", ".join(f"{e} (path {p})" for e, (_, p) in sorted(too_small.items()))
        return Check(
            "mtu",
            WARN,
            f"mesh MTU {mtu} plus WireGuard's overhead does not fit the route to {shown}: "
            "large packets are dropped",
            f"set [wireguard] mtu = {fitting} in the config and restart the agent",
        )
    smallest = min(path for _, path in paths.values())
    return Check("mtu", OK, f"mesh MTU {mtu} fits every path (smallest {smallest})")


def judge_permissions(
    state_dir: Path, modes: Mapping[str, int], euid: int, owners: Mapping[str, int]
) -> Check:
    """``modes``: path relative to the state dir ("." itself) -> st_mode; ``owners`` -> uid."""
    problems, fixes = [], []
    dir_mode = modes.get(".")
    if dir_mode is not None and dir_mode & 0o077:
        problems.append(f"{state_dir} is {stat.S_IMODE(dir_mode):o}")
        fixes.append(f"chmod 700 {state_dir}")
    for name, mode in sorted(modes.items()):
        if name == "." or stat.S_ISSOCK(mode):
            continue
        path = state_dir / name
        if name in SECRET_FILES and mode & 0o077:
            problems.append(f"secret {name} is {stat.S_IMODE(mode):o}")
            fixes.append(f"chmod 600 {path}")
        elif mode & 0o002:
            problems.append(f"{name} is writable by anyone")
            fixes.append(f"chmod o-w {path}")
    strangers = sorted(n for n, uid in owners.items() if uid != euid)
    if strangers:
        problems.append(f"owned by another user: {', '.join(strangers)}")
        fixes.append(f"chown -R {euid} {state_dir}")
    if problems:
        return Check(
            "state files",
            FAIL,
            "; ".join(problems),
            "; ".join(fixes) + " (and rotate a secret others could read: docs/operations.md)",
        )
    return Check("state files", OK, f"{state_dir}: secrets 0600, directory 0700")


# --- probes ---------------------------------------------------------------------


def port_holders(protocol: str, port: int) -> list[str]:
    """Who holds local ``port`` in this network namespace: "name (pid N)" or "the kernel"."""
    holders: list[str] = []
    for inode in procnet.port_inodes(protocol, port):
        owners = procnet.socket_owners(inode) if inode else []
        holders.extend(f"{name} (pid {pid})" for pid, name in owners)
        if not owners:
            holders.append("the kernel (a WireGuard interface?)")
    return sorted(set(holders))


def state_modes(state_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    modes: dict[str, int] = {}
    owners: dict[str, int] = {}
    try:
        info = state_dir.stat()
    except OSError:
        return modes, owners
    modes["."], owners["."] = info.st_mode, info.st_uid
    for path in state_dir.rglob("*"):
        with contextlib.suppress(OSError):
            info = path.lstat()
            name = str(path.relative_to(state_dir))
            modes[name], owners[name] = info.st_mode, info.st_uid
    return modes, owners


def connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> str:
    """ "open", "refused" or "no answer" for a TCP connection to ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "no answer"


def route_mtu(address: str) -> tuple[int, int] | None:
    """(IP version, MTU) of the route to ``address``: a learnt path MTU, else the link's."""
    try:
        done = subprocess.run(
            ["ip", "-j", "route", "get", address], capture_output=True, timeout=5, check=False
        )
        routes = json.loads(done.stdout) if done.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    if not routes:
        return None
    route = routes[0]
    version = 6 if ":" in address else 4
    for metric in route.get("metrics", []):
        if isinstance(metric, dict) and "mtu" in metric:
            return version, int(metric["mtu"])
    try:
        return version, int(Path(f"/sys/class/net/{route['dev']}/mtu").read_text())
    except (OSError, KeyError, ValueError):
        return None


def _uapi_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _orphan_wireguard_go(ifname: str) -> list[int]:
    """wireguard-go processes for ``ifname`` whose parent is gone (adopted by init)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if argv and argv[0].endswith(b"wireguard-go") and ifname.encode() in argv and ppid == 1:
            found.append(int(entry))
    return found


# --- the checks -----------------------------------------------------------------


def _ask(state_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str]:
    try:
        status = control.call(state_dir, "status", timeout=10)
        facts = control.call(state_dir, "doctor", timeout=10)
    except control.ControlError as exc:
        return None, None, str(exc)
    return status, facts, ""


def check_wireguard(config: Config, facts: Mapping[str, Any] | None) -> Check:
    port = config.wireguard.port
    holders = port_holders("udp", port)
    if facts is None:
        if holders:
            return Check(
                "wireguard",
                FAIL,
                f"UDP port {port} is taken by {', '.join(holders)}: the agent cannot start",
                "stop that program (or a stale wireguard-go: see the stale check), "
                "or set [wireguard] port to a free port",
            )
        return Check("wireguard", OK, f"UDP port {port} is free for the agent")
    iface = facts["interface"]
    if iface.get("error"):
        return Check(
            "wireguard",
            FAIL,
            f"{iface['backend']} interface {iface['name']}: {iface['error']}",
            "restart the agent (systemctl restart meshd); the log says why the device failed",
        )
    if iface.get("listen_port") != port:
        return Check(
            "wireguard",
            FAIL,
            f"{iface['name']} listens on UDP {iface.get('listen_port')}, not on the "
            f"configured {port}: peers send to the wrong port",
            "restart the agent so it applies the configured port",
        )
    if not holders:
        return Check(
            "wireguard",
            FAIL,
            f"nothing holds UDP port {port} although {iface['name']} reports it",
            "restart the agent (systemctl restart meshd)",
        )
    return Check(
        "wireguard",
        OK,
        f"{iface['backend']} interface {iface['name']}, UDP {port} ({', '.join(holders)})",
    )


def _own_host(status: Mapping[str, Any] | None) -> str:
    if status:
        for endpoint in status["node"].get("endpoints", []):
            with contextlib.suppress(DecodeError):
                return parse_host_port(endpoint)[0]
    return "127.0.0.1"


def check_enrolment(config: Config, status: Mapping[str, Any] | None) -> Check:
    port = config.enrol.port
    if not config.enrol.enabled:
        return Check("enrolment", OK, "disabled here ([enrol] enabled = false)")
    try:
        drops = firewall.dropping_rules(firewall.list_ruleset(), "tcp", port)
    except FirewallError as exc:
        drops, nft_error = [], str(exc)
    else:
        nft_error = ""
    table = drops[0].split()[:2] if drops else []
    drop_fix = (
        f"remove the rule (nft -a list table {' '.join(table)}; nft delete rule ... handle N) "
        f"or accept tcp dport {port} before it: new machines join through this port"
    )
    if status is None:
        holders = port_holders("tcp", port)
        if holders:
            return Check(
                "enrolment",
                FAIL,
                f"TCP port {port} is taken by {', '.join(holders)}: the agent cannot serve it",
                "stop that program, or set [enrol] port to a free port",
            )
        if drops:
            return Check(
                "enrolment", FAIL, f"TCP {port} dropped by nftables: {'; '.join(drops)}", drop_fix
            )
        return Check("enrolment", OK, f"TCP port {port} is free for the agent")
    host = _own_host(status)
    answer = connect(host, port)
    if drops:
        return Check(
            "enrolment",
            FAIL,
            f"TCP {port} dropped by nftables: {'; '.join(drops)} (from here: {answer})",
            drop_fix,
        )
    if answer != "open":
        return Check(
            "enrolment",
            FAIL,
            f"TCP {host}:{port}: {answer}"
            + (" (a firewall drops it)" if answer == "no answer" else "")
            + (f"; {nft_error}" if nft_error else ""),
            f"let TCP port {port} in (firewall), or restart the agent if nothing listens",
        )
    return Check("enrolment", OK, f"TCP {host}:{port} answers")


def probe_full_size(hosts: Sequence[str], mtu: int) -> set[str]:
    """The hosts that answer an echo as large as WireGuard's biggest packet with
    "don't fragment" set, all probed at once (one try, ``PROBE_WAIT`` s). A router on
    the path that cannot carry it answers "fragmentation needed", which the kernel
    keeps as the route's path MTU: :func:`route_mtu` reads it afterwards."""
    probes = {}
    for host in hosts[:MAX_PROBES]:
        version = 6 if ":" in host else 4
        # The echo's IP packet is as large as a full WireGuard datagram to this host.
        payload = mtu + WIREGUARD_OVERHEAD[version] - (48 if version == 6 else 28)
        argv = ["ping", f"-{version}", "-M", "do", "-c", "1", "-W", str(PROBE_WAIT)]
        with contextlib.suppress(OSError):
            probes[host] = subprocess.Popen(
                [*argv, "-s", str(payload), host],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    answered = set()
    for host, probe in probes.items():
        try:
            if probe.wait(timeout=PROBE_WAIT + 1) == 0:
                answered.add(host)
        except subprocess.TimeoutExpired:
            probe.kill()
            probe.wait()
    return answered


def check_mtu(config: Config, status: Mapping[str, Any] | None) -> Check:
    endpoints: dict[str, str] = {}
    for row in (status or {}).get("peers", []):
        with contextlib.suppress(DecodeError, TypeError):
            endpoints[row["endpoint"]] = parse_host_port(row["endpoint"])[0]
    answered = probe_full_size(sorted(set(endpoints.values())), config.wireguard.mtu)
    paths: dict[str, tuple[int, int]] = {}
    for endpoint, host in endpoints.items():
        found = route_mtu(host)
        if found is not None:
            paths[endpoint] = found
    check = judge_mtu(config.wireguard.mtu, paths)
    if check.ok and endpoints:
        probed = f"{len(answered)} of {len(endpoints)} answered a full-size echo"
        return dataclasses.replace(check, detail=f"{check.detail}; {probed}")
    return check


def check_stale(config: Config, agent_up: bool) -> Check:
    ifname = config.wireguard.interface
    problems, fixes = [], []
    if not agent_up and Path(f"/sys/class/net/{ifname}").exists():
        problems.append(f"interface {ifname} exists with no agent running")
        fixes.append(f"ip link del {ifname}")
    if agent_up and not Path(f"/sys/class/net/{ifname}").exists():
        problems.append(f"the agent runs but interface {ifname} is missing")
        fixes.append("restart the agent")
    orphans = _orphan_wireguard_go(ifname)
    if orphans:
        problems.append(f"wireguard-go for {ifname} outlived its agent (pid {orphans})")
        fixes.append(f"kill {' '.join(map(str, orphans))}")
    uapi = WIREGUARD_RUN_DIR / f"{ifname}.sock"
    if uapi.exists() and not _uapi_answers(uapi):
        problems.append(f"{uapi} answers nobody")
        fixes.append(f"rm {uapi}")
    if problems:
        return Check("stale", FAIL, "; ".join(problems), "; ".join(fixes))
    return Check("stale", OK, "nothing left over by a crashed agent")


def run_checks(config: Config) -> list[Check]:
    state_dir = config.state_dir
    store = NodeStore(state_dir)
    checks: list[Check] = []
    if not store.exists():
        return [
            Check(
                "state files",
                FAIL,
                f"{state_dir} holds no node",
                "meshd init (first machine) or meshd join SEED --token-file TOKEN",
            )
        ]
    status, facts, why = _ask(state_dir)
    if status is None or facts is None:
        checks.append(
            Check(
                "agent",
                FAIL,
                why,
                "systemctl start meshd (or meshd agent); the log says why it stopped: "
                "journalctl -u meshd -e",
            )
        )
    else:
        checks.append(Check("agent", OK, f"answers on {control.socket_path(state_dir)}"))
    checks.append(check_wireguard(config, facts))
    checks.append(check_enrolment(config, status))
    if status is not None and facts is not None:
        checks.append(judge_serf(facts["serf"], len(facts["members"])))
        checks.append(judge_members(facts["members"]))
        skews = clock_skews(facts["members"], facts["now"], facts["record_max_age"])
        checks.append(judge_clock(skews, facts["record_max_age"]))
    checks.append(_check_certificate(store))
    if status is not None:
        node = status["node"]
        checks.append(judge_nat(node.get("nat"), node.get("endpoints", [])))
        checks.append(check_mtu(config, status))
    modes, owners = state_modes(state_dir)
    checks.append(judge_permissions(state_dir, modes, os.geteuid(), owners))
    checks.append(check_stale(config, status is not None))
    return checks


def _check_certificate(store: NodeStore) -> Check:
    try:
        chain = json.loads(store.path("node.json").read_text())["chain"]
        not_after = CertChain.decode(decode_b64(chain)).node.not_after
    except (OSError, ValueError, KeyError, TypeError, MeshdError) as exc:
        return Check(
            "certificate",
            FAIL,
            f"cannot read this node's certificate from {store.path('node.json')}: {exc}",
            "restore node.json from a backup, or join again",
        )
    return judge_certificate(not_after, time.time())


def render(checks: Iterable[Check]) -> str:
    from tabulate import tabulate

    checks = list(checks)
    table = tabulate(
        [[c.name, c.status, c.detail] for c in checks], headers=["CHECK", "STATUS", "DETAIL"]
    )
    fixes = [f"  {c.name}: {c.fix}" for c in checks if not c.ok and c.fix]
    bad = sum(1 for c in checks if not c.ok)
    summary = "nothing wrong" if not bad else f"{bad} problem(s); how to fix:"
    return "\n".join([table, "", summary, *fixes])


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def doctor(state: CliState, as_json: bool) -> None:
    """Check this node and explain every problem with a fix.

    Asks the agent when it runs; when it is down, says so and checks the state
    files and the ports it needs. Exit code 0 when every check is ok, 1 otherwise.
    """
    checks = run_checks(state.config)
    healthy = all(c.ok for c in checks)
    if as_json:
        click.echo(json.dumps({"ok": healthy, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        click.echo(render(checks))
    if not healthy:
        raise click.exceptions.Exit(1)
