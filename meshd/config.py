"""meshd's TOML configuration: frozen dataclasses with defaults, strict loading.

Where it comes from, highest first: command-line flags (``--config``,
``--state-dir``), the environment (``MESHD_CONFIG``, ``MESHD_STATE_DIR``), the
file (``/etc/meshd/meshd.toml``), the defaults below. A missing file at the
default path means "all defaults"; a missing file someone named is an error.
Unknown keys and bad values are refused with the file, the key and the reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshd.errors import ConfigError, DecodeError
from meshd.hostport import parse_ip_port
from meshd.types import ConfigView

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/meshd/meshd.toml")
DEFAULT_STATE_DIR = Path("/var/lib/meshd")
ENV_CONFIG = "MESHD_CONFIG"
ENV_STATE_DIR = "MESHD_STATE_DIR"

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

Check = Callable[[Any], str | None]


def _port(value: Any) -> str | None:
    return None if 1 <= value <= 65535 else "must be a port number from 1 to 65535"


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _node_name(value: Any) -> str | None:
    if _NAME_RE.fullmatch(value):
        return None
    return "must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"


def _ifname(value: Any) -> str | None:
    return None if _IFNAME_RE.fullmatch(value) else "must be 1-15 letters, digits, '_', '.' or '-'"


def _mtu(value: Any) -> str | None:
    return None if 1280 <= value <= 9000 else "must be from 1280 to 9000"


def _keepalive(value: Any) -> str | None:
    return None if 0 <= value <= 65535 else "must be from 0 (off) to 65535 seconds"


def _loopback_addr(value: Any) -> str | None:
    try:
        address, _ = parse_ip_port(value)
    except DecodeError:
        return "must be a loopback IP address and port, HOST:PORT, e.g. 127.0.0.1:7373"
    if not address.is_loopback:
        return "must be a loopback address (the RPC port must never face a network)"
    return None


def _check(fn: Check) -> dict[str, Check]:
    return {"check": fn}


def default_node_name() -> str:
    """The host name, lowered and cut to a DNS label, as the default node name."""
    label = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return label[:63] or "node"


@dataclass(frozen=True)
class NodeSection:
    name: str = field(default_factory=default_node_name, metadata=_check(_node_name))
    state_dir: Path = DEFAULT_STATE_DIR


@dataclass(frozen=True)
class WireGuardSection:
    interface: str = field(default="meshd0", metadata=_check(_ifname))
    port: int = field(default=51820, metadata=_check(_port))
    backend: str = field(default="auto", metadata=_check(_one_of("auto", "kernel", "userspace")))
    mtu: int = field(default=1420, metadata=_check(_mtu))
    keepalive: int = field(default=25, metadata=_check(_keepalive))


@dataclass(frozen=True)
class GossipSection:
    port: int = field(default=7946, metadata=_check(_port))
    rpc_addr: str = field(default="127.0.0.1:7373", metadata=_check(_loopback_addr))
    profile: str = field(default="lan", metadata=_check(_one_of("lan", "wan", "local")))
    serf_binary: str = "serf"


@dataclass(frozen=True)
class EnrolSection:
    enabled: bool = True
    port: int = field(default=51821, metadata=_check(_port))


@dataclass(frozen=True)
class LogSection:
    level: str = field(
        default="info", metadata=_check(_one_of("debug", "info", "warning", "error"))
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``plugin_sections`` holds each ``[plugins.NAME]`` table."""

    path: Path | None = None
    node: NodeSection = field(default_factory=NodeSection)
    wireguard: WireGuardSection = field(default_factory=WireGuardSection)
    gossip: GossipSection = field(default_factory=GossipSection)
    enrol: EnrolSection = field(default_factory=EnrolSection)
    log: LogSection = field(default_factory=LogSection)
    disabled_plugins: tuple[str, ...] = ()
    plugin_sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.node.state_dir

    def view(self) -> ConfigView:
        """What plugins see of the configuration."""
        return ConfigView(
            path=str(self.path) if self.path else None,
            node_name=self.node.name,
            state_dir=self.node.state_dir,
            sections=self.plugin_sections,
        )


_SECTIONS: dict[str, type[Any]] = {
    "node": NodeSection,
    "wireguard": WireGuardSection,
    "gossip": GossipSection,
    "enrol": EnrolSection,
    "log": LogSection,
}


def _type_name(tp: Any) -> str:
    return {int: "an integer", str: "a string", bool: "true or false", Path: "a path"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, *, file: str | None, key: str) -> Any:
    # bool is an int in Python; TOML keeps them apart, and so do we.
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError("must be a non-empty path string", file=file, key=key)
        return Path(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"must be {_type_name(int)}, not {value!r}", file=file, key=key)
    if tp in (str, bool) and type(value) is not tp:
        raise ConfigError(f"must be {_type_name(tp)}, not {value!r}", file=file, key=key)
    return value


def _build_section(
    cls: type[Any], table: Any, *, file: str | None, section: str, overrides: Mapping[str, Any]
) -> Any:
    if not isinstance(table, dict):
        raise ConfigError("must be a table", file=file, key=section)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, raw in table.items():
        key = f"{section}.{name}"
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key (known keys: {known})", file=file, key=key)
        value = _convert(raw, hints[name], file=file, key=key)
        check = fields[name].metadata.get("check")
        reason = check(value) if check else None
        if reason:
            raise ConfigError(f"{reason}, not {raw!r}", file=file, key=key)
        values[name] = value
    values.update(overrides)
    return cls(**values)


def _read_plugins(table: Any, *, file: str | None) -> tuple[tuple[str, ...], dict[str, Any]]:
    if not isinstance(table, dict):
        raise ConfigError("must be a table", file=file, key="plugins")
    disabled: tuple[str, ...] = ()
    sections: dict[str, Any] = {}
    for name, value in table.items():
        if name == "disable":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(
                    "must be a list of plugin names", file=file, key="plugins.disable"
                )
            disabled = tuple(value)
        elif isinstance(value, dict):
            sections[name] = types.MappingProxyType(dict(value))
        else:
            raise ConfigError(
                "unknown key: [plugins] holds 'disable' and one [plugins.NAME] table per plugin",
                file=file,
                key=f"plugins.{name}",
            )
    return disabled, sections


def parse(text: str, *, path: Path | None = None, state_dir: Path | None = None) -> Config:
    """Build a Config from TOML text; ``state_dir`` (from a flag or env) wins over the file."""
    file = str(path) if path else None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=file) from exc
    sections: dict[str, Any] = {}
    for name, _table in data.items():
        if name == "plugins":
            continue
        if name not in _SECTIONS:
            known = ", ".join([*_SECTIONS, "plugins"])
            raise ConfigError(f"unknown section (known sections: {known})", file=file, key=name)
    for name, cls in _SECTIONS.items():
        overrides = {"state_dir": state_dir} if name == "node" and state_dir else {}
        sections[name] = _build_section(
            cls, data.get(name, {}), file=file, section=name, overrides=overrides
        )
    disabled, plugin_sections = _read_plugins(data.get("plugins", {}), file=file)
    return Config(
        path=path,
        disabled_plugins=disabled,
        plugin_sections=types.MappingProxyType(plugin_sections),
        **sections,
    )


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Config:
    """Load the configuration, honouring flags first, then the environment, then defaults."""
    named = path if path is not None else environ.get(ENV_CONFIG) or None
    config_path = Path(named) if named else DEFAULT_CONFIG_PATH
    state = state_dir if state_dir is not None else environ.get(ENV_STATE_DIR) or None
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if named:
            raise ConfigError("no such file", file=str(config_path)) from None
        text = ""
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=str(config_path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("not UTF-8 text", file=str(config_path)) from exc
    return parse(text, path=config_path, state_dir=Path(state) if state else None)


def reload_plugin_sections(config: Config) -> Config:
    """``config`` with its ``[plugins.*]`` tables read again from its file (SIGHUP);
    ConfigError when the file is now invalid, so the caller keeps the old one."""
    if config.path is None:
        return config
    fresh = load(config.path, state_dir=config.state_dir)
    return dataclasses.replace(config, plugin_sections=fresh.plugin_sections)
