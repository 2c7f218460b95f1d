"""The WireGuard data plane: backends, reconcile and the mesh interface.

Public API (what the agent uses):

* :class:`~meshd.wireguard.interface.InterfaceSpec` /
  :class:`~meshd.wireguard.interface.WireGuardInterface` (``open``, ``reconcile``,
  ``peer_stats``, ``state``, ``supervise``, ``close``) and
  :class:`~meshd.wireguard.interface.ReconcileResult`;
* :func:`~meshd.wireguard.reconcile.plan_peers` /
  :func:`~meshd.wireguard.reconcile.plan_routes`: the pure diff, and
  :class:`~meshd.wireguard.reconcile.AppliedPeers`, the record of a pass that lets
  the next one plan without reading the device (a full check re-reads it now and then);
* in :mod:`meshd.wireguard.backend`: the values ``PeerState``, ``DeviceState``,
  ``PeerOp`` and the ``WireGuardBackend`` protocol.
"""

from meshd.wireguard.interface import (
    InterfaceSpec,
    ReconcileResult,
    WireGuardInterface,
    start_backend,
)
from meshd.wireguard.reconcile import RoutePlan, plan_peers, plan_routes

__all__ = [
    "InterfaceSpec",
    "ReconcileResult",
    "RoutePlan",
    "WireGuardInterface",
    "plan_peers",
    "plan_routes",
    "start_backend",
]
