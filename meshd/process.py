"""Supervision of one child process (``serf agent``, ``wireguard-go``).

A :class:`ChildProcess` starts its program, waits until it is ready, forwards
every line it prints into meshd's logging, restarts it with exponential backoff
when it dies, runs a hook after each restart (to re-apply state the child lost),
and stops it on request.

Every stop is bounded, because systemd gives the whole agent a few seconds:
SIGTERM to the child's process group (the child and anything it forked), SIGKILL
after ``stop_timeout`` (1 s by default), and a last bounded wait after that.
A start that fails or is cancelled midway stops what it started before it
raises, so no child outlives the call that made it. Children also get SIGTERM
from the kernel if meshd itself dies (``PR_SET_PDEATHSIG``), so a killed agent
leaves no orphans behind.
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
from typing import Any

from meshd.errors import MeshdError, SupervisorError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# After SIGKILL a process ends at once; a longer wait means it is stuck in the kernel
# (uninterruptible I/O), and the stop goes on without it rather than hang.
_KILL_WAIT = 1.0
# The log reader ends at the pipe's EOF; a grandchild holding the pipe must not hold us.
_READER_WAIT = 0.5

LineHandler = Callable[[str], None]
ReadyCheck = Callable[[], Awaitable[None]]
RestartHook = Callable[[], Awaitable[None]]


def _die_with(parent: int) -> Callable[[], None]:
    """The child's preexec: SIGTERM when ``parent`` dies (inherited across exec).

    The kernel sends it when the *thread* that forked exits: asyncio forks from the
    loop's thread, which lives as long as meshd does.
    """

    def preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent died before prctl took effect: nobody would ever stop us.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


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
        stop_timeout: float = 1.0,
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
        # Set by stop(): no more restarts, and a backoff in progress ends at once.
        self._stop_event = asyncio.Event()
        self.restarts = 0
        # Times it died on its own (counted at once, a restart comes after a back-off and
        # a ready check): what the doctor reports.
        self.deaths = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def stop_requested(self) -> bool:
        return self._stop_event.is_set()

    @property
    def running(self) -> bool:
        return self.pid is not None

    async def _spawn(self) -> None:
        """Start the process and wait until it is ready; on any failure or cancellation,
        stop it before raising."""
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                preexec_fn=_die_with(os.getpid()),
                # Its own process group, which a stop signals whole.
                start_new_session=True,
            )
        except OSError as exc:
            raise SupervisorError(f"cannot start {self.name}: {exc.strerror or exc}") from exc
        proc = self._proc
        self._reader = asyncio.create_task(self._read_lines(proc), name=f"{self.name}-log")
        log.debug("started %s (pid %d)", self.name, proc.pid)
        if self._ready is None:
            return
        try:
            await self._await_ready(proc, self._ready)
        except BaseException:
            await self._terminate(proc)
            raise

    async def _await_ready(self, proc: asyncio.subprocess.Process, ready: ReadyCheck) -> None:
        check: asyncio.Future[None] = asyncio.ensure_future(ready())
        died: asyncio.Future[int] = asyncio.create_task(proc.wait(), name=f"{self.name}-wait")
        both: set[asyncio.Future[Any]] = {check, died}
        try:
            done, _ = await asyncio.wait(
                both, timeout=self._ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if check in done:
                check.result()
                return
        finally:
            died.cancel()
            if not check.done():
                check.cancel()
                # Never awaited beyond this: a check that swallows its cancellation
                # must not hang the start (its exception is retrieved when it ends).
                check.add_done_callback(lambda t: t.cancelled() or t.exception())
        if died in done:
            raise SupervisorError(f"{self.name} exited with code {proc.returncode} while starting")
        raise SupervisorError(f"{self.name} did not become ready in {self._ready_timeout:g} s")

    async def _read_lines(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                self._on_line(text)

    async def start(self) -> None:
        """Start the child and wait until it is ready; raises SupervisorError if it is not."""
        self._stop_event.clear()
        await self._spawn()

    async def supervise(self) -> None:
        """Restart the child whenever it dies, until :meth:`stop`. Run it as a task."""
        delay = self._backoff_initial
        while not self._stop_event.is_set():
            proc = self._proc
            if proc is None:
                return
            started = time.monotonic()
            code = await proc.wait()
            await self._end_reader()
            if self.stop_requested:
                return
            self.deaths += 1
            # A child that ran a while before dying starts again from the short delay.
            if time.monotonic() - started > 30:
                delay = self._backoff_initial
            log.warning("%s exited with code %s; restarting in %.1f s", self.name, code, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop_event.wait()
            delay = min(delay * 2, self._backoff_max)
            if self._stop_event.is_set():
                return
            try:
                await self._spawn()
                self.restarts += 1
                if self._on_restart is not None:
                    await self._on_restart()
            except MeshdError as exc:
                log.warning("%s restart failed: %s", self.name, exc)
                if self._proc is not None:
                    await self._terminate(self._proc)

    def _signal(self, proc: asyncio.subprocess.Process, sig: int) -> None:
        # Until asyncio has reaped it, its pid (and so its group id) cannot be reused.
        if proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # not a group leader after all: the child alone
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    async def _exited(self, proc: asyncio.subprocess.Process, seconds: float) -> bool:
        """Whether ``proc`` exits within ``seconds``."""
        if proc.returncode is not None:
            return True
        waiter = asyncio.create_task(proc.wait(), name=f"{self.name}-wait")
        try:
            done, _ = await asyncio.wait({waiter}, timeout=seconds)
        finally:
            waiter.cancel()
        return bool(done)

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to its group, SIGKILL after ``stop_timeout``; returns within about
        ``stop_timeout`` + 1 s. Cancelled meanwhile, it kills at once, then re-raises."""
        if proc.returncode is not None:
            return
        self._signal(proc, signal.SIGTERM)
        try:
            if await self._exited(proc, self._stop_timeout):
                return
            log.warning("%s ignored SIGTERM for %g s; killing it", self.name, self._stop_timeout)
            self._signal(proc, signal.SIGKILL)
            if not await self._exited(proc, _KILL_WAIT):
                log.error("%s (pid %d) survived SIGKILL; giving up on it", self.name, proc.pid)
        except asyncio.CancelledError:
            # No time left for grace, but never leave it running.
            self._signal(proc, signal.SIGKILL)
            raise

    async def _end_reader(self) -> None:
        reader = self._reader
        if reader is None or reader.done():
            return
        done, _ = await asyncio.wait({reader}, timeout=_READER_WAIT)
        if not done:
            reader.cancel()

    async def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL) and stop restarting it; bounded by
        about ``stop_timeout`` + 1.5 s."""
        self._stop_event.set()
        if self._proc is not None:
            await self._terminate(self._proc)
        await self._end_reader()
