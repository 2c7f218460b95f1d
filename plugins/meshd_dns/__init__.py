"""Standard DNS plugin: every member's name, from this node's own view.

Configuration (``[plugins.dns]``, every key optional)::

    zone = "lab.internal"        # default: <network>.internal (never under .local)
    directory = "/var/lib/meshd-dns"   # default: STATE_DIR/dns
    ttl = 10                     # seconds, of every record and of negative answers
    files = ["hosts", "zone", "corefile"]   # which files to write (default: all three)
    serve = false                # answer the zone on this node's mesh addresses (UDP)
    port = 53                    # ... on this port
    resolved = "auto"            # with serve: split DNS in systemd-resolved where it runs
    reload = ["knotc", "zone-reload", "lab.internal"]   # run after the files changed

After every pass that changed the mesh (``meshd_mesh_changed``) the plugin names
the members this node reaches (:func:`meshd_dns.records.hosts_of_view`), gives them
DNS labels (:mod:`meshd_dns.names`) and writes, when their content changed:
``hosts`` (CoreDNS ``hosts`` format), ``db.<zone>`` (an RFC 1035 zone file) and
``Corefile.meshd`` (a CoreDNS server block for them). ``meshd dns export`` prints
the same. The responder: :mod:`meshd_dns.responder`; split DNS:
:mod:`meshd_dns.resolved`. How to point a DNS server at the files: docs/dns.md.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from meshd import AgentAPI, ConfigError, ConfigView, IPAddress, MeshView, hookimpl
from meshd_dns.export import FILES, Exporter, load_zone, render
from meshd_dns.names import check_zone, zone_from_network
from meshd_dns.records import build_zone, hosts_of_view
from meshd_dns.resolved import resolved_running, set_split_dns

if TYPE_CHECKING:
    from meshd_dns.responder import Responder

log = logging.getLogger(__name__)

_KEYS = ("zone", "directory", "ttl", "files", "serve", "port", "resolved", "reload")
BIND_RETRY = 1.0  # seconds between tries to bind the responder (the address comes up late)
RELOAD_TIMEOUT = 10.0  # seconds a reload command may take
EXPORT_SETTLE = 0.5  # seconds the files lag a change of the mesh, at most once per burst


@dataclass(frozen=True)
class Settings:
    zone: str | None  # None: from the network's name, known once the agent runs
    directory: Path
    ttl: int = 10
    files: tuple[str, ...] = FILES
    serve: bool = False
    port: int = 53
    resolved: str = "auto"  # auto | on | off
    reload: tuple[str, ...] = ()  # argv run after the files changed (no shell)


def parse_settings(section: Mapping[str, Any], config: ConfigView) -> Settings:
    """``[plugins.dns]`` as :class:`Settings`; a bad value is a ConfigError naming the key."""

    def fail(key: str, why: str) -> ConfigError:
        return ConfigError(why, file=config.path, key=f"plugins.dns.{key}")

    for key in section:
        if key not in _KEYS:
            raise fail(key, f"unknown key (known keys: {', '.join(_KEYS)})")
    zone = section.get("zone")
    if zone is not None:
        if not isinstance(zone, str):
            raise fail("zone", 'must be a domain name, e.g. "mesh.internal"')
        why = check_zone(zone)
        if why:
            raise fail("zone", why)
        zone = zone.rstrip(".").lower()
    directory = section.get("directory", str(config.state_dir / "dns"))
    if not isinstance(directory, str) or not directory:
        raise fail("directory", "must be a directory path")
    ttl = section.get("ttl", 10)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 86400:
        raise fail("ttl", "must be a number of seconds, 0-86400")
    files = section.get("files", list(FILES))
    if not isinstance(files, list) or any(f not in FILES for f in files):
        raise fail("files", f"must be a list of: {', '.join(FILES)}")
    serve = section.get("serve", False)
    if not isinstance(serve, bool):
        raise fail("serve", "must be true or false")
    port = section.get("port", 53)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise fail("port", "must be a port number, 1-65535")
    resolved = section.get("resolved", "auto")
    if resolved not in ("auto", True, False):
        raise fail("resolved", 'must be "auto", true or false')
    reload = section.get("reload", [])
    if not isinstance(reload, list) or not all(isinstance(a, str) and a for a in reload):
        raise fail("reload", 'must be a command as a list of strings, e.g. ["knotc", "reload"]')
    return Settings(
        zone=zone,
        directory=Path(directory),
        ttl=ttl,
        files=tuple(dict.fromkeys(files)),
        serve=serve,
        port=port,
        resolved={True: "on", False: "off"}.get(resolved, "auto"),
        reload=tuple(reload),
    )


class DnsPlugin:
    """Settings, the exporter and the responder of one agent live in the object."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.state_dir: Path | None = None
        self.exporter: Exporter | None = None
        self.responder: Responder | None = None
        self._origin = ""
        self._own = ""
        self._pending: dict[str, tuple[IPAddress, ...]] | None = None
        self._view: tuple[MeshView, tuple[IPAddress, ...]] | None = None
        self._changed: asyncio.Event | None = None
        self._split_dns_on: str | None = None  # the interface resolved routes the zone on

    @hookimpl
    def meshd_configure(self, config: ConfigView) -> None:
        self.settings = parse_settings(config.section("dns"), config)
        self.state_dir = config.state_dir

    # --- the agent --------------------------------------------------------------

    @hookimpl
    def meshd_startup(self, agent: AgentAPI) -> None:
        settings = self.settings or parse_settings({}, agent.config)
        self._origin = settings.zone or zone_from_network(agent.network.name)
        self._own = agent.identity.name
        self.exporter = Exporter(agent.state_dir, settings.directory, settings.files)
        self._changed = asyncio.Event()
        if self.exporter.current is None or self.exporter.current.origin != self._origin:
            # Nothing written yet: this node at least (the first pass adds the others).
            self._pending = {self._own: agent.mesh_addresses}
            self._changed.set()
        agent.spawn(self._export(settings), name="dns-export")
        if settings.serve:
            agent.spawn(self._serve(agent, settings), name="dns-responder")

    @hookimpl
    def meshd_mesh_changed(self, agent: AgentAPI, view: MeshView) -> None:
        if self._changed is None:
            return
        # Named in the export task, a moment later: a join runs a pass on every node
        # at once, and naming 40 members there took CPU the other nodes' passes needed.
        self._view = (view, agent.mesh_addresses)
        self._changed.set()

    @hookimpl
    def meshd_shutdown(self, agent: AgentAPI) -> None:
        if self.responder is not None:
            self.responder.close()
            self.responder = None
        if self._split_dns_on is not None:
            # Sync and short: the agent's tasks are about to be cancelled.
            try:
                subprocess.run(
                    ["resolvectl", "revert", self._split_dns_on],
                    capture_output=True,
                    timeout=2,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("resolvectl revert %s: %s", self._split_dns_on, exc)
            self._split_dns_on = None

    async def _export(self, settings: Settings) -> None:
        assert self._changed is not None
        assert self.exporter is not None
        failing = False  # the first failure of a run is a warning, the rest debug
        while True:
            await self._changed.wait()
            await asyncio.sleep(EXPORT_SETTLE)  # one write for a burst of changes
            self._changed.clear()
            if self._view is not None:
                self._pending = hosts_of_view(*self._view)
                self._view = None
            named, self._pending = self._pending, None
            if named is None:
                continue
            zone = build_zone(self._origin, settings.ttl, self._own, named)
            try:
                written = self.exporter.update(zone)
            except Exception as exc:  # a full disk must not end the export for good
                level = logging.DEBUG if failing else logging.WARNING
                log.log(level, "DNS export to %s failed: %s", settings.directory, exc)
                failing = True
                continue
            failing = False
            if written and settings.reload:
                await _run_reload(settings.reload)
            if written:
                log.info(
                    "DNS: %d name(s) in %s, serial %d: wrote %s",
                    len(zone.hosts),
                    self._origin,
                    self.exporter.current.serial if self.exporter.current else 0,
                    ", ".join(p.name for p in written),
                )

    async def _serve(self, agent: AgentAPI, settings: Settings) -> None:
        assert self.exporter is not None
        # dnspython costs ~200 ms and 5 MiB of every meshd command: only when serving.
        from meshd_dns.responder import Responder

        exporter = self.exporter
        responder = Responder(lambda: exporter.current, agent.interface, settings.port)
        warned = False
        while True:
            try:
                responder.open(agent.mesh_addresses)
                break
            except OSError as exc:
                # The mesh address is not on the interface yet, or the port is taken.
                level = logging.DEBUG if warned else logging.WARNING
                log.log(level, "DNS responder on port %d: %s; trying again", settings.port, exc)
                warned = True
                await asyncio.sleep(BIND_RETRY)
        self.responder = responder
        log.info(
            "DNS responder for %s on %s port %d",
            self._origin,
            ", ".join(map(str, agent.mesh_addresses)),
            settings.port,
        )
        use_resolved = settings.resolved == "on" or (
            settings.resolved == "auto" and resolved_running()
        )
        if use_resolved and await set_split_dns(
            agent.interface, agent.mesh_addresses, self._origin, settings.port
        ):
            self._split_dns_on = agent.interface

    # --- the command line ---------------------------------------------------------

    @hookimpl
    def meshd_cli(self, group: click.Group) -> None:
        group.add_command(self._dns_group())

    def _dns_group(self) -> click.Group:
        plugin = self

        @click.group()
        def dns() -> None:
            """The mesh's names: DNS files for CoreDNS, knot, dnsmasq or /etc/hosts."""

        @dns.command("export")
        @click.option(
            "--format",
            "fmt",
            type=click.Choice(["hosts", "zone", "corefile"]),
            default="hosts",
            show_default=True,
            help="hosts: CoreDNS hosts / /etc/hosts lines; zone: an RFC 1035 zone file; "
            "corefile: a CoreDNS server block.",
        )
        def export(fmt: str) -> None:
            """Print the zone as the agent last wrote it (its files hold the same)."""
            if plugin.state_dir is None or plugin.settings is None:
                raise click.ClickException("the dns plugin was not configured")
            zone = load_zone(plugin.state_dir)
            if zone is None:
                raise click.ClickException(
                    f"no DNS export in {plugin.state_dir} yet: is the agent running "
                    "(with the dns plugin enabled)?"
                )
            settings = plugin.settings
            click.echo(render(fmt, zone, settings.directory, settings.files), nl=False)

        return dns


async def _run_reload(argv: tuple[str, ...]) -> None:
    """Tell a DNS server the files changed (a failure is logged: the files are written)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        log.warning("DNS reload command %s: %s", argv[0], exc)
        return
    try:
        async with asyncio.timeout(RELOAD_TIMEOUT):
            _out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        log.warning("DNS reload command %s took over %g s: killed", argv[0], RELOAD_TIMEOUT)
        return
    if process.returncode != 0:
        why = err.decode(errors="replace").strip()
        log.warning("DNS reload command %s failed (exit %s): %s", argv[0], process.returncode, why)


plugin = DnsPlugin()
"""What the ``meshd.plugins`` entry point registers."""
