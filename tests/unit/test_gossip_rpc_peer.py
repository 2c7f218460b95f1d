"""The RPC client sends its auth key only to the agent it means to talk to."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from meshd.errors import SerfConnectionError
from meshd.gossip.rpc import SerfClient
from meshd.procnet import listens


def test_no_byte_reaches_a_listener_that_is_not_our_agent() -> None:
    received: list[bytes] = []

    async def scenario() -> None:
        async def squatter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.append(await reader.read())
            writer.close()

        server = await asyncio.start_server(squatter, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        # The listener is this very process, so "is it pid 1's?" must say no.
        assert listens(os.getpid(), "127.0.0.1", port)
        client = SerfClient(
            f"127.0.0.1:{port}",
            auth_key="the-secret",
            stream=None,
            reconnect=False,
            verify_server=lambda: listens(1, "127.0.0.1", port),
        )
        with pytest.raises(SerfConnectionError, match="not served by our Serf agent"):
            await client.connect()
        await asyncio.sleep(0.2)
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
    assert received == [b""]


def test_listens_tells_the_owner_of_a_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert listens(os.getpid(), "127.0.0.1", port)
        assert not listens(os.getpid(), "127.0.0.1", port + 1 if port < 65535 else port - 1)
