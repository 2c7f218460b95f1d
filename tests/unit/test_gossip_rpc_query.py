"""A query's records as a Serf agent sends them, phantom ones included.

Serf (cmd/serf/command/agent/ipc_query_response_stream.go) closes a query's ack and
response channels at its deadline while its RPC stream still selects on them until
its own timer sends 'done': the closed channels yield records from "" with no
payload. Seen once in a loaded CI run (test_gossip: a response from '' beside n2's).
Here a scripted agent sends exactly that byte stream.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack

from meshd.gossip.rpc import SerfClient


async def _scripted_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    unpacker = msgpack.Unpacker(raw=False)

    async def next_object() -> Any:
        while True:
            for obj in unpacker:
                return obj
            chunk = await reader.read(65536)
            if not chunk:
                raise EOFError
            unpacker.feed(chunk)

    def send(*objects: object) -> None:
        writer.write(b"".join(msgpack.packb(o, use_bin_type=True) for o in objects))

    try:
        while True:
            header = await next_object()
            seq, command = header["Seq"], header["Command"]
            await next_object()  # every command the client sends here has a body
            ok = {"Seq": seq, "Error": ""}
            if command == "query":
                send(ok)
                send(ok, {"Type": "ack", "From": "n2", "Payload": None})
                send(ok, {"Type": "response", "From": "n2", "Payload": b"pong:42"})
                # The channels closed at the deadline, read again before 'done':
                send(ok, {"Type": "ack", "From": "", "Payload": None})
                send(ok, {"Type": "response", "From": "", "Payload": None})
                send(ok, {"Type": "response", "From": "", "Payload": None})
                send(ok, {"Type": "done", "From": "", "Payload": None})
            else:
                send(ok)
            await writer.drain()
    except (EOFError, ConnectionError):
        writer.close()


def test_records_from_no_node_after_the_deadline_are_not_answers() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(_scripted_agent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = SerfClient(f"127.0.0.1:{port}", stream=None, reconnect=False)
        try:
            await client.connect()
            result = await client.query("ping", b"42", filter_nodes=["n2"], request_ack=True)
        finally:
            await client.close()
            server.close()
            await server.wait_closed()
        assert result.acks == ("n2",)
        assert result.responses == {"n2": b"pong:42"}

    asyncio.run(asyncio.wait_for(scenario(), 10))
