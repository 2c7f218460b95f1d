"""Join -> full connectivity of a new meshd node, beside bare Serf's join (issues #5, #10).

    .venv/bin/python bench/mesh_join.py --sizes 10,30,40 --reps 3 [--json out.json]

For each size N, one lab of N-1+reps hosts is built and used twice, one side after
the other so they never share the CPU:

- serf (baseline): bare ``serf agent``s (meshd's SerfAgent, no meshd, no
  WireGuard) on the underlay addresses of the first N-1 hosts, joined together;
  then, one at a time, a fresh host's agent is started with ``start_join`` to a
  random one of them and timed from its process start until every other agent
  lists it alive (each observed by polling ``members`` over its RPC port). The
  joiner leaves again before the next one comes.
- meshd: ``meshd init``/``join`` + agents on the same N-1 hosts (MeshLab.up),
  checked to ping each other; then, one at a time, a fresh host runs ``meshd join
  --foreground`` through a random earlier host: the join command becomes the agent
  in the same process, as the default detached start does (it forks), so one
  Python start-up serves both. Timed from the start of the join command until the
  new node has an echo reply from every other node's mesh address and every other
  node one from the new node's (through WireGuard); "command" is when the join
  stored the node (its ``node.json``), and the agent starts right after. Each
  joiner but the last runs ``meshd leave`` before the next one comes. The part
  after the first echo reply of any pair (the new node's record travelling by
  gossip, the handshakes with everyone) is reported on its own: it is what the
  serf figure compares with, without the Python start-up before it.

Ratio = meshd median / serf median. After the last join, with N meshd nodes in a
full mesh, it waits ``--settle`` s, then reads the resident memory (VmRSS) of every
``meshd agent`` and of its children (serf, wireguard-go) separately, and the CPU
(the scheduler's nanosecond count, /proc/<pid>/task/*/schedstat) each used over
``--idle`` seconds, as % of one core; medians over the N nodes. Then it counts the
serf overload warnings (``Query queue depth``, ``reply for non-running query``) in
every agent log of the lab: the whole run, forming the mesh included. The report
ends with one table (a row per N) and a check of issue 10's targets.

Probes are echo requests sent and read by this process through one raw ICMP
socket per lab host (opened inside its namespace), not a ``ping`` process per
probe: spawning hundreds of processes would take CPU from the very agents being
timed. Traffic goes only to the lab's own addresses. Needs root, ``serf``,
``wireguard-go`` and ``ip``. When a join does not converge, the lab's logs are
copied to ``--keep-logs`` before the lab is taken down.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import compileall
import contextlib
import ctypes
import json
import logging
import os
import random
import secrets
import selectors
import shutil
import socket
import statistics
import struct
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from meshd.errors import MeshdError
from meshd.gossip.rpc import SerfClient
from meshd.gossip.supervisor import SerfAgent, SerfSettings
from meshd.lab import Lab
from meshd.lab.mesh import AGENT, MeshLab

# The baseline's serf agents use their own ports, so they can never meet meshd's own
# serf (mesh address :7946, RPC 127.0.0.1:7373) in the same namespace.
SERF_PORT = 7947
SERF_RPC = "127.0.0.1:7374"
CLONE_NEWNET = 0x40000000
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
KINDS = ("agent", "serf", "wireguard-go")
# Serf warnings that mean the gossip is overloaded (issue 10 wants none during a run).
# The agent forwards every serf line into its own log.
LOG_MARKS = {
    "query_queue_depth": "Query queue depth",
    "non_running_query": "reply for non-running query",
}
# Issue 10's targets, checked at the end of the report.
TARGET_RATIO = 2.5
TARGET_AFTER_RATIO = 1.5
TARGET_RSS_MIB = 40.0
TARGET_IDLE_CPU = 0.5
TARGET_N = 30

Pair = tuple[str, str]


def say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------- probing


def raw_icmp_socket(netns: str) -> socket.socket:
    """A raw ICMP socket inside ``netns``; a socket stays in the namespace it was made in."""
    made: list[socket.socket | BaseException] = []

    def enter_and_open() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
        except BaseException as exc:
            made.append(exc)

    # A throwaway thread: it ends inside the namespace, so nothing else runs there.
    thread = threading.Thread(target=enter_and_open, name=f"icmp-{netns}", daemon=True)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    payload = b"meshd-bench"
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    checksum = icmp_checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, checksum, ident, seq) + payload


class Prober:
    """Echo requests from inside each lab host, all sent and read by this process."""

    def __init__(self, lab: Lab) -> None:
        self._selector = selectors.DefaultSelector()
        self._sockets: dict[str, socket.socket] = {}
        self._ident = 0
        self._seq = 0
        try:
            for node in lab.nodes:
                sock = raw_icmp_socket(node.netns)
                sock.setblocking(False)
                self._sockets[node.name] = sock
                self._selector.register(sock, selectors.EVENT_READ, node.name)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._selector.close()
        for sock in self._sockets.values():
            sock.close()

    def _send(self, src: str, address: str) -> None:
        self._seq = (self._seq + 1) & 0xFFFF
        # No route yet (the joiner before its interface exists) or a full queue:
        # that probe is lost, the next round sends another.
        with contextlib.suppress(OSError):
            self._sockets[src].sendto(echo_request(self._ident, self._seq), (address, 0))

    def _replies(self, sock: socket.socket) -> Iterator[str]:
        """Source addresses of echo replies to this round's probes waiting on ``sock``."""
        while True:
            try:
                data, (address, _) = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            start = (data[0] & 0x0F) * 4  # a raw IPv4 socket hands over the IP header too
            if len(data) < start + 8:
                continue
            kind, _, _, ident, _ = struct.unpack_from("!BBHHH", data, start)
            if kind == ICMP_ECHO_REPLY and ident == self._ident:
                yield address

    def wait(
        self,
        pairs: Iterable[Pair],
        addresses: Mapping[str, str],
        *,
        start: float,
        timeout: float,
        interval: float,
    ) -> tuple[dict[Pair, float], set[Pair]]:
        """Probe every unanswered (src, dst) pair each ``interval`` s until all answered.

        Returns (ms from ``start`` to each pair's first reply, pairs that did not
        answer within ``timeout`` s).
        """
        pending = set(pairs)
        answered: dict[Pair, float] = {}
        names = {address: name for name, address in addresses.items()}
        # A new identifier per call: a late reply to an earlier round never counts.
        self._ident = self._ident % 0xFFFF + 1
        end = time.monotonic() + timeout
        next_round = time.monotonic()
        while pending:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_round:
                for src, dst in sorted(pending):
                    self._send(src, addresses[dst])
                next_round = now + interval
            for key, _ in self._selector.select(max(0.0, min(next_round, end) - now)):
                src = key.data
                for address in self._replies(key.fileobj):  # type: ignore[arg-type]
                    pair = (src, names.get(address, ""))
                    if pair in pending:
                        pending.discard(pair)
                        answered[pair] = (time.monotonic() - start) * 1000
        return answered, pending


def both_ways(node: str, others: Iterable[str]) -> set[Pair]:
    return {p for other in others for p in ((node, other), (other, node))}


# ---------------------------------------------------------------- serf baseline


async def serf_baseline(
    lab: Lab,
    base: Sequence[str],
    joiners: Sequence[tuple[str, str]],
    *,
    poll: float,
    timeout: float,
) -> list[float | None]:
    """ms from each joiner's ``serf agent`` start until every base agent lists it alive."""
    auth = secrets.token_urlsafe(16)
    gossip_key = base64.b64encode(os.urandom(32)).decode()

    def serf_on(name: str, join_via: str | None) -> SerfAgent:
        node = lab.node(name)
        extra = {"start_join": [f"{lab.node(join_via).address}:{SERF_PORT}"]} if join_via else {}
        settings = SerfSettings(
            node_name=name,
            state_dir=lab.node_dir(name) / "bench-serf",
            rpc_auth_key=auth,
            bind_addr=node.address,
            bind_port=SERF_PORT,
            rpc_addr=SERF_RPC,
            gossip_keys=(gossip_key,),
            extra=extra,
        )
        return SerfAgent(settings, netns=node.netns)

    agents: list[SerfAgent] = []
    clients: dict[str, SerfClient] = {}
    results: list[float | None] = []
    try:
        agents.append(serf_on(base[0], None))
        await agents[0].start()
        rest = [serf_on(name, base[0]) for name in base[1:]]
        agents += rest
        await asyncio.gather(*(agent.start() for agent in rest))
        for name in base:
            client = SerfClient(
                SERF_RPC, auth_key=auth, netns=lab.node(name).netns, stream=None, reconnect=False
            )
            await client.connect()
            clients[name] = client
        await form(clients, base, lab, poll=poll, timeout=timeout)
        for joiner, seed in joiners:
            agent = serf_on(joiner, seed)
            agents.append(agent)
            start = time.monotonic()
            # Watching from before the start: the first polls simply do not find it.
            watch = asyncio.create_task(all_list(clients, {joiner}, "alive", start, poll, timeout))
            await agent.start()
            results.append(await watch)
            leaver = agent.client(stream=None, reconnect=False)
            with contextlib.suppress(MeshdError):
                await leaver.connect()
                await leaver.leave()
            await leaver.close()
            await agent.stop()
            # The next joiner meets a cluster that has digested this one's leave.
            await all_list(clients, {joiner}, "left", time.monotonic(), poll, timeout)
        return results
    finally:
        for client in clients.values():
            await client.close()
        await asyncio.gather(*(agent.stop() for agent in agents), return_exceptions=True)


async def form(
    clients: Mapping[str, SerfClient], base: Sequence[str], lab: Lab, *, poll: float, timeout: float
) -> None:
    """Until every base agent lists every other alive. Half-way, an agent that still
    misses some joins three random members again: 38 agents joining one at once
    sometimes leave one out for longer than a push/pull round (seen at N=40), which is
    the cluster's start, not the join being measured."""
    everyone = set(base)
    for attempt in (1, 2):
        if await all_list(clients, everyone, "alive", time.monotonic(), poll, timeout / 2):
            return
        views = {name: await clients[name].members() for name in base}
        lacking = {
            name: sorted(everyone - {m.name for m in members if m.status == "alive"})
            for name, members in views.items()
        }
        lacking = {name: missing for name, missing in lacking.items() if missing}
        shown = "; ".join(f"{n} lacks {', '.join(m[:5])}" for n, m in sorted(lacking.items())[:5])
        print(f"  serf cluster not formed after {timeout / 2 * attempt:g} s: {shown}", flush=True)
        for name in lacking:
            targets = random.sample([b for b in base if b != name], 3)
            with contextlib.suppress(MeshdError):
                await clients[name].join([f"{lab.node(t).address}:{SERF_PORT}" for t in targets])
    raise SystemExit(f"the serf baseline cluster of {len(base)} never formed")


async def all_list(
    clients: Mapping[str, SerfClient],
    names: set[str],
    status: str,
    start: float,
    poll: float,
    timeout: float,
) -> float | None:
    """ms from ``start`` until every client lists all ``names`` with ``status``; None: timeout."""
    waiting = sorted(clients)
    last = start
    while waiting:
        if time.monotonic() - start > timeout:
            return None
        answers = await asyncio.gather(*(clients[o].members() for o in waiting))
        now = time.monotonic()
        done = {
            observer
            for observer, members in zip(waiting, answers, strict=True)
            if names <= {m.name for m in members if m.status == status}
        }
        if done:
            last = now
            waiting = [o for o in waiting if o not in done]
        if waiting:
            await asyncio.sleep(poll)
    return (last - start) * 1000


# ---------------------------------------------------------------- resources


def proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def proc_comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def cpu_seconds(pid: int) -> float:
    """CPU time the process's threads ran, from the scheduler's own clock.

    /proc/<pid>/schedstat counts in nanoseconds; utime+stime in /proc/<pid>/stat come in
    10 ms ticks charged by sampling, and an idle agent uses about 9 of them in 30 s, so
    one tick more or less read as 11 % of growth. Threads that ended meanwhile are not
    counted (an idle agent, serf and wireguard-go keep theirs)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def agent_processes(lab: Lab, nodes: Iterable[str]) -> dict[tuple[str, str], int]:
    """(node, kind) -> pid for each node's meshd agent, its serf and its wireguard-go."""
    wanted = set(nodes)
    children = proc_children()
    found: dict[tuple[str, str], int] = {}
    for proc in lab.processes():
        if proc["name"] != AGENT or not proc["alive"] or proc["node"] not in wanted:
            continue
        found[(proc["node"], "agent")] = proc["pid"]
        for child in children.get(proc["pid"], []):
            with contextlib.suppress(OSError):
                comm = proc_comm(child)
                if comm in KINDS:
                    found[(proc["node"], comm)] = child
    return found


def measure_idle(lab: Lab, nodes: Sequence[str], seconds: float) -> dict[str, Any]:
    """RSS (KiB) and CPU over ``seconds`` (% of one core) per kind, one value per node."""
    procs = agent_processes(lab, nodes)
    before = {key: cpu_seconds(pid) for key, pid in procs.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    rss: dict[str, list[int]] = {kind: [] for kind in KINDS}
    cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for (node, kind), pid in sorted(procs.items()):
        try:
            used = cpu_seconds(pid) - before[(node, kind)]
            rss[kind].append(rss_kib(pid))
        except OSError:
            say(f"  {kind} of {node} (pid {pid}) ended during the idle measurement")
            continue
        cpu[kind].append(100 * used / elapsed)
    return {"rss_kib": rss, "idle_cpu_pct": cpu, "idle_seconds": elapsed}


def count_log_marks(lab: Lab) -> dict[str, dict[str, int]]:
    """mark -> {node: lines containing it} over every agent log of the lab (the whole run)."""
    counts: dict[str, dict[str, int]] = {mark: {} for mark in LOG_MARKS}
    for node in lab.nodes:
        path = lab.log_path(node.name, AGENT)
        if not path.exists():
            continue
        with path.open(errors="replace") as log_file:
            for line in log_file:
                for mark, text in LOG_MARKS.items():
                    if text in line:
                        counts[mark][node.name] = counts[mark].get(node.name, 0) + 1
    return counts


# ---------------------------------------------------------------- meshd side


def wait_address(mesh: MeshLab, node: str, node_file: Path, deadline: float) -> Any:
    """The joiner's mesh address once its join has stored the node, or None (the
    join failed: its process ended, or the deadline passed)."""
    while time.monotonic() < deadline:
        if node_file.exists():
            with contextlib.suppress(MeshdError, OSError, ValueError, KeyError):
                return mesh.mesh_address(node)
        elif not mesh.running(node):
            return None
        time.sleep(0.01)
    return None


def meshd_joins(
    lab: Lab,
    prober: Prober,
    base: Sequence[str],
    joiners: Sequence[tuple[str, str]],
    args: argparse.Namespace,
    rng: random.Random,
) -> tuple[list[dict[str, Any]], list[str]]:
    """One record per join (ms from the join command's start), and the problems seen.

    A record: ``command_ms`` (``meshd join`` returned), ``first_ms`` (the first echo
    reply of any pair), ``out_ms`` (the new node reached every other), ``in_ms``
    (every other reached it), ``full_ms`` (both; None when it never came).
    """
    mesh = MeshLab(lab, log_level=args.log_level)
    problems: list[str] = []
    mesh.up(base, seed=rng.randrange(2**32))
    addresses = mesh.mesh_addresses(base)
    pairs = {(a, b) for a in base for b in base if a != b}
    _, missing = prober.wait(
        pairs, addresses, start=time.monotonic(), timeout=args.timeout, interval=args.interval
    )
    if missing:
        raise SystemExit(f"the meshd base mesh never formed; missing {sorted(missing)[:10]}")
    joins: list[dict[str, Any]] = []
    for index, (joiner, seed) in enumerate(joiners):
        record: dict[str, Any] = {"joiner": joiner, "seed": seed, "full_ms": None}
        joins.append(record)
        start = time.monotonic()
        wall_start = time.time()
        node_file = mesh.state_dir(joiner) / "node.json"
        mesh.join_and_run(joiner, seed)
        address = wait_address(mesh, joiner, node_file, start + args.timeout)
        if address is None:
            problems.append(f"meshd join on {joiner} via {seed} wrote no node within the timeout")
            with contextlib.suppress(MeshdError):
                mesh.stop(joiner)
            continue
        # The join's end: when it stored the node (the agent starts right after, in-process).
        record["command_ms"] = (node_file.stat().st_mtime - wall_start) * 1000
        addresses[joiner] = address
        answered, missing = prober.wait(
            both_ways(joiner, base),
            addresses,
            start=start,
            timeout=args.timeout,
            interval=args.interval,
        )
        outbound = [ms for (src, _), ms in answered.items() if src == joiner]
        inbound = [ms for (_, dst), ms in answered.items() if dst == joiner]
        record["first_ms"] = min(answered.values(), default=None)
        record["out_ms"] = max(outbound) if len(outbound) == len(base) else None
        record["in_ms"] = max(inbound) if len(inbound) == len(base) else None
        if missing:
            gaps = ", ".join(f"{a}->{b}" for a, b in sorted(missing))
            problems.append(
                f"{joiner} (via {seed}) not fully connected after {args.timeout:g} s: {gaps}"
            )
        else:
            record["full_ms"] = max(answered.values())
            # What Serf's own figure compares with: the record travelling, the handshakes.
            record["after_ms"] = record["full_ms"] - record["first_ms"]
        if index < len(joiners) - 1:
            mesh.meshd(joiner, "leave", check=False, timeout=30)
            with contextlib.suppress(MeshdError):
                mesh.stop(joiner)
            del addresses[joiner]
            time.sleep(args.settle)  # let the others drop the leaver before the next join
    return joins, problems


def run_size(size: int, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    hosts = size - 1 + args.reps
    with Lab.create(nodes=hosts) as lab:
        names = [node.name for node in lab.nodes]
        base = names[: size - 1]
        joiners = [(name, rng.choice(base)) for name in names[size - 1 :]]
        say(f"N={size}: lab {lab.lab_id}, {hosts} hosts ({size - 1} members + {args.reps} joiners)")
        serf_ms = asyncio.run(
            serf_baseline(lab, base, joiners, poll=args.serf_poll, timeout=args.timeout)
        )
        prober = Prober(lab)
        try:
            joins, problems = meshd_joins(lab, prober, base, joiners, args, rng)
        finally:
            prober.close()
        for rep, (join, theirs) in enumerate(zip(joins, serf_ms, strict=True), start=1):
            say(
                f"  rep {rep}: {join['joiner']} via {join['seed']}: meshd join->full "
                f"{fmt(join['full_ms'])} (command {fmt(join.get('command_ms'))}, first reply "
                f"{fmt(join.get('first_ms'))}, out {fmt(join.get('out_ms'))}, "
                f"in {fmt(join.get('in_ms'))}); serf seen by all {fmt(theirs)}"
            )
        resources: dict[str, Any] = {}
        if args.idle:
            time.sleep(args.settle)  # the last joiner's own first moments are not idleness
            resources = measure_idle(lab, [*base, joiners[-1][0]], args.idle)
        log_marks = count_log_marks(lab)
        for line in problems:
            say(f"  PROBLEM: {line}")
        if problems or args.keep_all:
            keep = Path(args.keep_logs) / lab.lab_id
            shutil.copytree(lab.log_path(base[0], AGENT).parent, keep, dirs_exist_ok=True)
            say(f"  agent logs copied to {keep}")
    return {
        "n": size,
        "lab": lab.lab_id,
        "meshd_join_full_ms": [join["full_ms"] for join in joins],
        "meshd_joins": joins,
        "serf_seen_by_all_ms": serf_ms,
        "problems": problems,
        "log_marks": log_marks,
        **resources,
    }


# ---------------------------------------------------------------- report


def fmt(ms: float | None) -> str:
    return cell(ms, ".0f", " ms")


def median(values: Iterable[float | None]) -> float | None:
    good = [v for v in values if v is not None]
    return statistics.median(good) if good else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def summarize(row: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one N that the table and the target check read."""
    joins = row["meshd_joins"]
    full = [v for v in row["meshd_join_full_ms"] if v is not None]
    serf = median(row["serf_seen_by_all_ms"])
    after = median(join.get("after_ms") for join in joins)
    rss = row.get("rss_kib", {})
    cpu = row.get("idle_cpu_pct", {})
    return {
        "n": row["n"],
        "full": full,
        "timeouts": len(row["meshd_join_full_ms"]) - len(full),
        "full_median": median(full),
        "serf": serf,
        "ratio": ratio(median(full), serf),
        "after": after,
        "after_ratio": ratio(after, serf),
        "marks": {mark: sum(found.values()) for mark, found in row["log_marks"].items()},
        "rss_mib": {k: statistics.median(v) / 1024 for k, v in rss.items() if v},
        "cpu_pct": {k: statistics.median(v) for k, v in cpu.items() if v},
    }


def cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def report(results: Sequence[dict[str, Any]], idle: float) -> None:
    """One table for the run (one row per N), then the phases and the targets of issue 10."""
    rows = [summarize(row) for row in results]
    header = (
        "N",
        "join->full ms",
        "serf ms",
        "ratio",
        "after 1st ms",
        "ratio",
        "q-depth",
        "non-run",
        "agent MiB",
        "agent CPU%",
        "serf CPU%",
        "wg CPU%",
    )
    table = []
    for r in rows:
        if r["full"]:
            full = f"{r['full_median']:.0f} ({min(r['full']):.0f}-{max(r['full']):.0f})"
        else:
            full = "none converged"
        if r["timeouts"]:
            full += f" +{r['timeouts']} timeout"
        table.append(
            (
                str(r["n"]),
                full,
                cell(r["serf"], ".0f"),
                cell(r["ratio"], ".1f", "x"),
                cell(r["after"], ".0f"),
                cell(r["after_ratio"], ".1f", "x"),
                str(r["marks"]["query_queue_depth"]),
                str(r["marks"]["non_running_query"]),
                cell(r["rss_mib"].get("agent"), ".1f"),
                cell(r["cpu_pct"].get("agent"), ".2f"),
                cell(r["cpu_pct"].get("serf"), ".2f"),
                cell(r["cpu_pct"].get("wireguard-go"), ".2f"),
            )
        )
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    say("")
    for line in [header, *table]:
        say("  ".join(text.rjust(width) for text, width in zip(line, widths, strict=True)))
    say("")
    legend = (
        "join->full: from the start of `meshd join` until every pair (new node <-> each "
        "other node) has an echo reply through WireGuard, median (min-max) over the joins. "
        "serf: a bare serf agent's start until every other agent lists it alive, median. "
        "after 1st: join->full minus the first echo reply of any pair, median; its ratio is "
        "to the same serf figure. q-depth / non-run: lines with 'Query queue depth' / 'reply "
        "for non-running query' in every agent log of the lab, whole run. MiB, CPU%: medians "
        f"over the N nodes; CPU over {idle:g} s idle after the last join, % of one core."
    )
    say(textwrap.fill(legend, width=100))
    say("")
    say("meshd phases, median per N (ms from the join command's start):")
    say("  command returned / first echo reply / new node reaches all / all reach it")
    for row in results:
        phases = [
            median(join.get(key) for join in row["meshd_joins"])
            for key in ("command_ms", "first_ms", "out_ms", "in_ms")
        ]
        say(f"  N={row['n']:<3} " + " / ".join(cell(v, ".0f") for v in phases))
    say("resident memory, median over nodes (MiB): agent / serf / wireguard-go")
    for r in rows:
        mib = [cell(r["rss_mib"].get(kind), ".1f") for kind in KINDS]
        say(f"  N={r['n']:<3} " + " / ".join(mib))
    for row in results:
        for mark, found in row["log_marks"].items():
            if found:
                worst = ", ".join(f"{n} {c}" for n, c in sorted(found.items(), key=lambda i: -i[1]))
                say(f"  N={row['n']}: {LOG_MARKS[mark]!r} lines per node: {worst}")
    say("")
    say("issue 10 targets:")
    for line in target_checks(rows):
        say(f"  {line}")


def target_checks(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per target of issue 10: ok / MISSED with the figures behind it."""

    def verdict(good: bool) -> str:
        return "ok    " if good else "MISSED"

    lines = []
    for key, target, what in (
        ("ratio", TARGET_RATIO, "join->full / serf"),
        ("after_ratio", TARGET_AFTER_RATIO, "after 1st reply / serf"),
    ):
        values = [(r["n"], r[key]) for r in rows]
        good = all(v is not None and v <= target for _, v in values) and not any(
            r["timeouts"] for r in rows
        )
        shown = ", ".join(f"N={n} {cell(v, '.1f', 'x')}" for n, v in values)
        lines.append(f"{verdict(good)} {what} <= {target:g}x at every N: {shown}")
    marks = sum(sum(r["marks"].values()) for r in rows)
    lines.append(f"{verdict(marks == 0)} no queue-depth / non-running-query lines: {marks} found")
    at = [r for r in rows if r["n"] == TARGET_N]
    if not at or not at[0]["rss_mib"]:
        lines.append(f"-      agent RSS and idle CPU are judged at N={TARGET_N}, not measured")
        return lines
    rss = at[0]["rss_mib"].get("agent")
    cpu = at[0]["cpu_pct"].get("agent")
    lines.append(
        f"{verdict(rss is not None and rss <= TARGET_RSS_MIB)} agent RSS <= "
        f"{TARGET_RSS_MIB:g} MiB at N={TARGET_N}: {cell(rss, '.1f')} MiB"
    )
    lines.append(
        f"{verdict(cpu is not None and cpu <= TARGET_IDLE_CPU)} agent idle CPU <= "
        f"{TARGET_IDLE_CPU:g} % at N={TARGET_N}: {cell(cpu, '.2f')} %"
    )
    return lines


def compile_bytecode() -> None:
    """Compile meshd's and the plugins' modules, as installing a package does.

    An editable install writes no bytecode, and where PYTHONDONTWRITEBYTECODE is set
    (as on the machine these figures come from) nothing ever does: every ``meshd
    join`` then compiles its 100-odd modules again, 90 ms of the 240 its imports took
    there. A deployed meshd (a wheel, a distribution package) has its bytecode, so
    that is what is timed.
    """
    import meshd

    roots = [Path(meshd.__file__).parent, Path(__file__).resolve().parents[1] / "plugins"]
    for root in roots:
        if root.is_dir() and not compileall.compile_dir(root, quiet=1):
            raise SystemExit(f"could not compile the modules under {root}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,30,40", help="comma-separated N (default 10,30,40)")
    parser.add_argument("--reps", type=int, default=3, help="fresh joiners per N (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per join (s)")
    parser.add_argument("--interval", type=float, default=0.1, help="probe round (s)")
    parser.add_argument("--serf-poll", type=float, default=0.05, help="members poll (s)")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="pause after a leave and before --idle (s)"
    )
    # 30 s holds one of Serf's push/pull rounds per node; meshd re-publishes every 60 s.
    parser.add_argument("--idle", type=float, default=30.0, help="idle CPU window (s), 0: skip")
    parser.add_argument("--seed", type=int, default=None, help="random seed (seed host choice)")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures here")
    parser.add_argument(
        "--keep-logs", default="/tmp/meshd-bench-mesh-join", help="logs of failed runs go here"
    )
    parser.add_argument(
        "--keep-all", action="store_true", help="copy every run's agent logs to --keep-logs"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info"),
        help="of every meshd agent (debug: Serf's member events too, to see where a join waits)",
    )
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes: comma-separated integers, e.g. 10,30,40")
    if min(sizes) < 2 or args.reps < 1:
        parser.error("every size must be at least 2 and --reps at least 1")
    logging.basicConfig(level=logging.ERROR)
    rng = random.Random(args.seed)
    say(
        f"mesh join benchmark: sizes {sizes}, {args.reps} joins each; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    compile_bytecode()
    started = time.monotonic()
    results = [run_size(size, args, rng) for size in sizes]
    report(results, args.idle)
    say(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "results": results}, indent=2) + "\n"
        )
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
