"""The agent's local control socket: how ``meshd status`` and ``meshd leave`` talk to it.

A Unix socket in the state directory (0600, so only root reaches it). One JSON
object per line each way: ``{"cmd": "status"}`` is answered by
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from meshd.errors import MeshdError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_LINE = 64 * 1024

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


class ControlError(MeshdError):
    """The agent cannot be reached, or refused a control command."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


class ControlServer:
    """Serves the commands in ``handlers`` on the state directory's control socket."""

    def __init__(self, state_dir: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = socket_path(state_dir)
        self._handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                line = await reader.readline()
            reply = await self._dispatch(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as exc:
            log.debug("control connection dropped: %s", exc)
        finally:
            writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            handler = self._handlers[request["cmd"]]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": f"unknown request; commands: {', '.join(self._handlers)}"}
        try:
            return {"ok": True, "result": await handler(request)}
        except MeshdError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control command %r failed", request.get("cmd"))
            return {"ok": False, "error": f"internal error: {exc}"}


def call(state_dir: Path, cmd: str, *, timeout: float = 10.0, **args: Any) -> Any:
    """Send one command to the agent (blocking; for the CLI) and return its result."""
    path = socket_path(state_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except FileNotFoundError:
            raise ControlError(
                f"the agent is not running (no {path}); start it with 'meshd agent' "
                "or 'systemctl start meshd'"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(f"the agent is not running ({path} refuses connections)") from None
        except OSError as exc:
            raise ControlError(f"cannot talk to the agent at {path}: {exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError("the agent closed the connection without an answer") from None
    if not reply.get("ok"):
        raise ControlError(f"agent: {reply.get('error')}")
    return reply.get("result")


def call_agent(state_dir: Path, cmd: str, *, timeout: float = 10.0, **args: Any) -> Any:
    """:func:`call`, as the public API names it (``meshd.call_agent``) for plugins' CLI
    commands; a failure is a :class:`~meshd.errors.ControlError`."""
    return call(state_dir, cmd, timeout=timeout, **args)
