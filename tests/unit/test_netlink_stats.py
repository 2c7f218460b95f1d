"""The packet counter the re-join watch reads (meshd.netlink), on the real loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest

from meshd.errors import NetlinkError
from meshd.netlink import Netlink


def test_the_received_packet_counter_counts_packets() -> None:
    async def scenario() -> tuple[int, int]:
        async with Netlink() as nl:
            before = await nl.received_packets("lo")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for _ in range(3):
                    sock.sendto(b"x", ("127.0.0.1", 9))  # discard: nobody needs to listen
            return before, await nl.received_packets("lo")

    before, after = asyncio.run(scenario())
    # Other processes may use loopback too: at least our three.
    assert after - before >= 3


def test_a_missing_interface_is_a_netlink_error() -> None:
    async def scenario() -> None:
        async with Netlink() as nl:
            await nl.received_packets("meshd-no-such0")

    with pytest.raises(NetlinkError, match="meshd-no-such0"):
        asyncio.run(scenario())
