"""Helpers shared by the unit tests."""

from __future__ import annotations

import ipaddress

from meshd.wireguard.backend import OpKind, PeerOp


def add_with_every_field(public_key: str, preshared_key: str) -> PeerOp:
    """An ADD that sets every field, as each backend's encoder must carry it.

    The endpoint is written un-compressed (``fd00::0:9``): the encoders send ``fd00::9``.
    """
    return PeerOp(
        OpKind.ADD,
        public_key,
        endpoint="[fd00::0:9]:51820",
        keepalive=25,
        preshared_key=preshared_key,
        allowed_ips=(ipaddress.ip_network("100.64.0.2/32"),),
    )
