"""Chaos: how a meshd mesh comes through faults (issue 16). Figures, never pass/fail by time.

    .venv/bin/python bench/chaos.py [--nodes 12] [--short] [--runs partition,storm,...]

One flat lab of ``--nodes`` hosts, meshd agents on all (MeshLab.up; agents log at
debug, so Serf's own member events are in their logs), then these runs in order:

- partition: nftables rules in the hosts' namespaces (:mod:`meshd.lab.faults`) split
  the lab in two halves for ``--partition`` s (120): pairs inside each half still
  silent at its end; after the heal, seconds until every pair answers a ping through
  the mesh, and until every node lists every other alive again (Serf re-merged).
- one-way: the same, but only the second half stops hearing the first.
- storm: for ``--storm`` s (300), every ``--kill-every`` s (5) a random agent is
  SIGKILLed and started again. Afterwards: seconds to a full mesh, stale WireGuard
  peers (a key no current member has), leaked processes (anything in a namespace but
  one agent, its serf and its wireguard-go), interfaces that were not there before.
- power: every agent SIGKILLed at once, all but the first two (the CA and the first
  seed) started again: seconds to a full mesh of those; then the two, and again.
- disk: the last node's state directory on a 4 MiB tmpfs, filled up; a token revoked
  on the first node gossips a revocation that cannot be written there: pairs silent
  while it is full, the node's log lines about it, whether every state file parses,
  and the seconds from freeing the space until the revocation is on disk.
- lossy: ``tc netem`` 10 % loss and 100 ms delay on the underlay of a third of the
  hosts for ``--lossy`` s (120; on a kernel without netem: the same from a userspace
  delay line, :func:`meshd.lab.faults.delay`, and it says so, with what the lines
  passed and dropped), with bare ``serf agent``s (own ports) side by side on the
  same hosts: Serf "EventMemberFailed" events seen by meshd's serfs and by the bare
  ones in that window, and pairs silent at its end.

``--short`` makes every run short (partition 20 s, storm 30 s, lossy 30 s) for a smoke
run of a few minutes. The seed of the random choices is printed; ``--seed`` replays.
Needs root, ``serf``, ``wireguard-go``, ``wg``, ``nft``, ``tc`` and ``mount``. Traffic
goes only to the lab's own addresses. The lab's logs are copied to ``--keep-logs`` at
the end when a run found a problem.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from meshd.errors import LabError
from meshd.gossip.supervisor import SerfAgent, SerfSettings
from meshd.lab import Lab, faults
from meshd.lab.mesh import AGENT, MeshLab
from meshd.node import NodeStore
from meshd.pki.trust import Trust

RUNS = ("partition", "one-way", "storm", "power", "disk", "lossy")
SERF_PORT = 7947  # the bare serfs' ports: never meshd's own (7946, RPC 7373)
SERF_RPC = "127.0.0.1:7374"
MEMBER_FAILED = "EventMemberFailed"
LOSS_PERCENT = 10  # the lossy run's loss and delay (issue 16)
DELAY_MS = 100


def say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------- observing


def silent_pairs(mesh: MeshLab, nodes: Sequence[str], deadline: float = 2) -> set[tuple[str, str]]:
    """Pairs of ``nodes`` whose mesh ping gets no answer within ``deadline`` s."""
    only = {(a, b) for a in nodes for b in nodes if a != b}
    matrix = mesh.lab.ping_matrix(mesh.mesh_addresses(nodes), deadline=deadline, only=only)
    return {(p["src"], p["dst"]) for p in matrix["pairs"] if not p["reachable"]}


def seconds_to_full(
    mesh: MeshLab, nodes: Sequence[str], since: float, timeout: float
) -> float | None:
    missing, _ = mesh.wait_mesh(list(nodes), timeout=timeout)
    return None if missing else time.monotonic() - since


def gossip_whole(mesh: MeshLab, node: str, nodes: Sequence[str]) -> bool:
    found = mesh.status(node)
    if found is None:
        return False
    alive = {p["name"] for p in found["peers"] if p["gossip"] == "alive"}
    return alive >= set(nodes) - {node}


def seconds_until(
    check: Callable[[], bool], since: float, timeout: float, poll: float = 0.5
) -> float | None:
    while not check():
        if time.monotonic() - since > timeout:
            return None
        time.sleep(poll)
    return time.monotonic() - since


def fmt(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"


def fmt_ms(rtt: float | None) -> str:
    return "no answer" if rtt is None else f"{rtt:.1f} ms"


def log_offsets(mesh: MeshLab, nodes: Sequence[str]) -> dict[str, int]:
    return {n: mesh.lab.log_path(n, AGENT).stat().st_size for n in nodes}


def log_lines_since(mesh: MeshLab, node: str, offset: int) -> list[str]:
    with mesh.lab.log_path(node, AGENT).open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace").splitlines()


def count_since(mesh: MeshLab, offsets: dict[str, int], needle: str) -> int:
    return sum(
        needle in line for node, at in offsets.items() for line in log_lines_since(mesh, node, at)
    )


def public_keys(mesh: MeshLab, nodes: Sequence[str]) -> dict[str, str]:
    return {n: NodeStore(mesh.state_dir(n)).load().keys.public_key for n in nodes}


def stale_peers(mesh: MeshLab, node: str, keys: dict[str, str]) -> int:
    out = mesh.lab.run(node, ["wg", "show", mesh.lab.ifname(node, "mw"), "peers"]).stdout
    return len(set(out.split()) - set(keys.values()))


# ---------------------------------------------------------------- runs


def run_partition(mesh: MeshLab, nodes: list[str], hold: float, *, one_way: bool) -> dict[str, Any]:
    half = len(nodes) // 2
    first, second = nodes[:half], nodes[half:]
    kind = "one-way partition" if one_way else "partition"
    say(f"{kind}: {','.join(first)} | {','.join(second)} for {hold:g} s")
    faults.partition(mesh.lab, first, second, one_way=one_way)
    try:
        time.sleep(hold)  # the fault's length
        inside = len(silent_pairs(mesh, first)) + len(silent_pairs(mesh, second))
    finally:
        faults.heal(mesh.lab, nodes)
    healed = time.monotonic()
    pings = seconds_to_full(mesh, nodes, healed, timeout=60)
    merged = seconds_until(lambda: all(gossip_whole(mesh, n, nodes) for n in nodes), healed, 120)
    say(
        f"  {kind}: {inside} pairs silent inside the halves at the end; after the heal "
        f"every pair answers in {fmt(pings)}, every node lists all alive in {fmt(merged)}"
    )
    return {"inside_silent": inside, "heal_pings_s": pings, "heal_gossip_s": merged}


def run_storm(
    mesh: MeshLab, nodes: list[str], length: float, every: float, rng: random.Random
) -> dict[str, Any]:
    say(f"kill storm: a random agent SIGKILLed and restarted every {every:g} s for {length:g} s")
    keys = public_keys(mesh, nodes)
    links_before = {n: faults.interfaces(mesh.lab, n) for n in nodes}
    kills = 0
    started = time.monotonic()
    while time.monotonic() - started < length:
        victim = rng.choice(nodes)
        mesh.lab.kill(victim, AGENT, signal.SIGKILL)
        seconds_until(
            lambda v=victim: not faults.netns_processes(mesh.lab, v), time.monotonic(), 10, 0.05
        )
        mesh.start(victim)
        kills += 1
        time.sleep(every)  # the storm's rhythm
    for node in nodes:
        mesh.wait_ready(node, timeout=60)
    back = time.monotonic()
    full = seconds_to_full(mesh, nodes, back, timeout=60)
    stale = sum(stale_peers(mesh, n, keys) for n in nodes)
    leaked = {n: found for n in nodes if (found := faults.stray_processes(mesh.lab, n))}
    orphans = {n: sorted(faults.interfaces(mesh.lab, n) - links_before[n]) for n in nodes}
    orphans = {n: o for n, o in orphans.items() if o}
    say(
        f"  storm: {kills} kills; full mesh {fmt(full)} after every agent answered; "
        f"{stale} stale peers; leaked {leaked or 'nothing'}; new interfaces {orphans or 'none'}"
    )
    return {"kills": kills, "full_s": full, "stale": stale, "leaked": leaked, "orphans": orphans}


def run_power(mesh: MeshLab, nodes: list[str]) -> dict[str, Any]:
    down, rest = nodes[:2], nodes[2:]
    say(f"power loss: every agent SIGKILLed; {', '.join(down)} stay down at first")
    for node in nodes:
        mesh.lab.kill(node, AGENT, signal.SIGKILL)
    for node in nodes:
        seconds_until(
            lambda n=node: not faults.netns_processes(mesh.lab, n), time.monotonic(), 10, 0.05
        )
    started = time.monotonic()
    for node in rest:
        mesh.start(node)
    without = seconds_to_full(mesh, rest, started, timeout=120)
    started = time.monotonic()
    for node in down:
        mesh.start(node)
    everyone = seconds_to_full(mesh, nodes, started, timeout=120)
    say(
        f"  power loss: the other {len(rest)} in a full mesh {fmt(without)} after their start "
        f"(Python start-up included); with {', '.join(down)} back {fmt(everyone)} after theirs"
    )
    return {"without_first_two_s": without, "all_s": everyone}


def revocations_on_disk(state: Path) -> int:
    return len(Trust(NodeStore(state).load().ca_public_key, state).revoked)


def run_disk(mesh: MeshLab, nodes: list[str]) -> dict[str, Any]:
    node, ca = nodes[-1], nodes[0]
    lab = mesh.lab
    state = mesh.state_dir(node)
    copy = lab.node_dir(node) / "state-copy"
    say(f"disk full: {node}'s state directory on a 4 MiB tmpfs, filled up")
    mesh.stop(node)
    shutil.copytree(state, copy, symlinks=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(state)], check=True
    )
    try:
        subprocess.run(["cp", "-a", f"{copy}/.", str(state)], check=True)
        mesh.start(node)
        mesh.wait_ready(node)
        mesh.wait_mesh(nodes, timeout=60)
        filler = faults.fill_up(state)
        offset = lab.log_path(node, AGENT).stat().st_size
        token = lab.node_dir(ca) / "chaos-token"
        mesh.meshd(ca, "token", "create", "--ttl", "1h", "--out", str(token))
        mesh.meshd(ca, "token", "revoke", "--token-file", str(token))
        wanted = mesh.status(ca)["node"]["revocations"]  # type: ignore[index]
        since = time.monotonic()
        held = seconds_until(
            lambda: (mesh.status(node) or {"node": {}})["node"].get("revocations") == wanted,
            since,
            60,
        )
        time.sleep(20)  # what the full disk does over a few passes
        silent = len(silent_pairs(mesh, nodes))
        lines = [
            ln
            for ln in log_lines_since(mesh, node, offset)
            if "no space left" in ln.lower() and " DEBUG " not in ln
        ]
        problems = faults.state_problems(state)
        parses = f"no: {'; '.join(problems)}" if problems else "yes"
        filler.unlink(missing_ok=True)
        freed = time.monotonic()
        saved = seconds_until(lambda: revocations_on_disk(state) == wanted, freed, 120)
        say(
            f"  disk full: revocation in force on {node} {fmt(held)} after it was made; "
            f"{silent} pairs silent; {len(lines)} log lines (above DEBUG) about the full disk; "
            f"state parses: "
            f"{parses}; on disk {fmt(saved)} after space was freed"
        )
        for line in lines[:5]:
            say(f"    {line.strip()}")
        return {
            "held_s": held,
            "silent": silent,
            "log_lines": len(lines),
            "parses": parses,
            "saved_s": saved,
        }
    finally:
        mesh.stop(node)
        subprocess.run(["umount", str(state)], check=True)
        shutil.rmtree(state)
        shutil.copytree(copy, state, symlinks=True)
        mesh.start(node)
        mesh.wait_ready(node)


class FailedEvents(logging.Handler):
    """Counts the bare serfs' member-failed events (their lines come through logging)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if MEMBER_FAILED in record.getMessage():
            self.count += 1


def bare_serf(lab: Lab, name: str, seed: str | None, auth: str, key: str) -> SerfAgent:
    """A bare ``serf agent`` on the host's underlay address, joining ``seed``'s."""
    extra = {"start_join": [f"{lab.node(seed).address}:{SERF_PORT}"]} if seed else {}
    settings = SerfSettings(
        node_name=name,
        state_dir=lab.node_dir(name) / "bare-serf",
        rpc_auth_key=auth,
        bind_addr=lab.node(name).address,
        bind_port=SERF_PORT,
        rpc_addr=SERF_RPC,
        gossip_keys=(key,),
        extra=extra,
    )
    return SerfAgent(settings, netns=lab.node(name).netns)


async def lossy_window(
    mesh: MeshLab, nodes: list[str], lossy: list[str], length: float
) -> dict[str, Any]:
    """Bare serfs beside meshd's, netem on ``lossy`` for ``length`` s; failed events of
    each side in that window. The bare serfs' lines reach this process's logging while
    this loop runs (their forwarders are tasks of it)."""
    counter = FailedEvents()
    serf_log = logging.getLogger("meshd.gossip.supervisor.serf")
    serf_log.addHandler(counter)
    serf_log.setLevel(logging.INFO)
    serf_log.propagate = False
    auth = secrets.token_urlsafe(16)
    key = base64.b64encode(os.urandom(32)).decode()
    lab = mesh.lab
    agents = [
        bare_serf(lab, name, nodes[0] if i else None, auth, key) for i, name in enumerate(nodes)
    ]
    try:
        await agents[0].start()
        await asyncio.gather(*(a.start() for a in agents[1:]))
        await asyncio.sleep(5)  # one cluster before the window opens
        offsets = log_offsets(mesh, nodes)
        counter.count = 0
        how = f"tc netem {LOSS_PERCENT} % loss, {DELAY_MS} ms delay"
        delay_lines = False
        try:
            for node in lossy:
                await asyncio.to_thread(
                    faults.netem, lab, node, loss_percent=LOSS_PERCENT, delay_ms=DELAY_MS
                )
        except LabError as exc:
            if "unknown" not in str(exc):
                raise
            how = (
                f"userspace delay line {DELAY_MS} ms + {LOSS_PERCENT} % loss "
                "(this kernel has no netem)"
            )
            delay_lines = True
            for node in lossy:
                await asyncio.to_thread(
                    faults.delay, lab, node, delay_ms=DELAY_MS, loss_percent=LOSS_PERCENT
                )
        say(f"  lossy: {how} on {', '.join(lossy)}")
        # What was applied, seen from outside: a lossy host's underlay ping to a clean one.
        clean = next(n for n in nodes if n not in lossy)
        rtt = await asyncio.to_thread(lab.ping, lossy[0], lab.node(clean).address)
        say(f"  lossy: underlay ping {lossy[0]} -> {clean}: {fmt_ms(rtt)}")
        lines: dict[str, Any] = {}
        try:
            await asyncio.sleep(length)  # the window both sides are counted over
            bare_failed = counter.count
            meshd_failed = count_since(mesh, offsets, MEMBER_FAILED)
            silent = len(await asyncio.to_thread(silent_pairs, mesh, nodes, 3))
        finally:
            for node in lossy:
                if delay_lines:
                    stats = await asyncio.to_thread(faults.clear_delay, lab, node)
                    lines[node] = None if stats is None else asdict(stats)
                else:
                    faults.clear_netem(lab, node)
            faults.heal(lab, lossy)
        if delay_lines:
            say(f"  lossy: delay lines {delay_line_summary(lines)}")
    finally:
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
        serf_log.removeHandler(counter)
    return {
        "how": how,
        "meshd_failed": meshd_failed,
        "bare_failed": bare_failed,
        "silent": silent,
        "delay_lines": lines,
    }


def delay_line_summary(lines: dict[str, Any]) -> str:
    """What the delay lines did, summed: passed, dropped (share), CPU; any that died."""
    died = sorted(node for node, stats in lines.items() if stats is None)
    passed = sum(s["passed"] for s in lines.values() if s)
    dropped = sum(s["dropped"] for s in lines.values() if s)
    share = 100 * dropped / (passed + dropped) if passed + dropped else 0.0
    cpu = sum(s["cpu_s"] for s in lines.values() if s)
    summary = f"passed {passed} packets, dropped {dropped} ({share:.1f} %), {cpu:.1f} CPU s in all"
    return summary + (f"; DIED before the end on {', '.join(died)}" if died else "")


def run_lossy(mesh: MeshLab, nodes: list[str], length: float, rng: random.Random) -> dict[str, Any]:
    lossy = sorted(rng.sample(nodes, max(1, len(nodes) // 3)))
    say(f"lossy links on {', '.join(lossy)} for {length:g} s")
    found = asyncio.run(lossy_window(mesh, nodes, lossy, length))
    say(
        f"  lossy: member-failed events in the window, meshd's serfs {found['meshd_failed']}, "
        f"bare serfs {found['bare_failed']}; {found['silent']} pairs silent (3 s ping) at the end"
    )
    return {"lossy": lossy, **found}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=12, help="lab hosts (default 12)")
    parser.add_argument("--short", action="store_true", help="short runs, for a smoke run")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"some of {','.join(RUNS)}")
    parser.add_argument("--partition", type=float, default=None, help="partition length (s)")
    parser.add_argument("--storm", type=float, default=None, help="kill storm length (s)")
    parser.add_argument("--kill-every", type=float, default=5.0, help="between kills (s)")
    parser.add_argument("--lossy", type=float, default=None, help="lossy window (s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures here")
    parser.add_argument(
        "--keep-logs", default="/tmp/meshd-bench-chaos", help="logs go here on a problem"
    )
    args = parser.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    if unknown := set(runs) - set(RUNS):
        parser.error(f"--runs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(RUNS)}")
    if args.nodes < 4:
        parser.error("--nodes must be at least 4")
    partition = args.partition or (20.0 if args.short else 120.0)
    storm = args.storm or (30.0 if args.short else 300.0)
    lossy = args.lossy or (30.0 if args.short else 120.0)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    logging.basicConfig(level=logging.ERROR)
    say(
        f"chaos benchmark: {args.nodes} nodes, runs {','.join(runs)}, seed {seed}; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    started = time.monotonic()
    results: dict[str, Any] = {}
    lab = Lab.create(nodes=args.nodes)
    try:
        mesh = MeshLab(lab, log_level="debug")
        nodes = [n.name for n in lab.nodes]
        mesh.up(nodes, seed=seed)
        formed = mesh.wait_full_mesh(nodes, timeout=120)
        say(f"mesh of {len(nodes)} formed ({formed:.1f} s to ping fully after the last start)")
        for run in runs:
            if run in ("partition", "one-way"):
                results[run] = run_partition(mesh, nodes, partition, one_way=run == "one-way")
            elif run == "storm":
                results[run] = run_storm(mesh, nodes, storm, args.kill_every, rng)
            elif run == "power":
                results[run] = run_power(mesh, nodes)
            elif run == "disk":
                results[run] = run_disk(mesh, nodes)
            elif run == "lossy":
                results[run] = run_lossy(mesh, nodes, lossy, rng)
            say(f"  (load average {os.getloadavg()[0]:.2f})")
    finally:
        keep = Path(args.keep_logs) / lab.lab_id
        if (lab.dir / "logs").is_dir():
            shutil.copytree(lab.dir / "logs", keep, dirs_exist_ok=True)
        lab.down()
    say(f"total {time.monotonic() - started:.0f} s; agent logs kept in {keep}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "seed": seed, "results": results}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
