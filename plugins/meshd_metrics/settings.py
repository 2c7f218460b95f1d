"""The ``[plugins.metrics]`` table: where to serve, or which file to write.

::

    [plugins.metrics]
    listen = "127.0.0.1:9477"            # or a list: ["127.0.0.1:9477", "mesh:9477"]
    mesh_page = false                    # the page and its JSON on mesh listeners too
    textfile = "/var/lib/node_exporter/meshd.prom"   # node_exporter's textfile format
    interval = 15                        # seconds between textfile writes

``listen`` takes loopback addresses (``127.0.0.1``, ``[::1]``, ``localhost``) and
this node's mesh addresses: ``mesh:PORT`` binds every one of them, or name one
literally (checked against the node's addresses when the agent starts). Any other
address is refused: the metrics and the page describe the whole mesh and are not
for the underlay. On loopback the server answers ``/metrics``, ``/`` (the page)
and ``/mesh.json``; on the mesh only ``/metrics`` unless ``mesh_page = true``.

An empty table means ``listen = "127.0.0.1:9477"``; no table, no metrics.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd import ConfigError, DecodeError, parse_host_port

DEFAULT_LISTEN = "127.0.0.1:9477"
DEFAULT_INTERVAL = 15.0
MESH = "mesh"
_KEYS = ("listen", "mesh_page", "textfile", "interval")


@dataclass(frozen=True)
class Listener:
    """One address to serve on: ``host`` is an IP address, or ``MESH`` for every mesh address."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return self.host != MESH and ipaddress.ip_address(self.host).is_loopback


@dataclass(frozen=True)
class Settings:
    listen: tuple[Listener, ...] = ()
    mesh_page: bool = False
    textfile: Path | None = None
    interval: float = DEFAULT_INTERVAL

    @property
    def enabled(self) -> bool:
        return bool(self.listen) or self.textfile is not None


def parse_listener(text: str) -> Listener:
    """A ``listen`` entry; ValueError saying what is accepted when it is not."""
    try:
        host, port = parse_host_port(text)
    except DecodeError as exc:
        raise ValueError(f"{exc}: write HOST:PORT, e.g. {DEFAULT_LISTEN} or mesh:9477") from exc
    if host == MESH:
        return Listener(MESH, port)
    if host == "localhost":
        return Listener("127.0.0.1", port)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{text!r}: the host must be an IP address, 'localhost' or 'mesh'"
        ) from None
    if address.is_unspecified or address.is_multicast:
        raise ValueError(
            f"{text!r}: metrics listen on loopback or on this node's mesh address only "
            "(use mesh:PORT for the mesh address)"
        )
    return Listener(str(address), port)


def parse_settings(section: Mapping[str, Any], file: str | None) -> Settings:
    """The table as :class:`Settings`; ConfigError naming the key when a value is wrong."""
    for key in section:
        if key not in _KEYS:
            raise ConfigError(
                f"unknown key (known keys: {', '.join(_KEYS)})",
                file=file,
                key=f"plugins.metrics.{key}",
            )

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(why, file=file, key=f"plugins.metrics.{key}")

    raw = section.get("listen", DEFAULT_LISTEN if "textfile" not in section else [])
    entries = [raw] if isinstance(raw, str) else raw
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise bad("listen", "must be HOST:PORT or a list of them")
    try:
        listen = tuple(parse_listener(e) for e in entries)
    except ValueError as exc:
        raise bad("listen", str(exc)) from None
    mesh_page = section.get("mesh_page", False)
    if not isinstance(mesh_page, bool):
        raise bad("mesh_page", "must be true or false")
    textfile = section.get("textfile")
    if textfile is not None and (not isinstance(textfile, str) or not textfile):
        raise bad("textfile", "must be a file path")
    interval = section.get("interval", DEFAULT_INTERVAL)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise bad("interval", "must be a positive number of seconds")
    return Settings(
        listen=listen,
        mesh_page=mesh_page,
        textfile=Path(textfile) if textfile else None,
        interval=float(interval),
    )


def check_addresses(listen: tuple[Listener, ...], mesh: tuple[Any, ...]) -> None:
    """ValueError when a literal non-loopback address is not one of this node's mesh addresses."""
    own = {str(a) for a in mesh}
    for listener in listen:
        if listener.host != MESH and not listener.loopback and listener.host not in own:
            raise ValueError(
                f"{listener.host}: metrics listen on loopback or on this node's mesh "
                f"address only ({', '.join(sorted(own)) or 'none yet'}; or write mesh:PORT)"
            )
