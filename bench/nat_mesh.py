"""Benchmark: through meshd's own mesh, a relayed pair beside a direct one (issue 11).

One nat lab with meshd on every host and the NAT plugin doing its job: symmetric NATs
(``--nat-type symmetric``, so site-to-site pairs must be relayed), 2 public hosts, 2
sites. Side by side in one run, through the mesh addresses:

- **relayed**: n3 (site 1) -> n4 (site 2), through the relay their status names;
- **direct**: n3 -> the public host that is not that relay (one NAT on the way).

Per row: ``ping -c 50 -i 0.02`` RTT (min/avg/max ms), ``iperf3`` TCP for ``--seconds``
(what the receiver got), and the relay's agent process CPU over the iperf3 run (the
relay runs inside the agent's event loop), as % of one core. Needs root.

    .venv/bin/python bench/nat_mesh.py [--seconds 5] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

from meshd.lab import Lab
from meshd.lab.mesh import AGENT, MeshLab

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def agent_pid(lab: Lab, node: str) -> int:
    for proc in lab.processes():
        if proc["node"] == node and proc["name"] == AGENT and proc["alive"]:
            return int(proc["pid"])
    raise SystemExit(f"no agent running on {node}")


def ping(lab: Lab, src: str, dst: str) -> tuple[float, float, float]:
    out = lab.run(src, ["ping", "-n", "-q", "-c", "50", "-i", "0.02", dst]).stdout
    found = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", out)
    if not found:
        raise SystemExit(f"cannot read ping's summary: {out!r}")
    low, avg, high = (float(x) for x in found.groups())
    return low, avg, high


def iperf(lab: Lab, src: str, dst: str, seconds: int) -> float:
    lab.spawn(dst.split("@")[0], ["iperf3", "-s", "-1"], name=f"iperf3-{time.monotonic_ns()}")
    deadline = time.monotonic() + 10
    while True:
        done = lab.run(
            src,
            ["iperf3", "-c", dst.split("@")[1], "-t", str(seconds), "-J"],
            check=False,
            timeout=seconds + 30,
        )
        result = json.loads(done.stdout) if done.stdout.strip() else {"error": done.stderr}
        if done.returncode == 0 and "error" not in result:
            return float(result["end"]["sum_received"]["bits_per_second"]) / 1e6
        if time.monotonic() > deadline:
            raise SystemExit(f"iperf3 {src} -> {dst}: {result.get('error')}")
        time.sleep(0.2)


def path_to(mesh: MeshLab, src: str, dst: str) -> str:
    status = mesh.status(src)
    assert status is not None
    return next(p.get("path") or "-" for p in status["peers"] if p["name"] == dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 run length")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    lab = Lab.create(nodes=5, topology="nat", sites=2, public=2, nat_type="symmetric")
    try:
        mesh = MeshLab(lab)
        mesh.up(seed=1)
        mesh.wait_full_mesh(timeout=60)
        time.sleep(5)  # the paths settle (discovery, relay ports)
        relayed = path_to(mesh, "n3", "n4")
        if not relayed.startswith("relay via "):
            raise SystemExit(f"n3 -> n4 is not relayed: {relayed}")
        relay = relayed.removeprefix("relay via ").split()[0]
        direct_peer = "n2" if relay == "n1" else "n1"
        rows: dict[str, list[tuple[tuple[float, float, float], float, float]]] = {}
        pid = agent_pid(lab, relay)
        for _ in range(args.reps):
            for label, dst in (
                (f"direct n3 -> {direct_peer}", direct_peer),
                (f"relayed n3 -> n4 via {relay}", "n4"),
            ):
                address = mesh.mesh_address(dst)
                rtt = ping(lab, "n3", address)
                before, started = cpu_seconds(pid), time.monotonic()
                mbit = iperf(lab, "n3", f"{dst}@{address}", args.seconds)
                cpu = 100 * (cpu_seconds(pid) - before) / (time.monotonic() - started)
                rows.setdefault(label, []).append((rtt, mbit, cpu))
        load = Path("/proc/loadavg").read_text().split()[:3]
        print(f"nat lab, symmetric NATs; {args.reps} rep(s); load average {' '.join(load)}")
        print(
            f"{'path':32} {'RTT min/avg/max ms':>22} {'TCP Mbit/s':>11} {'relay agent CPU %':>18}"
        )
        for label, results in rows.items():
            for rtt, mbit, cpu in results:
                print(
                    f"{label:32} {'/'.join(f'{x:.3f}' for x in rtt):>22} {mbit:11.0f} {cpu:18.0f}"
                )
        (direct, relayed_rows) = rows.values()
        ratio_rtt = statistics.median(r[0][1] for r in relayed_rows) / statistics.median(
            r[0][1] for r in direct
        )
        ratio_tp = statistics.median(r[1] for r in relayed_rows) / statistics.median(
            r[1] for r in direct
        )
        print(f"relayed / direct (medians): RTT avg x{ratio_rtt:.2f}, throughput x{ratio_tp:.2f}")
    finally:
        lab.down()


if __name__ == "__main__":
    main()
