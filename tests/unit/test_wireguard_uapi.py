"""The UAPI text codec: ``get=1`` answers parse into the state they describe; ``set=1`` is exact."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.b64 import decode_b64, encode_b64
from meshd.errors import WireGuardError
from meshd.hostport import format_host_port
from meshd.identity import WireGuardKeyPair
from meshd.wireguard.backend import ZERO_KEY, DeviceConfig, OpKind, PeerOp, PeerState
from meshd.wireguard.uapi import encode_set, parse_errno, parse_get
from tests.unit.conftest import add_with_every_field

PRIVATE = WireGuardKeyPair.generate()
PEER = WireGuardKeyPair.generate().public_key
PSK = encode_b64(b"\x42" * 32)


def hexkey(key: str) -> str:
    return decode_b64(key).hex()


SAMPLE = f"""private_key={hexkey(PRIVATE.private_key)}
listen_port=51820
public_key={hexkey(PEER)}
preshared_key={"00" * 32}
protocol_version=1
endpoint=198.18.0.2:51820
last_handshake_time_sec=1795672377
last_handshake_time_nsec=155652800
tx_bytes=400
rx_bytes=308
persistent_keepalive_interval=25
allowed_ip=100.64.0.2/32
allowed_ip=10.9.0.0/24
errno=0
"""


def test_a_get_answer_parses_into_device_and_peer_state():
    state = parse_get(SAMPLE)
    assert state.public_key == PRIVATE.public_key
    assert state.listen_port == 51820
    (peer,) = state.peers
    assert peer == PeerState(
        public_key=PEER,
        endpoint="198.18.0.2:51820",
        allowed_ips=(ipaddress.ip_network("10.9.0.0/24"), ipaddress.ip_network("100.64.0.2/32")),
        keepalive=25,
        preshared_key=None,
        last_handshake=pytest.approx(1795672377.1556528),
        rx_bytes=308,
        tx_bytes=400,
    )


def test_a_get_answer_without_handshake_has_none():
    text = f"listen_port=1\npublic_key={hexkey(PEER)}\nlast_handshake_time_sec=0\nerrno=0\n"
    assert parse_get(text).peers[0].last_handshake is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen_port=1\nerrno=2\n", "errno 2"),
        ("listen_port=1\n", "without errno"),
        ("listen_port=x\nerrno=0\n", "not a number"),
        ("public_key=zz\nerrno=0\n", "not hex"),
        (f"public_key={'ab' * 31}\nerrno=0\n", "31 bytes"),
        (f"public_key={'ab' * 32}\nallowed_ip=300.1.1.1/32\nerrno=0\n", "not a prefix"),
        ("garbage\n", "malformed line"),
    ],
)
def test_bad_get_answers_are_refused(text, message):
    with pytest.raises(WireGuardError, match=message):
        parse_get(text)


def render_get(peers: list[PeerState], listen_port: int) -> str:
    """A get=1 answer as wireguard-go writes it (the test's independent encoder)."""
    lines = [f"private_key={hexkey(PRIVATE.private_key)}", f"listen_port={listen_port}"]
    for p in peers:
        lines.append(f"public_key={hexkey(p.public_key)}")
        lines.append(f"preshared_key={hexkey(p.preshared_key or ZERO_KEY)}")
        lines.append("protocol_version=1")
        if p.endpoint:
            lines.append(f"endpoint={p.endpoint}")
        sec = int(p.last_handshake or 0)
        lines.append(f"last_handshake_time_sec={sec}")
        lines.append("last_handshake_time_nsec=0")
        lines.append(f"tx_bytes={p.tx_bytes}")
        lines.append(f"rx_bytes={p.rx_bytes}")
        lines.append(f"persistent_keepalive_interval={p.keepalive or 0}")
        lines.extend(f"allowed_ip={n.with_prefixlen}" for n in p.allowed_ips)
    lines.append("errno=0")
    return "\n".join(lines) + "\n"


keys = st.binary(min_size=32, max_size=32).map(lambda raw: encode_b64(raw))
networks = st.one_of(
    st.builds(
        ipaddress.IPv4Network,
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)),
        strict=st.just(False),
    ),
    st.builds(
        ipaddress.IPv6Network,
        st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)),
        strict=st.just(False),
    ),
)
endpoints = st.builds(format_host_port, st.ip_addresses(), st.integers(1, 65535))
peer_states = st.builds(
    PeerState,
    public_key=keys,
    endpoint=st.none() | endpoints,
    allowed_ips=st.sets(networks, max_size=5).map(
        lambda nets: tuple(
            sorted(nets, key=lambda n: (n.version, n.network_address.packed, n.prefixlen))
        )
    ),
    keepalive=st.none() | st.integers(1, 65535),
    preshared_key=st.none() | keys.filter(lambda k: k != ZERO_KEY),
    last_handshake=st.none() | st.integers(1, 2**40).map(float),
    rx_bytes=st.integers(0, 2**64 - 1),
    tx_bytes=st.integers(0, 2**64 - 1),
)


@given(
    peers=st.lists(peer_states, max_size=6, unique_by=lambda p: p.public_key),
    port=st.integers(0, 65535),
)
def test_parse_get_reads_back_every_field(peers, port):
    state = parse_get(render_get(peers, port))
    assert state.listen_port == port
    assert list(state.peers) == peers


def test_set_carries_device_then_peers_and_never_replaces_all_peers():
    add = add_with_every_field(PEER, PSK)
    text = encode_set(DeviceConfig(PRIVATE.private_key, 51820), [add]).decode()
    assert text == (
        f"set=1\nprivate_key={hexkey(PRIVATE.private_key)}\nlisten_port=51820\n"
        f"public_key={hexkey(PEER)}\npreshared_key={'42' * 32}\nendpoint=[fd00::9]:51820\n"
        "persistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
        "allowed_ip=100.64.0.2/32\n\n"
    )


def test_set_update_is_update_only_and_touches_only_the_given_fields():
    text = encode_set(None, [PeerOp(OpKind.UPDATE, PEER, keepalive=0)]).decode()
    assert (
        text == f"set=1\npublic_key={hexkey(PEER)}\nupdate_only=true\n"
        "persistent_keepalive_interval=0\n\n"
    )


def test_set_remove():
    text = encode_set(None, [PeerOp(OpKind.REMOVE, PEER)]).decode()
    assert text == f"set=1\npublic_key={hexkey(PEER)}\nremove=true\n\n"


def test_errno_of_a_set_answer():
    assert parse_errno("errno=0\n") == 0
    assert parse_errno("errno=1\n") == 1
    with pytest.raises(WireGuardError, match="without errno"):
        parse_errno("")


def test_a_missing_wireguard_go_is_named(tmp_path):
    import asyncio

    from meshd.wireguard.userspace import UserspaceBackend

    backend = UserspaceBackend(
        "mdmissing0", binary="wireguard-go-not-installed", socket_dir=tmp_path
    )
    with pytest.raises(WireGuardError, match="wireguard-go-not-installed not found: install it"):
        asyncio.run(backend.start())
