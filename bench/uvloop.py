"""The agent and the relay on asyncio's loop and on uvloop, side by side (issue 15).

    .venv/bin/python bench/uvloop.py [--nodes 4] [--idle 30] [--reps 2] [--datagrams 200000]

Agent: one flat lab of ``--nodes`` hosts forms a full mesh; then, per rep and per
loop (asyncio first, then uvloop), every agent is stopped and started again with
``MESHD_LOOP`` set to that loop, the mesh is waited for (every pair pings), the
agents settle for ``--settle`` s, and over ``--idle`` s each agent's CPU
(utime+stime from /proc/<pid>/stat, the agent process alone: Serf and wireguard-go
do not run on its loop) is read as % of one core, and its resident memory (VmRSS)
at the end. Medians over the nodes, per rep. The agents of one loop run while the
others are stopped, so the two never share the CPU.

Relay: the standalone forwarder (``python -m meshd_nat.relay``) on loopback, as
bench/relay.py's last part measures it, on each loop: CPU per forwarded datagram,
share forwarded and rate, for ``--datagrams`` full-size datagrams.

Needs root, serf, wireguard-go and ip; traffic stays in the lab and on loopback.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from meshd.lab import Lab
from meshd.lab.mesh import MeshLab

sys.path.insert(0, str(Path(__file__).parent))
from relay import loopback  # bench/relay.py, beside this file

LOOPS = ("asyncio", "uvloop")
TICK = 100  # USER_HZ


def cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def restart_on(mesh: MeshLab, nodes: list[str], loop: str) -> dict[str, int]:
    for node in nodes:
        mesh.stop(node)
    pids = {node: mesh.start(node, env={"MESHD_LOOP": loop}) for node in nodes}
    for node in nodes:
        mesh.wait_ready(node)
    mesh.wait_full_mesh(nodes, timeout=90)
    return pids


def idle_figures(pids: dict[str, int], settle: float, idle: float) -> tuple[float, float]:
    """Median CPU % of one core over ``idle`` s, and median RSS in MiB at its end."""
    time.sleep(settle)
    before = {node: cpu_ticks(pid) for node, pid in pids.items()}
    time.sleep(idle)
    cpu = [100 * (cpu_ticks(pid) - before[node]) / TICK / idle for node, pid in pids.items()]
    rss = [rss_kib(pid) / 1024 for pid in pids.values()]
    return statistics.median(cpu), statistics.median(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before measuring")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--datagrams", type=int, default=200_000, help="for the relay")
    args = parser.parse_args()

    nodes = [f"n{i}" for i in range(1, args.nodes + 1)]
    rows: list[tuple[int, str, float, float]] = []
    lab = Lab.create(nodes=args.nodes, topology="flat")
    try:
        mesh = MeshLab(lab, log_level="warning")
        mesh.up(nodes)
        mesh.wait_full_mesh(nodes, timeout=90)
        for rep in range(1, args.reps + 1):
            for loop in LOOPS:
                pids = restart_on(mesh, nodes, loop)
                cpu, rss = idle_figures(pids, args.settle, args.idle)
                rows.append((rep, loop, cpu, rss))
                print(f"rep {rep} {loop:8} agent CPU {cpu:5.2f} %  RSS {rss:5.1f} MiB", flush=True)
    finally:
        lab.down()

    print(
        f"\nthe agent, {args.nodes} nodes in a full mesh, idle {args.idle:g} s "
        "(medians over the nodes):"
    )
    print(f"  {'rep':>3}  {'loop':8}  {'CPU % of a core':>15}  {'RSS MiB':>7}")
    for rep, loop, cpu, rss in rows:
        print(f"  {rep:>3}  {loop:8}  {cpu:>15.2f}  {rss:>7.1f}")
    for loop in LOOPS:
        cpus = [cpu for _, name, cpu, _ in rows if name == loop]
        rsss = [rss for _, name, _, rss in rows if name == loop]
        print(f"  all  {loop:8}  {statistics.median(cpus):>15.2f}  {statistics.median(rsss):>7.1f}")

    print(f"\nthe relay alone on loopback, {args.datagrams} datagrams of 1452 bytes:")
    print(f"  {'loop':8}  {'us CPU/datagram':>15}  {'forwarded %':>11}  {'datagrams/s':>11}")
    for loop in LOOPS:
        per, share, rate = loopback(loop == "uvloop", args.datagrams)
        print(f"  {loop:8}  {per:>15.1f}  {share:>11.0f}  {rate:>11.0f}")


if __name__ == "__main__":
    main()
