"""The plugin host: builds the plugin manager and calls hooks through a typed facade.

Order of construction, always the same: hook specs, then meshd's own standard
plugins, then every other installed ``meshd.plugins`` entry point, skipping the
names the config disables (they are blocked, so nothing can register them
later), then ``check_pending()`` so a misspelt hook fails at once. A plugin
that fails to import is recorded with its error and the rest still load.

Plugins are loaded only from installed entry points, never from a directory of
files: the daemon runs as root.
"""

from __future__ import annotations

import configparser
import dataclasses
import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from meshd import PROJECT, hookspecs
from meshd import types as t
from meshd.errors import ConfigError, MeshdError, PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "meshd.plugins"
STANDARD_DISTRIBUTION = "meshd"


@dataclass(frozen=True)
class PluginInfo:
    """One plugin as ``meshd plugins`` shows it."""

    name: str
    distribution: str
    version: str
    module: str
    standard: bool
    hooks: tuple[str, ...] = ()
    status: str = "loaded"  # loaded | disabled | failed
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hooks": list(self.hooks)}


@dataclass
class PluginHost:
    """The plugin manager plus what was loaded, skipped or failed, with typed hook calls."""

    pm: pluggy.PluginManager
    infos: list[PluginInfo] = field(default_factory=list)

    # -- introspection -------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        """Every plugin found: loaded ones with the hooks they implement, then the rest."""
        result = []
        for info in self.infos:
            if info.status != "loaded":
                result.append(info)
                continue
            plugin = self.pm.get_plugin(info.name)
            callers = (self.pm.get_hookcallers(plugin) or []) if plugin is not None else []
            hooks = tuple(sorted(caller.name for caller in callers))
            result.append(dataclasses.replace(info, hooks=hooks))
        return result

    # -- hook calls ------------------------------------------------------------

    def _impls(self, hook: str) -> Iterator[tuple[str, Callable[..., Any], list[str]]]:
        caller = getattr(self.pm.hook, hook)
        # pluggy calls the last-registered, tryfirst implementations first.
        for impl in reversed(caller.get_hookimpls()):
            yield impl.plugin_name, impl.function, list(impl.argnames)

    def _call_all(self, hook: str, *, isolate: bool, **kwargs: Any) -> list[Any]:
        results = []
        for plugin, function, argnames in self._impls(hook):
            try:
                value = function(**{name: kwargs[name] for name in argnames})
            except MeshdError:
                raise
            except Exception as exc:
                if not isolate:
                    raise PluginError(f"plugin {plugin!r} failed in {hook}: {exc}") from exc
                log.exception("plugin %r failed in %s; it is skipped this time", plugin, hook)
                continue
            if value is not None:
                results.append(value)
        return results

    def _call_first(self, hook: str, **kwargs: Any) -> Any:
        """A *firstresult* hook, called by pluggy: the first non-None answer wins.

        A plugin's MeshdError is raised as it is (IPAM's "no free address left" is
        what the user must read); any other exception becomes a PluginError naming
        the hook. The caller decides what a failure means (refuse, fall back).
        """
        try:
            return getattr(self.pm.hook, hook)(**kwargs)
        except MeshdError:
            raise
        except Exception as exc:
            raise PluginError(f"a plugin failed in {hook}: {type(exc).__name__}: {exc}") from exc

    def configure(self, config: t.ConfigView) -> None:
        """Let each plugin read its section; a plugin's ConfigError stops the command."""
        self._call_all("meshd_configure", isolate=False, config=config)

    def cli(self, group: Any) -> None:
        self._call_all("meshd_cli", isolate=True, group=group)

    def startup(self, agent: t.AgentAPI) -> None:
        self._call_all("meshd_startup", isolate=True, agent=agent)

    def shutdown(self, agent: t.AgentAPI) -> None:
        self._call_all("meshd_shutdown", isolate=True, agent=agent)

    def allocate_address(
        self, network: t.Network, node: t.NodeIdentity, taken: frozenset[Any]
    ) -> t.MeshAddresses | None:
        result: t.MeshAddresses | None = self._call_first(
            "meshd_allocate_address", network=network, node=node, taken=taken
        )
        return result

    def endpoint_candidates(self, agent: t.AgentAPI) -> tuple[str, ...]:
        merged: dict[str, None] = {}
        for answer in self._call_all("meshd_endpoint_candidates", isolate=True, agent=agent):
            merged.update(dict.fromkeys(answer))
        return tuple(merged)

    def node_record(self, agent: t.AgentAPI) -> t.RecordExtras:
        roles: set[str] = set()
        routes: dict[Any, None] = {}
        for extra in self._call_all("meshd_node_record", isolate=True, agent=agent):
            roles.update(extra.roles)
            routes.update(dict.fromkeys(extra.routes))
        healthy = [
            prefix
            for prefix in routes
            if False
            not in self._call_all("meshd_route_health", isolate=True, agent=agent, prefix=prefix)
        ]
        return t.RecordExtras(roles=frozenset(roles), routes=tuple(healthy))

    def admit_peer(self, agent: t.AgentAPI, member: t.Member) -> t.Admission | None:
        result: t.Admission | None = self._call_first(
            "meshd_admit_peer", agent=agent, member=member
        )
        return result

    def peer_config(self, agent: t.AgentAPI, member: t.Member, peer: t.PeerConfig) -> t.PeerConfig:
        patches: Sequence[t.PeerPatch] = self._call_all(
            "meshd_peer_config", isolate=True, agent=agent, member=member, peer=peer
        )
        allowed = dict.fromkeys(peer.allowed_ips)
        endpoint, keepalive = peer.endpoint, peer.keepalive
        for patch in patches:
            allowed.update(dict.fromkeys(patch.extra_allowed_ips))
            endpoint = patch.endpoint if patch.endpoint is not None else endpoint
            keepalive = patch.keepalive if patch.keepalive is not None else keepalive
        return t.PeerConfig(
            public_key=peer.public_key,
            allowed_ips=tuple(allowed),
            endpoint=endpoint,
            keepalive=keepalive,
            preshared_key=peer.preshared_key,
        )

    def peer_routes(
        self, agent: t.AgentAPI, members: Sequence[t.Member]
    ) -> dict[str, tuple[t.IPNetwork, ...]]:
        merged: dict[str, dict[t.IPNetwork, None]] = {}
        for answer in self._call_all(
            "meshd_peer_routes", isolate=True, agent=agent, members=tuple(members)
        ):
            for name, prefixes in answer.items():
                merged.setdefault(name, {}).update(dict.fromkeys(prefixes))
        return {name: tuple(prefixes) for name, prefixes in merged.items()}

    def extra_peers(self, agent: t.AgentAPI) -> tuple[t.PeerConfig, ...]:
        found: dict[str, t.PeerConfig] = {}
        for answer in self._call_all("meshd_extra_peers", isolate=True, agent=agent):
            for peer in answer:
                found.setdefault(peer.public_key, peer)
        return tuple(found.values())

    def select_path(self, agent: t.AgentAPI, member: t.Member) -> t.PathChoice:
        result: t.PathChoice | None = self._call_first(
            "meshd_select_path", agent=agent, member=member
        )
        return result or t.PathChoice()

    def mesh_changed(self, agent: t.AgentAPI, view: t.MeshView) -> None:
        self._call_all("meshd_mesh_changed", isolate=True, agent=agent, view=view)

    def metrics(self, agent: t.AgentAPI) -> tuple[t.MetricSample, ...]:
        answers = self._call_all("meshd_metrics", isolate=True, agent=agent)
        return tuple(sample for answer in answers for sample in answer)


@dataclass(frozen=True)
class PluginEntry:
    """One ``meshd.plugins`` entry point of an installed distribution."""

    name: str
    value: str  # "module" or "module:attribute.path", as the distribution declares it
    distribution: str
    version: str

    def load(self) -> object:
        module_name, _, attr = self.value.partition("[")[0].partition(":")
        found: object = importlib.import_module(module_name.strip())
        for part in filter(None, attr.strip().split(".")):
            found = getattr(found, part)
        return found


def _metadata_headers(dist_dir: Path) -> dict[str, str]:
    """Name and Version from a distribution's METADATA (PKG-INFO for an egg-info)."""
    headers: dict[str, str] = {}
    for file_name in ("METADATA", "PKG-INFO"):
        try:
            with open(dist_dir / file_name, encoding="utf-8") as file:
                for line in file:
                    if not line.strip():
                        break  # the headers end at the first blank line
                    key, sep, value = line.partition(":")
                    if sep and key in ("Name", "Version"):
                        headers.setdefault(key, value.strip())
        except OSError:
            continue
        break
    return headers


def _normalized(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _entry_points() -> list[PluginEntry]:
    """Every installed ``meshd.plugins`` entry point, standard ones first, then by name.

    A direct read of ``*.dist-info/entry_points.txt`` in the directories on
    ``sys.path`` (zipped eggs are not looked in): the same files
    ``importlib.metadata`` reads, without its imports and its parse of every
    distribution's metadata, ~25 ms of each start-up of ``meshd join`` and the agent.
    As there, the first distribution of a name on ``sys.path`` wins.
    """
    seen_dists: set[str] = set()
    found: list[PluginEntry] = []
    for entry in sys.path:
        directory = Path(entry or ".")
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for dir_name in names:
            if not dir_name.endswith((".dist-info", ".egg-info")):
                continue
            dist_dir = directory / dir_name
            key = _normalized(dir_name.rpartition(".")[0].partition("-")[0])
            if key in seen_dists:
                continue
            seen_dists.add(key)
            try:
                text = (dist_dir / "entry_points.txt").read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if f"[{ENTRY_POINT_GROUP}]" not in text:
                continue
            parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
            parser.optionxform = str  # type: ignore[assignment,method-assign]
            try:
                parser.read_string(text)
            except configparser.Error as exc:
                log.warning("ignored the entry points of %s: %s", dist_dir, exc)
                continue
            headers = _metadata_headers(dist_dir)
            found.extend(
                PluginEntry(
                    name=name,
                    value=value,
                    distribution=headers.get("Name", key),
                    version=headers.get("Version", "?"),
                )
                for name, value in parser.items(ENTRY_POINT_GROUP)
            )
    # Standard plugins first, then the rest by name: a stable, documented order.
    return sorted(found, key=lambda ep: (ep.distribution != STANDARD_DISTRIBUTION, ep.name))


def build_plugin_host(
    disabled: Iterable[str] = (),
    *,
    extra_plugins: Sequence[tuple[str, object]] = (),
) -> PluginHost:
    """Build the plugin manager in its fixed order.

    ``extra_plugins`` (name, object) are registered after the entry points;
    the engine uses it for nothing, tests and embedders may.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    host = PluginHost(pm)
    disabled_set = set(disabled)
    seen: set[str] = set()
    for ep in _entry_points():
        dist, version = ep.distribution, ep.version
        standard = dist == STANDARD_DISTRIBUTION
        base = functools.partial(
            PluginInfo, name=ep.name, distribution=dist, version=version, standard=standard
        )
        if ep.name in seen:
            log.warning("plugin name %r is registered twice; keeping the first", ep.name)
            continue
        seen.add(ep.name)
        if ep.name in disabled_set:
            pm.set_blocked(ep.name)
            host.infos.append(base(module=ep.value, status="disabled"))
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            log.warning("plugin %r (%s) failed to load: %s", ep.name, dist, exc)
            host.infos.append(
                base(module=ep.value, status="failed", error=f"{type(exc).__name__}: {exc}")
            )
            continue
        host.infos.append(base(module=ep.value))
    for name, plugin in extra_plugins:
        if name in disabled_set:
            continue
        pm.register(plugin, name=name)
        host.infos.append(
            PluginInfo(
                name=name, distribution="-", version="-", module=repr(plugin), standard=False
            )
        )
    for name in sorted(disabled_set - seen):
        log.warning("plugins.disable names %r, which is not installed", name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    return host


def load_plugins(config_view: t.ConfigView, disabled: Iterable[str]) -> PluginHost:
    """Build the host and let every plugin configure itself."""
    host = build_plugin_host(disabled)
    try:
        host.configure(config_view)
    except ConfigError:
        raise
    return host
