"""Files meshd writes: atomic replacement, secret modes, the state directory.

Every file another program (or a later meshd) reads is written to a temporary
file in the same directory, fsynced, then renamed over the old one, so a crash
leaves either the old or the new content, never half of one.

A daemon must not stop serving because its disk is full: :class:`DeferredWrites`
keeps a file the disk refused (ENOSPC, EIO, a read-only remount) in memory, logs
that once, and writes it when asked again (the agent asks on every pass); the old
content stays on disk until then, whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from meshd.errors import StateError

log = logging.getLogger(__name__)

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
STATE_DIR_MODE = 0o700


@contextlib.contextmanager
def _adjacent_tmp(path: Path, mode: int) -> Iterator[IO[bytes]]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; set the final mode before any byte is written.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(
    path: str | os.PathLike[str], data: bytes | str, *, mode: int = PUBLIC_MODE
) -> None:
    """Replace ``path`` with ``data`` atomically; ``mode`` applies from the first byte."""
    target = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    try:
        with _adjacent_tmp(target, mode) as handle:
            handle.write(payload)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise StateError(f"cannot write {target}: {exc.strerror or exc}") from exc


def write_secret(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Atomically write a file only its owner can read (0600)."""
    atomic_write(path, data, mode=SECRET_MODE)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
        os.chmod(directory, STATE_DIR_MODE)
    except OSError as exc:
        raise StateError(f"cannot use state directory {directory}: {exc.strerror or exc}") from exc
    return directory


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a secret file, refusing one that others can read."""
    target = Path(path)
    try:
        info = target.stat()
        if info.st_mode & 0o077:
            raise StateError(
                f"{target} is readable by others (mode {info.st_mode & 0o777:o}); "
                f"run: chmod 600 {target}"
            )
        return target.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read {target}: {exc.strerror or exc}") from exc


class DeferredWrites:
    """Atomic writes that wait in memory while the disk refuses them.

    :meth:`write` tries at once; on failure the newest content of that file waits
    (replacing older waiting content) and one WARNING says so, with the reason. Later
    failures log at DEBUG until :meth:`flush` has written everything again, which logs
    one INFO line. Files are written in the order they first waited.
    """

    def __init__(self) -> None:
        self._waiting: dict[Path, tuple[bytes, int]] = {}
        self._failing = False

    @property
    def waiting(self) -> tuple[Path, ...]:
        """The files whose newest content is only in memory."""
        return tuple(self._waiting)

    def write(
        self, path: str | os.PathLike[str], data: bytes | str, *, mode: int = PUBLIC_MODE
    ) -> bool:
        """Write ``path`` (atomically) now if the disk takes it; True when it is on disk."""
        payload = data.encode() if isinstance(data, str) else data
        self._waiting[Path(path)] = (payload, mode)
        return self.flush()

    def flush(self) -> bool:
        """Write what waits; True when nothing waits any more."""
        for path, (payload, mode) in list(self._waiting.items()):
            try:
                atomic_write(path, payload, mode=mode)
            except StateError as exc:
                if self._failing:
                    log.debug("still cannot write state: %s", exc)
                else:
                    log.warning(
                        "%s; kept in memory (the old file stays whole), "
                        "written again once the disk takes it",
                        exc,
                    )
                    self._failing = True
                return False
            del self._waiting[path]
        if self._failing:
            log.info("state written again: nothing waits in memory any more")
            self._failing = False
        return True
