"""The kernel backend's translation of peer ops into pyroute2's WireGuard peer dicts.

The backend itself runs only where the kernel module exists (see the skipped
integration test); what it sends is checked here, without root.
"""

from __future__ import annotations

from meshd.b64 import encode_b64
from meshd.wireguard.backend import ZERO_KEY, OpKind, PeerOp
from meshd.wireguard.kernel import _key_text, _peer_dict
from tests.unit.conftest import add_with_every_field

KEY = encode_b64(b"\x07" * 32)


def test_add_carries_every_field_and_replaces_allowed_ips():
    assert _peer_dict(add_with_every_field(KEY, ZERO_KEY)) == {
        "public_key": KEY,
        "preshared_key": ZERO_KEY,
        "endpoint_addr": "fd00::9",
        "endpoint_port": 51820,
        "persistent_keepalive": 25,
        "replace_allowed_ips": True,
        "allowed_ips": ["100.64.0.2/32"],
    }


def test_update_is_update_only_and_sparse():
    assert _peer_dict(PeerOp(OpKind.UPDATE, KEY, keepalive=0)) == {
        "public_key": KEY,
        "update_only": True,
        "persistent_keepalive": 0,
    }


def test_update_to_no_allowed_ips_still_replaces_them():
    assert _peer_dict(PeerOp(OpKind.UPDATE, KEY, allowed_ips=()))["allowed_ips"] == []


def test_remove():
    assert _peer_dict(PeerOp(OpKind.REMOVE, KEY)) == {"public_key": KEY, "remove": True}


def test_keys_come_back_as_base64_whatever_pyroute2_hands_over():
    raw = b"\x07" * 32
    assert _key_text(raw) == KEY
    assert _key_text(KEY.encode()) == KEY
    assert _key_text({"value": KEY.encode(), "key": raw}) == KEY
    assert _key_text(None) is None
