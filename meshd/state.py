"""Files meshd writes: atomic replacement, secret modes, the state directory.

Every file another program (or a later meshd) reads is written to a temporary
file in the same directory, fsynced, then renamed over the old one, so a crash
leaves either the old or the new content, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from meshd.errors import StateError

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
