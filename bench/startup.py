"""Python start-up of the meshd commands a join waits for: wall time, memory, what costs.

    .venv/bin/python bench/startup.py [--runs 15] [--top 12] [--json out.json]

A new node's join -> full connectivity (bench/mesh_join.py) includes two Python
start-ups: ``meshd join``'s and ``meshd agent``'s. This measures, each in a fresh
process started the way the lab starts them (``python -m meshd ...``):

- ``python -c pass``: the interpreter alone, the floor;
- ``meshd version`` and ``meshd join --help``: the CLI's own start-up;
- ``meshd agent`` until ``Agent.run`` is entered (imports, config, plugin scan,
  node state loaded), on a node made by ``meshd init --no-start`` in a temporary
  directory; the child stops right there, so nothing is started and no root is
  needed.

Each case runs ``--runs`` times: median and min of the wall time (spawn to exit,
or to ``Agent.run`` for the agent), of the CPU time the process used by then
(user + system: on a shared machine the steadier figure), and the peak resident
memory (ru_maxrss). Then,
from one more run under ``python -X importtime``, the import time of each case
summed by top-level package (the self time of every module, so the packages add
up to the whole); and for the agent, its resident memory after each step of its
imports (outside packages first, then meshd's modules, then the plugin host).
Import times under ``-X importtime`` are inflated by the measuring; compare them
with each other, not with the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Runs in the child: enters `meshd agent` as the CLI does, but Agent.run only reports
# the moment it was reached (CLOCK_MONOTONIC is machine-wide) and the process's RSS.
AGENT_PROBE = """
import sys, time
import meshd.agent

async def reached(self):
    rss = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS:"))
    print("REACHED", time.monotonic(), time.process_time(), rss, flush=True)

meshd.agent.Agent.run = reached
from meshd.cli import main
main(sys.argv[1:])
"""

# Runs in the child: RSS after each step of the agent's imports, in an order that puts
# the outside packages first, so each meshd step shows only what meshd itself adds.
# A package's figure includes what it drags in that no earlier step had loaded.
RSS_LADDER = """
import importlib, json, sys
def rss():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS:")))
steps = [("interpreter", rss())]
for name in sys.argv[1:]:
    importlib.import_module(name)
    steps.append((name, rss()))
import meshd.plugins
meshd.plugins.build_plugin_host()
steps.append(("plugin host built", rss()))
print(json.dumps(steps))
"""
LADDER_STEPS = (
    "pluggy",
    "click",
    "asyncio",
    "nacl.signing",
    "msgpack",
    "meshd.cli",
    "meshd.commands",
    "meshd.agent",
)


def say(line: str = "") -> None:
    print(line, flush=True)


def meshd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshd", *args]


def run_once(argv: Sequence[str], *, until_reached: bool = False) -> tuple[float, float, int]:
    """(wall ms from spawn to exit or to the child's REACHED line, CPU ms it used by then,
    its peak RSS in KiB). CPU time hardly moves with the machine's load; wall time does."""
    start = time.monotonic()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: stdout into the pipe, stderr discarded
        os.close(read_fd)
        os.dup2(write_fd, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.execv(argv[0], list(argv))
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        out = pipe.read()
    _, status, usage = os.wait4(pid, 0)
    end = time.monotonic()
    cpu = usage.ru_utime + usage.ru_stime
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed (status {status}); run it to see why")
    if until_reached:
        line = next((x for x in out.splitlines() if x.startswith("REACHED ")), None)
        if line is None:
            raise SystemExit(f"{' '.join(argv)} never reached Agent.run:\n{out}")
        end, cpu = float(line.split()[1]), float(line.split()[2])
    return (end - start) * 1000, cpu * 1000, usage.ru_maxrss


def import_times(argv: Sequence[str]) -> Counter[str]:
    """Self import time (us) summed by top-level package, from one ``-X importtime`` run."""
    done = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, check=False
    )
    by_package: Counter[str] = Counter()
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line.removeprefix("import time:").split("|")
        by_package[name.strip().split(".")[0]] += int(self_us)
    return by_package


def make_node(directory: Path) -> list[str]:
    """A node made by ``meshd init --no-start`` in ``directory``; its global CLI options."""
    config = directory / "meshd.toml"
    config.write_text(
        f'[node]\nname = "bench"\nstate_dir = "{directory / "state"}"\n'
        '[wireguard]\ninterface = "mwbench0"\nport = 51820\n'
    )
    options = ["--config", str(config)]
    init = [
        *options,
        "init",
        "--network",
        "bench",
        "--endpoint",
        "127.0.0.1:51820",
        "--no-start",
    ]
    subprocess.run(meshd(*init), check=True, capture_output=True)
    return options


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="runs per case (default 15)")
    parser.add_argument("--top", type=int, default=12, help="packages shown per case")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshd-startup-") as tmp:
        options = make_node(Path(tmp))
        cases: dict[str, tuple[list[str], bool]] = {
            "python -c pass": ([sys.executable, "-c", "pass"], False),
            "meshd version": (meshd("version"), False),
            "meshd join --help": (meshd("join", "--help"), False),
            "meshd agent (to Agent.run)": (
                [sys.executable, "-c", AGENT_PROBE, *options, "agent"],
                True,
            ),
        }
        say(
            f"start-up, {args.runs} runs per case; load average {os.getloadavg()[0]:.2f} "
            f"on {os.cpu_count()} cores; {sys.executable} ({sys.version.split()[0]})"
        )
        say("")
        say(f"{'':<28}{'wall ms':>16}{'CPU ms':>16}")
        say(f"{'case':<28}{'median':>8}{'min':>8}{'median':>8}{'min':>8}{'peak RSS MiB':>14}")
        results: dict[str, Any] = {}
        for name, (argv, until_reached) in cases.items():
            runs = [run_once(argv, until_reached=until_reached) for _ in range(args.runs)]
            wall = [ms for ms, _, _ in runs]
            cpu = [ms for _, ms, _ in runs]
            peak = statistics.median(kib for _, _, kib in runs) / 1024
            say(
                f"{name:<28}{statistics.median(wall):>8.0f}{min(wall):>8.0f}"
                f"{statistics.median(cpu):>8.0f}{min(cpu):>8.0f}{peak:>14.1f}"
            )
            results[name] = {"wall_ms": wall, "cpu_ms": cpu, "peak_rss_mib": peak}
        for name, (argv, _) in cases.items():
            if name.startswith("python"):
                continue
            by_package = import_times(argv)
            total = sum(by_package.values())
            results[name]["import_us"] = dict(by_package)
            shown = ", ".join(
                f"{package} {us / 1000:.0f}" for package, us in by_package.most_common(args.top)
            )
            say("")
            say(f"{name}: imports {total / 1000:.0f} ms under -X importtime; by package (ms):")
            say(f"  {shown}")
        ladder = json.loads(
            subprocess.run(
                [sys.executable, "-c", RSS_LADDER, *LADDER_STEPS],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        results["agent_rss_ladder_kib"] = ladder
        say("")
        say("agent RSS, step by step (MiB after the step, +added by it):")
        previous = 0
        for step, kib in ladder:
            say(f"  {step:<22}{kib / 1024:6.1f}  +{(kib - previous) / 1024:.1f}")
            previous = kib
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
