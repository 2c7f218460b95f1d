"""meshd: a WireGuard mesh network with no server.

The public API for plugins is what this package exports: ``hookimpl`` and the
frozen dataclasses in :mod:`meshd.types`. Everything else is the engine.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT = "meshd"
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "__version__", "hookimpl"]
