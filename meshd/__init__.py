"""meshd: a WireGuard mesh network with no server.

The public API for plugins is what this package exports, and a plugin imports
nothing else of meshd: ``hookimpl``, the errors a hook may raise
(``ConfigError``), the frozen dataclasses and protocols the hooks pass (from
:mod:`meshd.types`) and ``format_host_port`` for the endpoints a plugin
publishes. Everything else is the engine and may change.

Importing ``meshd`` stays cheap (the CLI imports it before it knows what it
will run): the types and helpers are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pluggy

from meshd.errors import ConfigError, MeshdError

if TYPE_CHECKING:
    from meshd.hostport import format_host_port
    from meshd.types import (
        Admission,
        AgentAPI,
        ConfigView,
        IPAddress,
        IPNetwork,
        Member,
        MemberState,
        MeshAddresses,
        MeshView,
        Network,
        NodeIdentity,
        NodeRecord,
        PathChoice,
        PeerConfig,
        PeerPatch,
        RecordExtras,
    )

__version__ = "0.1.0"

PROJECT = "meshd"
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "PROJECT",
    "Admission",
    "AgentAPI",
    "ConfigError",
    "ConfigView",
    "IPAddress",
    "IPNetwork",
    "Member",
    "MemberState",
    "MeshAddresses",
    "MeshView",
    "MeshdError",
    "Network",
    "NodeIdentity",
    "NodeRecord",
    "PathChoice",
    "PeerConfig",
    "PeerPatch",
    "RecordExtras",
    "__version__",
    "format_host_port",
    "hookimpl",
]
# Where each name loaded on first use lives; the rest of __all__ is in meshd.types.
_HOMES = {"format_host_port": "meshd.hostport"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'meshd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES.get(name, "meshd.types")), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
