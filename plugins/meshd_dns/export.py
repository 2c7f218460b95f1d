"""Writing the zone's files: atomically, only when they change, with a growing serial.

The last zone written is kept as JSON next to the node's state
(``STATE_DIR/dns-zone.json``): it carries the serial across restarts (the next one is
``max(last + 1, unix time)``, so it grows even when the file was lost) and is what
``meshd dns export`` prints from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from meshd import atomic_write
from meshd_dns.records import (
    Zone,
    render_corefile,
    render_hosts,
    render_zone,
    zone_from_json,
    zone_to_json,
)

log = logging.getLogger(__name__)

FILES = ("hosts", "zone", "corefile")
STATE_FILE = "dns-zone.json"
FILE_MODE = 0o644  # a DNS server running as its own user reads them


def file_name(kind: str, origin: str) -> str:
    return {"hosts": "hosts", "zone": f"db.{origin}", "corefile": "Corefile.meshd"}[kind]


def render(kind: str, zone: Zone, directory: Path, files: tuple[str, ...]) -> str:
    if kind == "hosts":
        return render_hosts(zone)
    if kind == "zone":
        return render_zone(zone)
    return render_corefile(zone, directory, hosts_file="hosts" in files)


def load_zone(state_dir: Path) -> Zone | None:
    """The zone last written, or None (never written, or unreadable: logged)."""
    path = state_dir / STATE_FILE
    try:
        return zone_from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


class Exporter:
    """Writes one node's zone files into ``directory``."""

    def __init__(
        self,
        state_dir: Path,
        directory: Path,
        files: tuple[str, ...],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = state_dir
        self.directory = directory
        self.files = files
        self._clock = clock
        self.current: Zone | None = load_zone(state_dir)

    def next_serial(self) -> int:
        last = self.current.serial if self.current is not None else 0
        return max(last + 1, int(self._clock())) % (1 << 32) or 1

    def update(self, zone: Zone) -> list[Path]:
        """Write ``zone`` (its serial is chosen here); returns the files that changed."""
        if zone.same_content(self.current):
            assert self.current is not None
            zone = self.current
        else:
            zone = dataclasses.replace(zone, serial=self.next_serial())
        self.directory.mkdir(parents=True, exist_ok=True)
        written = []
        for kind in self.files:
            path = self.directory / file_name(kind, zone.origin)
            text = render(kind, zone, self.directory, self.files)
            try:
                if path.read_text(encoding="utf-8") == text:
                    continue
            except (OSError, UnicodeDecodeError):
                pass  # missing or unreadable: write it
            atomic_write(path, text, mode=FILE_MODE)
            written.append(path)
        if zone is not self.current:
            atomic_write(self.state_dir / STATE_FILE, json.dumps(zone_to_json(zone)) + "\n")
            self.current = zone
        return written
