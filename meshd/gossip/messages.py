"""The values the Serf RPC client hands out, and how they are read from msgpack bodies.

:class:`SerfMember`, the events of a stream (:class:`MemberEvent`, :class:`UserEvent`,
:class:`QueryEvent`, :class:`StreamGap`), :class:`QueryResult`, :class:`KeyResponse`,
:class:`Coordinate`, and :class:`SerfRPC`, the protocol the rest of meshd types
against (the client in :mod:`meshd.gossip.rpc` implements it; tests script it).
The ``decode_*`` functions turn a reply body into those values; bodies come from
the agent as msgpack maps with string keys and bytes for ``Addr`` and payloads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from typing import Any, Literal, Protocol

from meshd.errors import SerfCommandError
from meshd.hostport import format_host_port


@dataclass(frozen=True)
class SerfMember:
    """One member as the agent lists it. ``status``: alive, leaving, left, failed (or none)."""

    name: str
    addr: str
    port: int
    tags: Mapping[str, str]
    status: str

    @property
    def gossip_addr(self) -> str:
        return format_host_port(self.addr, self.port)


@dataclass(frozen=True)
class MemberEvent:
    """member-join, member-leave, member-failed, member-update or member-reap."""

    kind: str
    members: tuple[SerfMember, ...]


@dataclass(frozen=True)
class UserEvent:
    name: str
    payload: bytes
    ltime: int
    coalesce: bool


@dataclass(frozen=True)
class QueryEvent:
    """A query addressed to this node: answer it with :meth:`SerfClient.respond` (same client)."""

    id: int
    name: str
    payload: bytes
    ltime: int


@dataclass(frozen=True)
class StreamGap:
    """Events were lost (``reconnected`` or ``overflow``): re-read the membership."""

    reason: str


SerfEvent = MemberEvent | UserEvent | QueryEvent | StreamGap
LogHandler = Callable[[str], None]


@dataclass(frozen=True)
class QueryResult:
    """What came back for a query: the nodes that acked and each node's response."""

    acks: tuple[str, ...]
    responses: Mapping[str, bytes]


@dataclass(frozen=True)
class KeyResponse:
    """The answer to a keyring command, per node: ``keys`` maps key -> nodes holding it."""

    num_nodes: int
    num_resp: int
    num_err: int
    messages: Mapping[str, str]
    keys: Mapping[str, int]


@dataclass(frozen=True)
class Coordinate:
    vec: tuple[float, ...]
    error: float
    adjustment: float
    height: float


# ---------------------------------------------------------------- the interface


class SerfRPC(Protocol):
    """The calls meshd makes of a Serf agent; :class:`SerfClient` implements them."""

    async def members(self) -> list[SerfMember]: ...

    async def members_filtered(
        self,
        *,
        tags: Mapping[str, str] | None = None,
        status: str | None = None,
        name: str | None = None,
    ) -> list[SerfMember]: ...

    async def set_tags(self, tags: Mapping[str, str], delete: Iterable[str] = ()) -> None: ...

    async def join(self, addresses: Sequence[str], *, replay: bool = False) -> int: ...

    async def leave(self) -> None: ...

    async def force_leave(self, node: str, *, prune: bool = False) -> None: ...

    async def user_event(
        self, name: str, payload: bytes = b"", *, coalesce: bool = True
    ) -> None: ...

    async def query(
        self,
        name: str,
        payload: bytes = b"",
        *,
        filter_nodes: Sequence[str] = (),
        filter_tags: Mapping[str, str] | None = None,
        request_ack: bool = False,
        query_timeout: float = 0.0,
    ) -> QueryResult: ...

    async def respond(self, query_id: int, payload: bytes) -> None: ...

    async def install_key(self, key: str) -> KeyResponse: ...

    async def use_key(self, key: str) -> KeyResponse: ...

    async def remove_key(self, key: str) -> KeyResponse: ...

    async def list_keys(self) -> KeyResponse: ...

    async def stats(self) -> dict[str, dict[str, str]]: ...

    async def get_coordinate(self, node: str) -> Coordinate | None: ...

    def events(self) -> AsyncIterator[SerfEvent]: ...

    async def monitor(self, on_line: LogHandler, *, level: str = "INFO") -> None: ...


# ---------------------------------------------------------------- decoding helpers


def text_of(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value) if value is not None else ""


def address_text(raw: Any) -> str:
    if isinstance(raw, bytes) and len(raw) in (4, 16):
        addr = ip_address(raw)
        if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(addr)
    return text_of(raw)


def decode_member(body: Mapping[str, Any]) -> SerfMember:
    tags = body.get("Tags") or {}
    return SerfMember(
        name=text_of(body.get("Name")),
        addr=address_text(body.get("Addr")),
        port=int(body.get("Port") or 0),
        tags={text_of(k): text_of(v) for k, v in tags.items()},
        status=text_of(body.get("Status")),
    )


def decode_members(command: str, body: Mapping[str, Any]) -> list[SerfMember]:
    try:
        return [decode_member(m) for m in body.get("Members") or ()]
    except (AttributeError, TypeError, ValueError) as exc:
        raise SerfCommandError(f"serf {command}: malformed member in the reply: {exc}") from exc


def decode_key_response(body: Mapping[str, Any]) -> KeyResponse:
    return KeyResponse(
        num_nodes=int(body.get("NumNodes") or 0),
        num_resp=int(body.get("NumResp") or 0),
        num_err=int(body.get("NumErr") or 0),
        messages={text_of(k): text_of(v) for k, v in (body.get("Messages") or {}).items()},
        keys={text_of(k): int(v) for k, v in (body.get("Keys") or {}).items()},
    )


# Which replies carry a body after their header (notes/serf-rpc.md, "Wire format").
Body = Literal["always", "on_success", "never"]
REPLY_BODY: dict[str, Body] = {
    "join": "always",
    "install-key": "always",
    "use-key": "always",
    "remove-key": "always",
    "list-keys": "always",
    "members": "on_success",
    "members-filtered": "on_success",
    "stats": "on_success",
    "get-coordinate": "on_success",
}


def decode_event(body: Mapping[str, Any]) -> SerfEvent | None:
    """One record of the event stream; None for a kind meshd does not use."""
    kind = text_of(body.get("Event"))
    if kind.startswith("member-"):
        return MemberEvent(kind, tuple(decode_member(m) for m in body.get("Members") or ()))
    if kind == "user":
        return UserEvent(
            name=text_of(body.get("Name")),
            payload=bytes(body.get("Payload") or b""),
            ltime=int(body.get("LTime") or 0),
            coalesce=bool(body.get("Coalesce")),
        )
    if kind == "query":
        return QueryEvent(
            id=int(body.get("ID") or 0),
            name=text_of(body.get("Name")),
            payload=bytes(body.get("Payload") or b""),
            ltime=int(body.get("LTime") or 0),
        )
    return None
