"""meshd: a WireGuard mesh network with no server.

The public API for plugins is what this package exports, and a plugin imports
nothing else of meshd: ``hookimpl``, the errors a hook may raise
(``ConfigError``, ``GossipError``...), the frozen dataclasses and protocols the hooks pass (from
:mod:`meshd.types`), and ``format_host_port`` / ``parse_host_port`` (which
raises ``DecodeError``) for the endpoints a plugin publishes or reads,
``atomic_write`` for files other programs read, ``path_kind`` (direct, LAN,
relay or down, as ``meshd status --graph`` draws a pair), the mDNS face
(``Advert``, ``LanService``, ``MdnsError``, from :mod:`meshd.mdns`), and
``call_agent`` for a plugin's command-line commands to ask the running agent.
Everything else is the engine and may change.

Importing ``meshd`` stays cheap (the CLI imports it before it knows what it
will run): the types and helpers are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pluggy

from meshd.errors import ConfigError, DecodeError, GossipError, MeshdError, WireGuardError

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ loads them
    from meshd.control import call_agent as call_agent
    from meshd.graph import path_kind as path_kind
    from meshd.hostport import format_host_port as format_host_port
    from meshd.hostport import parse_host_port as parse_host_port
    from meshd.mdns import Advert as Advert
    from meshd.mdns import LanService as LanService
    from meshd.mdns import MdnsError as MdnsError
    from meshd.state import atomic_write as atomic_write
    from meshd.types import Admission as Admission
    from meshd.types import AgentAPI as AgentAPI
    from meshd.types import Client as Client
    from meshd.types import ConfigView as ConfigView
    from meshd.types import EngineStats as EngineStats
    from meshd.types import IPAddress as IPAddress
    from meshd.types import IPNetwork as IPNetwork
    from meshd.types import Member as Member
    from meshd.types import MemberState as MemberState
    from meshd.types import MeshAddresses as MeshAddresses
    from meshd.types import MeshView as MeshView
    from meshd.types import MetricSample as MetricSample
    from meshd.types import Network as Network
    from meshd.types import NodeIdentity as NodeIdentity
    from meshd.types import NodeRecord as NodeRecord
    from meshd.types import PathChoice as PathChoice
    from meshd.types import PeerConfig as PeerConfig
    from meshd.types import PeerPatch as PeerPatch
    from meshd.types import PeerStats as PeerStats
    from meshd.types import RecordExtras as RecordExtras

__version__ = "0.1.0"

PROJECT = "meshd"
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "PROJECT",
    "Admission",
    "Advert",
    "AgentAPI",
    "Client",
    "ConfigError",
    "ConfigView",
    "DecodeError",
    "EngineStats",
    "GossipError",
    "IPAddress",
    "IPNetwork",
    "LanService",
    "MdnsError",
    "Member",
    "MemberState",
    "MeshAddresses",
    "MeshView",
    "MeshdError",
    "MetricSample",
    "Network",
    "NodeIdentity",
    "NodeRecord",
    "PathChoice",
    "PeerConfig",
    "PeerPatch",
    "PeerStats",
    "RecordExtras",
    "WireGuardError",
    "__version__",
    "atomic_write",
    "call_agent",
    "format_host_port",
    "hookimpl",
    "parse_host_port",
    "path_kind",
]
# Where each name loaded on first use lives; the rest of __all__ is in meshd.types.
_HOMES = {
    "atomic_write": "meshd.state",
    "call_agent": "meshd.control",
    "format_host_port": "meshd.hostport",
    "parse_host_port": "meshd.hostport",
    "path_kind": "meshd.graph",
    "Advert": "meshd.mdns",
    "LanService": "meshd.mdns",
    "MdnsError": "meshd.mdns",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'meshd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES.get(name, "meshd.types")), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
