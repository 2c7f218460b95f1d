"""Benchmark: WireGuard direct vs relayed through meshd_nat's forwarder, side by side.

One nat lab (3 public hosts, 2 sites, 5 hosts): n2 <-> n3 talk directly over
the "internet" bridge; n4 (site 1) <-> n5 (site 2) can only talk through the
relay on n1 (``python -m meshd_nat.relay``, the process this measures). All four
run plain ``wireguard-go`` configured by ``wg set`` (:mod:`meshd.lab.tunnel`).
Each row, through the tunnel:

- RTT: ``ping -c 50 -i 0.02`` (min / avg / max ms, after a warm-up ping);
- throughput: ``iperf3`` TCP for ``--seconds`` (5) seconds, what the receiver got;
- relay CPU: the relay process's utime+stime from ``/proc/<pid>/stat`` over the
  iperf3 run, as % of one core, and per datagram (counted as the packets both
  ends' wg interfaces received meanwhile: one relayed datagram each).

The relayed rows run once with the relay on asyncio's default loop and once with
``--loop uvloop``. The relayed path also crosses the two sites' NAT routers, which the
direct one does not: the ratio is relay plus two NAT hops.

Then the relay alone, on loopback in the root namespace (no WireGuard): one
sender blasts ``--datagrams`` 1452-byte transport-data datagrams (a full packet
of wireguard-go's MTU) at one side, a receiver drains the other; the relay's CPU
per forwarded datagram and the share forwarded, on asyncio and on uvloop. Needs
root (the lab).

    .venv/bin/python bench/relay.py [--seconds 5] [--reps 1] [--datagrams 200000]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from meshd.identity import WireGuardKeyPair
from meshd.lab import Lab
from meshd.lab.tunnel import BareWireGuard, bare_wireguard
from meshd_nat.relay import decode_public_key, mac1_key

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    name: str
    rtt: tuple[float, float, float]  # min, avg, max ms
    mbit: float
    relay_cpu: float | None = None  # % of one core during iperf3
    relay_us_per_packet: float | None = None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def ping(lab: Lab, src: BareWireGuard, dst: BareWireGuard) -> tuple[float, float, float]:
    if lab.ping(src.node, dst.address, deadline=20) is None:
        raise SystemExit(f"no ping {src.node} -> {dst.node} through the tunnel")
    out = lab.run(src.node, ["ping", "-n", "-q", "-c", "50", "-i", "0.02", dst.address]).stdout
    found = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", out)
    if not found:
        raise SystemExit(f"cannot read ping's summary: {out!r}")
    low, avg, high = (float(x) for x in found.groups())
    return low, avg, high


def iperf(lab: Lab, src: BareWireGuard, dst: BareWireGuard, seconds: int) -> float:
    """Mbit/s the receiver got from a TCP stream of ``seconds`` s."""
    name = f"iperf3-{dst.node}-{time.monotonic_ns()}"
    lab.spawn(dst.node, ["iperf3", "-s", "-1", "-B", dst.address], name=name)
    deadline = time.monotonic() + 10
    while True:
        done = lab.run(
            src.node,
            ["iperf3", "-c", dst.address, "-t", str(seconds), "-J"],
            check=False,
            timeout=seconds + 30,
        )
        result = json.loads(done.stdout) if done.stdout.strip() else {"error": done.stderr}
        if done.returncode == 0 and "error" not in result:
            break
        if time.monotonic() > deadline:  # before that, the server may not listen yet
            raise SystemExit(f"iperf3 {src.node} -> {dst.node}: {result.get('error')}")
        time.sleep(0.1)
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e6


def start_relay(lab: Lab, a: BareWireGuard, b: BareWireGuard, uvloop: bool) -> tuple[int, str]:
    """The relay on n1 for (a, b), their endpoints pointed at it; its pid and log name."""
    name = f"relay-{'uvloop' if uvloop else 'asyncio'}"
    ports_file = lab.node_dir("n1") / f"{name}.json"
    ports_file.unlink(missing_ok=True)  # the previous round's
    argv = [sys.executable, "-m", "meshd_nat.relay", "--pair", a.public_key, b.public_key]
    argv += ["--ports-file", str(ports_file), "--loop", "uvloop" if uvloop else "asyncio"]
    lab.spawn("n1", argv, name=name)
    deadline = time.monotonic() + 10
    while not ports_file.exists():
        if time.monotonic() > deadline:
            raise SystemExit(lab.log_path("n1", name).read_text())
        time.sleep(0.05)
    written = json.loads(ports_file.read_text())
    relay = lab.node("n1").address
    a.set_peer(b, endpoint=f"{relay}:{written['ports'][a.public_key]}", keepalive=25)
    b.set_peer(a, endpoint=f"{relay}:{written['ports'][b.public_key]}", keepalive=25)
    # A new relay knows neither end: it drops a's first packets until b has sent
    # something too (a keepalive would, within 25 s). One ping each way teaches it both.
    lab.ping(a.node, b.address, deadline=0.5)
    lab.ping(b.node, a.address, deadline=5)
    return int(written["pid"]), name


def relay_packets(lab: Lab, pair: tuple[BareWireGuard, BareWireGuard]) -> int:
    """Packets both ends' wg interfaces received: each came in one datagram the relay
    forwarded (handshakes and keepalives, which are few, are not counted)."""
    total = 0
    for end in pair:
        stats = lab.run(end.node, ["ip", "-s", "-j", "link", "show", end.ifname]).stdout
        total += int(json.loads(stats)[0]["stats64"]["rx"]["packets"])
    return total


def measure(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    lab = Lab.create(nodes=5, topology="nat", sites=2, public=3)
    try:
        direct = bare_wireguard(lab, "n2", "100.64.0.2"), bare_wireguard(lab, "n3", "100.64.0.3")
        relayed = bare_wireguard(lab, "n4", "100.64.0.4"), bare_wireguard(lab, "n5", "100.64.0.5")
        assert not lab.expect_reachable("n4", "n5")
        direct[0].set_peer(direct[1], endpoint=f"{lab.node('n3').address}:51820", keepalive=25)
        direct[1].set_peer(direct[0], endpoint=f"{lab.node('n2').address}:51820", keepalive=25)
        for _ in range(args.reps):
            rows.append(Row("direct", ping(lab, *direct), iperf(lab, *direct, args.seconds)))
            for uvloop in (False, True):
                pid, name = start_relay(lab, *relayed, uvloop)
                rtt = ping(lab, *relayed)
                cpu_before, packets_before = cpu_seconds(pid), relay_packets(lab, relayed)
                started = time.monotonic()
                mbit = iperf(lab, *relayed, args.seconds)
                cpu = cpu_seconds(pid) - cpu_before
                elapsed = time.monotonic() - started
                packets = relay_packets(lab, relayed) - packets_before
                rows.append(
                    Row(
                        f"relayed ({'uvloop' if uvloop else 'asyncio'})",
                        rtt,
                        mbit,
                        relay_cpu=100 * cpu / elapsed,
                        relay_us_per_packet=1e6 * cpu / max(packets, 1),
                    )
                )
                lab.kill("n1", name)
                os.waitpid(pid, 0)  # our child (ip netns exec became the relay)
    finally:
        lab.down()
    return rows


def report(rows: list[Row]) -> None:
    print(
        f"{'path':<18} {'RTT min/avg/max ms':>22} {'TCP Mbit/s':>11} "
        f"{'relay CPU %':>12} {'relay us/pkt':>13}"
    )
    for row in rows:
        rtt = "{:.3f}/{:.3f}/{:.3f}".format(*row.rtt)
        cpu = f"{row.relay_cpu:.0f}" if row.relay_cpu is not None else "-"
        per = f"{row.relay_us_per_packet:.1f}" if row.relay_us_per_packet is not None else "-"
        print(f"{row.name:<18} {rtt:>22} {row.mbit:>11.0f} {cpu:>12} {per:>13}")
    base_rtt = statistics.median(r.rtt[1] for r in rows if r.name == "direct")
    base_mbit = statistics.median(r.mbit for r in rows if r.name == "direct")
    print("\nratios to direct (medians over reps):")
    for name in sorted({r.name for r in rows} - {"direct"}):
        mine = [r for r in rows if r.name == name]
        rtt = statistics.median(r.rtt[1] for r in mine)
        mbit = statistics.median(r.mbit for r in mine)
        print(f"  {name:<18} RTT x{rtt / base_rtt:.2f}  throughput x{mbit / base_mbit:.2f}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (2 cores, shared)")


def handshake(kind: int, size: int, receiver: str) -> bytes:
    """A handshake message of ``kind`` with a valid mac1 for ``receiver`` (random body)."""
    covered = bytes([kind, 0, 0, 0]) + os.urandom(size - 36)
    key = mac1_key(decode_public_key(receiver))
    return covered + hashlib.blake2s(covered, key=key, digest_size=16).digest() + bytes(16)


def wait_for_file(path: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"the relay did not write {path}")
        time.sleep(0.02)


def loopback(uvloop: bool, count: int) -> tuple[float, float, float]:
    """Relay CPU us per forwarded datagram, % forwarded, forwarded per second."""
    key_a, key_b = (WireGuardKeyPair.generate().public_key for _ in range(2))
    ports_file = os.path.join(tempfile.mkdtemp(prefix="meshd-bench-relay-"), "ports.json")
    argv = [sys.executable, "-m", "meshd_nat.relay", "--host", "127.0.0.1"]
    argv += ["--pair", key_a, key_b, "--ports-file", ports_file]
    argv += ["--loop", "uvloop" if uvloop else "asyncio"]
    relay = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        wait_for_file(ports_file)
        ports = json.loads(Path(ports_file).read_text())["ports"]
        a, b = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
        for end in (a, b):
            end.bind(("127.0.0.1", 0))
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        to_a, to_b = ("127.0.0.1", ports[key_a]), ("127.0.0.1", ports[key_b])
        a.sendto(handshake(1, 148, key_b), to_a)  # dropped, but the relay learns a
        a.settimeout(5)
        while True:  # b's response reaches a once the relay knows a
            b.sendto(handshake(2, 92, key_a), to_b)
            try:
                a.recv(2048)
                break
            except TimeoutError:
                continue
        b.setblocking(False)
        datagram = b"\x04\x00\x00\x00" + os.urandom(1448)
        got = 0

        def drain() -> int:
            n = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    b.recv(2048)
                    n += 1
            return n

        cpu_before, started = cpu_seconds(relay.pid), time.monotonic()
        for i in range(count):
            a.sendto(datagram, to_a)
            if i % 64 == 63:
                got += drain()
        time.sleep(0.3)  # what is still queued in the relay
        got += drain()
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(relay.pid) - cpu_before
    finally:
        relay.terminate()
        relay.wait()
    return 1e6 * cpu / max(got, 1), 100 * got / count, got / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 run length")
    parser.add_argument("--reps", type=int, default=1, help="rounds of the three rows")
    parser.add_argument("--datagrams", type=int, default=200_000, help="for the loopback part")
    args = parser.parse_args()
    report(measure(args))
    print(f"\nthe relay alone on loopback, {args.datagrams} datagrams of 1452 bytes:")
    print(f"  {'loop':<8} {'us CPU/datagram':>16} {'forwarded %':>12} {'datagrams/s':>12}")
    for uvloop in (False, True):
        per, share, rate = loopback(uvloop, args.datagrams)
        name = "uvloop" if uvloop else "asyncio"
        print(f"  {name:<8} {per:>16.1f} {share:>12.0f} {rate:>12.0f}")


if __name__ == "__main__":
    main()
