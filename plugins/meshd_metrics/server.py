"""A small read-only HTTP server on the agent's loop: GET a path, get bytes back.

Enough HTTP/1.1 for Prometheus, curl and a browser: one request per connection
(``Connection: close``), GET and HEAD only, no request body. Requests must finish
within ``REQUEST_TIMEOUT`` and their head within ``MAX_HEAD`` bytes.

A ``Host`` header must name an IP address or ``localhost``: a web page elsewhere
cannot rebind a DNS name of its own to this port and read the mesh. Answers carry
``Access-Control-Allow-Origin`` only on routes that allow it, and only for an
``Origin`` on an IP address or ``localhost`` (another node's page, over the mesh).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
MAX_HEAD = 8192


@dataclass(frozen=True)
class Answer:
    body: bytes
    content_type: str
    status: int = 200


@dataclass(frozen=True)
class Route:
    produce: Callable[[], Awaitable[Answer]]
    cross_origin: bool = False


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    421: "Misdirected Request",
    500: "Internal Server Error",
}


def ip_or_localhost(host: str) -> bool:
    """True for ``127.0.0.1``, ``[::1]``, ``localhost`` and any other IP literal."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_of(authority: str) -> str:
    """The host part of ``[v6]:port``, ``v4:port`` or a bare host; "" when malformed."""
    try:
        return urlsplit(f"//{authority}").hostname or ""
    except ValueError:  # "[::1" and the like
        return ""


def _response(status: int, body: bytes, content_type: str, extra: Mapping[str, str]) -> bytes:
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class WebServer:
    """Serves ``routes`` (path -> :class:`Route`) on the addresses it is started on."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self._routes = routes
        self._servers: list[asyncio.Server] = []

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); the port bound. OSError when the
        address cannot be bound."""
        server = await asyncio.start_server(
            self._serve, host, port, reuse_address=True, limit=MAX_HEAD
        )
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(await self._answer(head))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            log.debug("metrics: dropped a request: %r", exc)
        except OSError as exc:
            log.debug("metrics: connection failed: %s", exc)
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> bytes:
        if len(head) > MAX_HEAD:
            return _response(400, b"request head too long\n", "text/plain", {})
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return _response(400, b"bad request line\n", "text/plain", {})
        method, target, _version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return _response(405, b"read-only: GET or HEAD\n", "text/plain", {"Allow": "GET, HEAD"})
        if "host" in headers and not ip_or_localhost(host_of(headers["host"])):
            return _response(421, b"ask by IP address or localhost\n", "text/plain", {})
        route = self._routes.get(target.split("?", 1)[0])
        if route is None:
            return _response(404, b"not found\n", "text/plain", {})
        try:
            answer = await route.produce()
        except Exception:
            log.exception("metrics: answering %s failed", target)
            return _response(500, b"internal error (see the agent's log)\n", "text/plain", {})
        extra = {}
        origin = headers.get("origin", "")
        if route.cross_origin and ip_or_localhost(host_of(origin.partition("://")[2])):
            extra = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        response = _response(answer.status, answer.body, answer.content_type, extra)
        if method == "HEAD":
            return response[: response.index(b"\r\n\r\n") + 4]
        return response
