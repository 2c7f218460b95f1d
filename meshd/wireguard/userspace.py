"""The userspace backend: a supervised ``wireguard-go`` and its UAPI socket.

meshd starts ``wireguard-go -f <ifname>`` (foreground: its self-daemonising mode
dies under ``ip netns exec``) through :class:`meshd.process.ChildProcess`,
prefixed with ``ip netns exec <netns>`` when the interface belongs in another
namespace. It then speaks the UAPI text protocol (:mod:`meshd.wireguard.uapi`)
over ``/var/run/wireguard/<ifname>.sock`` — a directory shared by every
namespace, so interface names must be unique on the machine.

When wireguard-go dies its TUN interface dies with it. The supervisor restarts
it, this backend re-applies the device settings (private key, port), then calls
the restart hook so the owner re-applies addresses, routes and peers.

Secrets (private and preshared keys) go only into the UAPI socket: never argv,
the child's environment or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from meshd.errors import MeshdError, SupervisorError, WireGuardError
from meshd.process import ChildProcess, find_binary
from meshd.wireguard import uapi
from meshd.wireguard.backend import DeviceConfig, DeviceState, PeerOp, RestartHook

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/wireguard")
_IO_TIMEOUT = 30.0


class UserspaceBackend:
    """``wireguard-go`` for interface ``ifname`` in namespace ``netns``."""

    name = "userspace"

    def __init__(
        self,
        ifname: str,
        netns: str | None = None,
        *,
        binary: str = "wireguard-go",
        log_level: str = "error",
        socket_dir: Path = SOCKET_DIR,
        ready_timeout: float = 10.0,
    ) -> None:
        if not 0 < len(ifname) <= 15 or "/" in ifname:
            raise WireGuardError(f"interface name {ifname!r} must be 1-15 characters")
        self.ifname = ifname
        self.netns = netns
        self.socket_path = socket_dir / f"{ifname}.sock"
        self._binary = binary
        self._log_level = log_level
        self._ready_timeout = ready_timeout
        self._device: DeviceConfig | None = None
        self._hook: RestartHook | None = None
        self._child: ChildProcess | None = None
        self._last_line = ""

    # The child process

    def _argv(self) -> list[str]:
        try:
            binary = find_binary(self._binary)
        except SupervisorError as exc:
            raise WireGuardError(f"cannot run the userspace backend: {exc}") from exc
        argv = [binary, "-f", self.ifname]
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    async def _ready(self) -> None:
        # Ready once the socket answers: a stale socket file of a killed daemon refuses.
        # No timeout of its own: the supervisor's ready timeout cancels it.
        while True:
            with contextlib.suppress(OSError, WireGuardError):
                await self._exchange(uapi.GET_REQUEST)
                return
            await asyncio.sleep(0.02)

    async def start(self) -> None:
        if await self._answers():
            raise WireGuardError(
                f"{self.socket_path} already answers: another wireguard-go runs {self.ifname}"
            )
        self._child = ChildProcess(
            f"wireguard-go[{self.ifname}]",
            self._argv(),
            env={
                "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                "LOG_LEVEL": self._log_level,
            },
            on_line=self._child_line,
            ready=self._ready,
            ready_timeout=self._ready_timeout,
            on_restart=self._after_restart,
        )
        try:
            await self._child.start()
        except SupervisorError as exc:
            # Its last words may still be in the pipe when its exit is noticed.
            for _ in range(25):
                if self._last_line:
                    break
                await asyncio.sleep(0.02)
            said = f" (it said: {self._last_line})" if self._last_line else ""
            raise WireGuardError(f"starting wireguard-go for {self.ifname}: {exc}{said}") from exc
        log.info(
            "wireguard-go runs %s%s (pid %s)",
            self.ifname,
            f" in {self.netns}" if self.netns else "",
            self._child.pid,
        )

    def _child_line(self, line: str) -> None:
        # wireguard-go prints a boxed banner on every start, and its verbose lines (the
        # agent at debug) start "DEBUG:": keep both out of INFO.
        banner = line[:1] in "┌│└"
        if not banner:
            self._last_line = line
        quiet = banner or line.startswith("DEBUG:")
        log.log(logging.DEBUG if quiet else logging.INFO, "wireguard-go[%s]: %s", self.ifname, line)

    async def _answers(self) -> bool:
        try:
            await self._request(uapi.GET_REQUEST)
        except (OSError, WireGuardError):
            return False
        return True

    async def _after_restart(self) -> None:
        log.warning("wireguard-go for %s restarted: re-applying its configuration", self.ifname)
        if self._device is not None:
            await self.configure_device(self._device)
        if self._hook is not None:
            await self._hook()

    async def supervise(self) -> None:
        if self._child is not None:
            await self._child.supervise()

    async def stop(self) -> None:
        if self._child is not None:
            await self._child.stop()

    def set_restart_hook(self, hook: RestartHook | None) -> None:
        self._hook = hook

    @property
    def restarts(self) -> int:
        return self._child.restarts if self._child is not None else 0

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    # UAPI

    async def _request(self, payload: bytes) -> str:
        """Send one request, return the answer up to its closing empty line."""
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            async with asyncio.timeout(_IO_TIMEOUT):
                return await self._exchange(payload)
        except TimeoutError as exc:
            raise WireGuardError(f"{self.ifname}: UAPI answer timed out") from exc

    async def _exchange(self, payload: bytes) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            writer.write(payload)
            await writer.drain()
            # The answer ends at its only empty line; read in big chunks (1,000 peers ~ 300 KB).
            answer = bytearray()
            while not answer.endswith(b"\n\n"):
                chunk = await reader.read(1 << 16)
                if not chunk:
                    raise WireGuardError(f"{self.ifname}: UAPI socket closed mid-answer")
                answer += chunk
            return answer.decode("ascii", errors="replace")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _call(self, payload: bytes, what: str) -> str:
        try:
            return await self._request(payload)
        except OSError as exc:
            raise WireGuardError(
                f"{self.ifname}: {what}: cannot use {self.socket_path}: {exc.strerror or exc}"
                + (
                    " (is wireguard-go running?)"
                    if isinstance(exc, FileNotFoundError | ConnectionRefusedError)
                    else ""
                )
            ) from exc

    async def _set(self, device: DeviceConfig | None, ops: Sequence[PeerOp], what: str) -> None:
        answer = await self._call(uapi.encode_set(device, ops), what)
        code = uapi.parse_errno(answer)
        if code != 0:
            # wireguard-go stops at the failing line: the next reconcile pass repairs the rest.
            raise WireGuardError(f"{self.ifname}: {what} refused by wireguard-go (errno {code})")

    async def configure_device(self, config: DeviceConfig) -> None:
        self._device = config
        await self._set(config, (), "setting private key and port")

    async def read_state(self) -> DeviceState:
        return uapi.parse_get(await self._call(uapi.GET_REQUEST, "reading state"))

    async def apply(self, ops: Sequence[PeerOp]) -> None:
        if ops:
            await self._set(None, ops, f"applying {len(ops)} peer operation(s)")


def userspace_available(binary: str = "wireguard-go") -> bool:
    """Whether the wireguard-go binary is installed."""
    try:
        find_binary(binary)
    except MeshdError:
        return False
    return True
