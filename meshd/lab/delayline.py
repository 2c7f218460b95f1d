"""A delay line: ``tc netem delay D loss L`` on a lab host's egress, in userspace.

For kernels built without ``sch_netem``. It runs as its own process inside a lab
host's namespace (:func:`meshd.lab.faults.delay` spawns it, so the lab's teardown
ends it)::

    python -m meshd.lab.delayline --device dl0 --delay-ms 100 --loss-percent 10 \\
        --stats FILE

It creates the TUN device ``--device`` (no persistence: the device goes with the
process). Policy routing, which :func:`meshd.lab.faults.delay` sets up once the device
exists, sends every packet the host itself sends to its underlay into the device;
this process reads each one, drops it with probability ``loss``, else writes it back
into the device ``delay`` later. A packet written into a TUN device arrives in the
kernel as received on it, and the kernel forwards it out of the underlay interface.

The delay is constant, so the packets leave in the order they came: a FIFO is the
whole schedule (no heap, no timer per packet). One process, one poll loop, one read
and one write per packet. On SIGTERM it writes what it passed and dropped to
``--stats`` (JSON, atomically) and ends.
"""

from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import json
import logging
import os
import random
import select
import signal
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from meshd.state import atomic_write

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
IFREQ_SIZE = 40  # sizeof(struct ifreq): the kernel copies this much
READ_SIZE = 65535  # the largest IP packet


@dataclass
class DelayStats:
    """What a delay line did: packets passed on (after the delay) and dropped."""

    passed: int = 0
    dropped: int = 0
    held: int = 0  # still waiting when it stopped (lost, as with a removed qdisc)
    cpu_s: float = 0.0  # the process's CPU time, user and system


class DelayLine:
    """Packets in, the same packets out ``delay`` s later, ``loss`` of them never.

    Pure: the caller gives the time. ``offer`` takes a packet arriving at ``now``
    (False: dropped), ``due`` hands out every packet whose time has come, in arrival
    order, and ``wait`` says how long until the next one is due (None: none held).
    """

    def __init__(self, delay: float, loss: float, rng: random.Random) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        if not 0 <= loss <= 1:
            raise ValueError(f"loss must be between 0 and 1, not {loss}")
        self.delay = delay
        self.loss = loss
        self._rng = rng
        self._held: collections.deque[tuple[float, bytes]] = collections.deque()
        self.stats = DelayStats()

    def offer(self, packet: bytes, now: float) -> bool:
        if self.loss and self._rng.random() < self.loss:
            self.stats.dropped += 1
            return False
        self._held.append((now + self.delay, packet))
        return True

    def due(self, now: float) -> list[bytes]:
        out = []
        while self._held and self._held[0][0] <= now:
            out.append(self._held.popleft()[1])
        self.stats.passed += len(out)
        return out

    def wait(self, now: float) -> float | None:
        if not self._held:
            return None
        return max(0.0, self._held[0][0] - now)

    def __len__(self) -> int:
        return len(self._held)


def tun_ifreq(name: str) -> bytes:
    """The ``struct ifreq`` of TUNSETIFF for a TUN device ``name`` without packet info."""
    encoded = name.encode()
    if not 0 < len(encoded) < IFNAMSIZ:
        raise ValueError(f"bad interface name {name!r}: 1-{IFNAMSIZ - 1} bytes")
    request = struct.pack(f"{IFNAMSIZ}sH", encoded, IFF_TUN | IFF_NO_PI)
    return request.ljust(IFREQ_SIZE, b"\0")


def open_tun(name: str) -> int:
    """Create TUN device ``name`` and return its file descriptor (non-blocking)."""
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, tun_ifreq(name))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_all(fd: int, line: DelayLine, now: float) -> None:
    """Offer every packet waiting in the device."""
    while True:
        try:
            packet = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        line.offer(packet, now)


def _write(fd: int, packet: bytes) -> None:
    try:
        os.write(fd, packet)
    except OSError as exc:
        # The kernel refusing one packet (no route any more, device going down) is a
        # lost packet, as on a wire; anything else ends the line.
        if exc.errno not in (errno.EINVAL, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EIO):
            raise
        log.debug("dropped a packet the kernel refused: %s", exc)


def serve(fd: int, line: DelayLine) -> None:
    """Run the delay line on ``fd`` until a signal ends the process."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        wait = line.wait(time.monotonic())
        # poll takes ms; round up so a packet is never sent before its time.
        events = poller.poll(None if wait is None else wait * 1000 + 1)
        now = time.monotonic()
        if events:
            _read_all(fd, line, now)
        for packet in line.due(now):
            _write(fd, packet)


class _Stop(Exception):
    pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", required=True, help="the TUN device to create")
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--loss-percent", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None, help="of the random drops")
    parser.add_argument("--stats", type=Path, help="write the counts here (JSON) at the end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    line = DelayLine(args.delay_ms / 1000, args.loss_percent / 100, random.Random(args.seed))
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        fd = open_tun(args.device)
    except OSError as exc:
        log.error("cannot create TUN device %s: %s", args.device, exc.strerror)
        return 1
    log.info("delay line on %s: %g ms, %g %% loss", args.device, args.delay_ms, args.loss_percent)
    try:
        serve(fd, line)
    except _Stop:
        pass
    finally:
        os.close(fd)
        line.stats.held = len(line)
        times = os.times()
        line.stats.cpu_s = round(times.user + times.system, 3)
        log.info("stopped: %s", asdict(line.stats))
        if args.stats:
            atomic_write(args.stats, json.dumps(asdict(line.stats)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
