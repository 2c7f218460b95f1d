"""Supervision of one child process (``serf agent``, ``wireguard-go``).

A :class:`ChildProcess` starts its program, waits until it is ready, forwards
every line it prints into meshd's logging, restarts it with exponential backoff
when it dies, runs a hook after each restart (to re-apply state the child lost),
and stops it on request: SIGTERM, then SIGKILL after a bound. Children also get
SIGTERM from the kernel if meshd itself dies (``PR_SET_PDEATHSIG``), so a killed
agent leaves no orphans behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from meshd.errors import MeshdError, SupervisorError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

LineHandler = Callable[[str], None]
ReadyCheck = Callable[[], Awaitable[None]]
RestartHook = Callable[[], Awaitable[None]]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def find_binary(name: str) -> str:
    """The full path of ``name``, or a SupervisorError that says how to get it."""
    path = name if os.sep in name else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        raise SupervisorError(f"{name} not found: install it (Debian package {name!r})")
    return path


class ChildProcess:
    """One supervised child. Use :meth:`start`, then run :meth:`supervise` as a task."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        on_line: LineHandler | None = None,
        ready: ReadyCheck | None = None,
        ready_timeout: float = 10.0,
        on_restart: RestartHook | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.argv = [find_binary(argv[0]), *argv[1:]]
        # Children get only what they need: never meshd's own environment and its secrets.
        self.env = dict(env) if env is not None else {"PATH": os.environ.get("PATH", "")}
        self._child_log = logging.getLogger(f"meshd.child.{name}")
        self._on_line = on_line or self._child_log.info
        self._ready = ready
        self._ready_timeout = ready_timeout
        self._on_restart = on_restart
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stop_timeout = stop_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def stop_requested(self) -> bool:
        return self._stopping

    @property
    def running(self) -> bool:
        return self.pid is not None

    async def _spawn(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        except OSError as exc:
            raise SupervisorError(f"cannot start {self.name}: {exc.strerror or exc}") from exc
        self._reader = asyncio.create_task(self._read_lines(self._proc), name=f"{self.name}-log")
        log.debug("started %s (pid %d)", self.name, self._proc.pid)
        if self._ready is not None:
            await self._await_ready(self._proc, self._ready)

    async def _await_ready(self, proc: asyncio.subprocess.Process, ready: ReadyCheck) -> None:
        check = asyncio.ensure_future(ready())
        died = asyncio.ensure_future(proc.wait())
        try:
            done, _ = await asyncio.wait(
                {check, died}, timeout=self._ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            died.cancel()
        if check in done:
            check.result()
            return
        check.cancel()
        # Bounded: a check that swallows its cancellation must not hang the start.
        check.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.wait({check}, timeout=1.0)
        if died in done:
            raise SupervisorError(f"{self.name} exited with code {proc.returncode} while starting")
        await self._terminate(proc)
        raise SupervisorError(f"{self.name} did not become ready in {self._ready_timeout:g} s")

    async def _read_lines(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                self._on_line(text)

    async def start(self) -> None:
        """Start the child and wait until it is ready; raises SupervisorError if it is not."""
        self._stopping = False
        await self._spawn()

    async def supervise(self) -> None:
        """Restart the child whenever it dies, until :meth:`stop`. Run it as a task."""
        delay = self._backoff_initial
        while not self._stopping:
            proc = self._proc
            if proc is None:
                return
            started = time.monotonic()
            code = await proc.wait()
            if self._reader is not None:
                with contextlib.suppress(Exception):
                    await self._reader
            if self.stop_requested:
                return
            # A child that ran a while before dying starts again from the short delay.
            if time.monotonic() - started > 30:
                delay = self._backoff_initial
            log.warning("%s exited with code %s; restarting in %.1f s", self.name, code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)
            try:
                await self._spawn()
                self.restarts += 1
                if self._on_restart is not None:
                    await self._on_restart()
            except MeshdError as exc:
                log.warning("%s restart failed: %s", self.name, exc)
                if self._proc is not None and self._proc.returncode is None:
                    await self._terminate(self._proc)

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._stop_timeout)
        except asyncio.TimeoutError:
            log.warning("%s ignored SIGTERM for %g s; killing it", self.name, self._stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL) and stop restarting it."""
        self._stopping = True
        if self._proc is not None:
            await self._terminate(self._proc)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader
