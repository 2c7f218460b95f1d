"""Soak: a meshd mesh under steady churn for a long time (issue 16). Figures, never pass/fail.

    .venv/bin/python bench/soak.py [--nodes 20] [--minutes 30] [--short]

One flat lab of ``--nodes`` hosts plus one spare, meshd agents on the ``--nodes``
(MeshLab.up). The first four are witnesses, never touched. Every ``--every`` s (60)
one round of churn, each step on a random other host:

- join: a host that is out (the spare, later one that left) is wiped and runs
  ``meshd join`` through a witness, then its agent starts;
- leave: a member runs ``meshd leave`` (its agent ends; it is out);
- kill: a member's agent is SIGKILLed and started again.

All along, this process sends an echo request through the mesh for every pair of
current members once a second (raw ICMP sockets inside the hosts, as
bench/mesh_join.py's Prober does, so no ``ping`` process per probe) and records
each pair's longest time without a reply while both stayed members: between
witnesses, and over every pair (a killed agent's pairs included: its restart).

Printed: the agents' resident memory (VmRSS) and CPU over ``--idle`` s (% of one
core) on the witnesses at the start and at the end (medians) and the growth, each
window after ``--settle`` s of quiet (one heartbeat interval + 15 s: both in the
same steady state); how many members each witness's Serf lists; Serf's
queue depths (``stats`` over RPC: event, query and intent queues) on every member at
the end and the highest sampled each round; Serf overload warnings in the logs; the
longest unavailability. ``--short``: 8 nodes, 3 minutes, a round every 30 s, 10 s
idle windows, for a smoke run. Needs root, ``serf``, ``wireguard-go``, ``wg``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mesh_join import LOG_MARKS, Prober, count_log_marks, measure_idle

from meshd.agent.presence import republish_interval
from meshd.gossip.rpc import SerfClient
from meshd.lab import Lab, faults
from meshd.lab.mesh import AGENT, MeshLab

WITNESSES = 4
Pair = tuple[str, str]


def say(line: str) -> None:
    print(line, flush=True)


class Availability(threading.Thread):
    """Probes every pair of current members once a second; longest silence per pair."""

    def __init__(self, mesh: MeshLab, members: set[str]) -> None:
        super().__init__(daemon=True)
        self.mesh = mesh
        self.members = set(members)  # changed by the churn, under the lock
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.last_reply: dict[Pair, float] = {}
        self.longest: dict[Pair, float] = {}
        self.rounds = 0
        self.stopped_at: float | None = None  # a silence ends with the probing

    def set_member(self, node: str, member: bool) -> None:
        with self.lock:
            if member:
                self.members.add(node)
            else:
                self.members.discard(node)
                # A pair's silence counts only while both ends are members.
                for pair in [p for p in self.last_reply if node in p]:
                    del self.last_reply[pair]

    def run(self) -> None:
        prober = Prober(self.mesh.lab)
        try:
            while not self.stopping.is_set():
                with self.lock:
                    members = sorted(self.members)
                addresses = self.mesh.mesh_addresses(members)
                pairs = [(a, b) for a in members for b in members if a != b]
                start = time.monotonic()
                answered, _ = prober.wait(pairs, addresses, start=start, timeout=1.0, interval=1.0)
                now = time.monotonic()
                with self.lock:
                    for pair in answered:
                        if not self.members.issuperset(pair):
                            continue
                        last = self.last_reply.get(pair)
                        if last is not None:
                            gap = now - last
                            self.longest[pair] = max(self.longest.get(pair, 0.0), gap)
                        self.last_reply[pair] = now
                    # Pairs unanswered this round keep their last reply: the gap grows.
                self.rounds += 1
                self.stopping.wait(max(0.0, 1.0 - (time.monotonic() - start)))
        finally:
            self.stopped_at = time.monotonic()
            prober.close()

    def worst(self, among: set[str] | None = None) -> tuple[Pair | None, float]:
        with self.lock:
            now = self.stopped_at or time.monotonic()
            gaps = dict(self.longest)
            for pair, last in self.last_reply.items():  # still silent at the end
                gaps[pair] = max(gaps.get(pair, 0.0), now - last)
        chosen = {p: g for p, g in gaps.items() if among is None or among.issuperset(p)}
        if not chosen:
            return None, 0.0
        pair = max(chosen, key=chosen.__getitem__)
        return pair, chosen[pair]


COUNTED = ("members", "failed", "left")


def serf_queues(mesh: MeshLab, nodes: list[str]) -> dict[str, dict[str, int]]:
    """Serf's queue depths and member counts on each node: {node: {event_queue,
    query_queue, intent_queue, members, failed, left}} (members counts every status)."""

    async def one(node: str) -> tuple[str, dict[str, int]]:
        config = json.loads((mesh.state_dir(node) / "serf" / "serf.json").read_text())
        client = SerfClient(
            config["rpc_addr"],
            auth_key=config["rpc_auth"],
            netns=mesh.lab.netns_of(node),
            stream=None,
            reconnect=False,
            timeout=5.0,
        )
        try:
            await client.connect()
            stats = (await client.stats()).get("serf", {})
        except Exception:  # a member just killed: no figure this time
            return node, {}
        finally:
            await client.close()
        return node, {k: int(v) for k, v in stats.items() if k.endswith("_queue") or k in COUNTED}

    async def every() -> list[tuple[str, dict[str, int]]]:
        return await asyncio.gather(*(one(n) for n in nodes))

    return dict(asyncio.run(every()))


def median_of(figures: dict[str, Any], key: str, kind: str) -> float:
    values = figures[key][kind]
    return statistics.median(values) if values else float("nan")


def growth(start: float, end: float) -> str:
    return f"{100 * (end - start) / start:+.0f} %" if start else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=None, help="members (default 20)")
    parser.add_argument("--minutes", type=float, default=None, help="length (default 30)")
    parser.add_argument("--every", type=float, default=None, help="s between rounds (60)")
    parser.add_argument("--idle", type=float, default=None, help="CPU window (s, 30)")
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="s of quiet before each CPU window (default: one heartbeat interval + 15 s)",
    )
    parser.add_argument("--short", action="store_true", help="8 nodes, 3 minutes, a smoke run")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures here")
    parser.add_argument("--keep-logs", default="/tmp/meshd-bench-soak", help="agent logs go here")
    args = parser.parse_args()
    size = args.nodes or (8 if args.short else 20)
    minutes = args.minutes or (3.0 if args.short else 30.0)
    every = args.every or (30.0 if args.short else 60.0)
    idle = args.idle or (10.0 if args.short else 30.0)
    # Both windows in the same steady state: a mesh formed a moment ago has sent no
    # heartbeat yet (the first comes republish_interval(N) after a record), and one whose
    # last round of churn just ended is still re-announcing; measured so, the end looked
    # dearer than the start for reasons that are not growth.
    settle = args.settle if args.settle is not None else republish_interval(size) + 15.0
    if size < WITNESSES + 3:
        parser.error(f"--nodes must be at least {WITNESSES + 3}")
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    logging.basicConfig(level=logging.ERROR)
    say(
        f"soak: {size} nodes, {minutes:g} min, a join, a leave and a kill every {every:g} s; "
        f"seed {seed}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    started = time.monotonic()
    lab = Lab.create(nodes=size + 1)
    figures: dict[str, Any] = {"seed": seed}
    try:
        mesh = MeshLab(lab)
        hosts = [n.name for n in lab.nodes]
        members, out = hosts[:size], [hosts[size]]
        witnesses = members[:WITNESSES]
        mesh.up(members, seed=seed)
        mesh.wait_full_mesh(members, timeout=180)
        say(f"mesh of {size} formed; {settle:g} s of quiet before measuring")
        time.sleep(settle)
        at_start = measure_idle(lab, witnesses, idle)
        listed_start = serf_queues(mesh, witnesses)
        say(f"witnesses {', '.join(witnesses)} measured over {idle:g} s")

        watch = Availability(mesh, set(members))
        watch.start()
        queue_peaks: dict[str, int] = {}
        churn: list[str] = []
        end = time.monotonic() + minutes * 60
        rounds = 0
        while time.monotonic() < end:
            round_start = time.monotonic()
            joiner = out.pop(0)
            shutil.rmtree(mesh.state_dir(joiner), ignore_errors=True)
            mesh.join(joiner, rng.choice(witnesses))
            mesh.start(joiner)
            leaver = rng.choice([m for m in members if m not in witnesses])
            watch.set_member(leaver, False)
            mesh.meshd(leaver, "leave", check=False)
            mesh.stop(leaver)  # ended by the leave already, or now
            members.remove(leaver)
            out.append(leaver)
            members.append(joiner)
            victim = rng.choice([m for m in members if m not in witnesses and m != joiner])
            mesh.lab.kill(victim, AGENT, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while faults.netns_processes(lab, victim) and time.monotonic() < deadline:
                time.sleep(0.05)
            mesh.start(victim)
            mesh.wait_ready(joiner, timeout=60)
            watch.set_member(joiner, True)
            churn.append(f"+{joiner} -{leaver} !{victim}")
            for queues in serf_queues(mesh, members).values():
                for name, depth in queues.items():
                    if name.endswith("_queue"):
                        queue_peaks[name] = max(queue_peaks.get(name, 0), depth)
            rounds += 1
            say(f"  round {rounds}: {churn[-1]} ({time.monotonic() - round_start:.1f} s)")
            time.sleep(max(0.0, every - (time.monotonic() - round_start)))  # the churn's rhythm
        watch.stopping.set()
        watch.join()
        missing, took = mesh.wait_mesh(members, timeout=60)
        say(f"churn over; {settle:g} s of quiet before measuring")
        time.sleep(settle)
        at_end = measure_idle(lab, witnesses, idle)
        queues_end = serf_queues(mesh, members)
        marks = count_log_marks(lab)

        pair, worst_witness = watch.worst(set(witnesses))
        any_pair, worst_any = watch.worst()
        say("")
        say(f"rounds of churn: {rounds} ({watch.rounds} probe rounds)")
        say(
            f"full mesh at the end: {'no' if missing else 'yes'} "
            f"({len(missing)} pairs silent after {took:.0f} s)"
        )
        for kind in ("agent", "serf", "wireguard-go"):
            rss0, rss1 = (median_of(f, "rss_kib", kind) / 1024 for f in (at_start, at_end))
            cpu0, cpu1 = (median_of(f, "idle_cpu_pct", kind) for f in (at_start, at_end))
            say(
                f"{kind:12} RSS {rss0:.1f} -> {rss1:.1f} MiB ({growth(rss0, rss1)}), "
                f"CPU {cpu0:.2f} -> {cpu1:.2f} % ({growth(cpu0, cpu1)})  [witness medians]"
            )
        listed_end = {n: q for n, q in queues_end.items() if n in witnesses}
        for label, listed in (("start", listed_start), ("end", listed_end)):
            counts = {
                k: statistics.median([q[k] for q in listed.values() if k in q] or [0])
                for k in COUNTED
            }
            say(
                f"serf members listed at the {label} (witness medians): {counts['members']:g} "
                f"({counts['failed']:g} failed, {counts['left']:g} left) for {size} machines"
            )
        say(f"serf queue depth peaks (sampled each round): {queue_peaks}")
        deepest = {
            k: max((q.get(k, 0) for q in queues_end.values()), default=0)
            for k in ("event_queue", "query_queue", "intent_queue")
        }
        say(f"serf queue depths at the end, deepest member: {deepest}")
        say(
            "serf overload lines in the logs: "
            + ", ".join(f"{LOG_MARKS[m]!r} {sum(c.values())}" for m, c in marks.items())
        )
        say(f"longest unavailability between witnesses: {worst_witness:.1f} s {pair or ''}")
        say(
            "longest unavailability of any pair that stayed members: "
            f"{worst_any:.1f} s {any_pair or ''}"
        )
        figures.update(
            rounds=rounds,
            churn=churn,
            start=at_start,
            end=at_end,
            queue_peaks=queue_peaks,
            queues_end=queues_end,
            serf_listed_start=listed_start,
            marks=marks,
            worst_witness_s=worst_witness,
            worst_any_s=worst_any,
            missing=sorted(missing),
        )
    finally:
        keep = Path(args.keep_logs) / lab.lab_id
        if (lab.dir / "logs").is_dir():
            shutil.copytree(lab.dir / "logs", keep, dirs_exist_ok=True)
        lab.down()
    say(f"total {time.monotonic() - started:.0f} s; agent logs kept in {keep}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
