"""Atomic writes and secret modes."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

import pytest

from meshd.errors import StateError
from meshd.state import DeferredWrites, atomic_write, ensure_private_dir, read_secret, write_secret


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secret_files_are_0600_and_dirs_0700(tmp_path: Path) -> None:
    directory = ensure_private_dir(tmp_path / "state")
    write_secret(directory / "key", "s3cret")
    assert mode(directory) == 0o700
    assert mode(directory / "key") == 0o600
    assert read_secret(directory / "key") == b"s3cret"


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "zone"
    atomic_write(target, "one")
    atomic_write(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(tmp_path) == ["zone"]
    assert mode(target) == 0o644


def test_failed_write_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "state"
    atomic_write(target, "old")
    with pytest.raises(StateError, match="cannot write"):
        atomic_write(tmp_path / "missing-dir" / "state", "new")
    assert target.read_text() == "old"


def test_a_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("x")
    path.chmod(0o644)
    with pytest.raises(StateError, match="chmod 600"):
        read_secret(path)


def blocked(path: Path) -> Path:
    """Make ``path`` unwritable for atomic_write, even for root: a non-empty directory
    is in the way of the rename (as a full disk is in the way of the write)."""
    (path / "in-the-way").mkdir(parents=True)
    return path


def test_deferred_writes_wait_in_memory_log_once_and_land_when_there_is_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshd.state")
    writes = DeferredWrites()
    target = blocked(tmp_path / "revocations")
    assert not writes.write(target, "one")
    assert not writes.write(target, "two")  # the newest content replaces what waited
    assert not writes.flush()
    assert writes.waiting == (target,)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"cannot write {target}" in warnings[0].getMessage()
    assert sorted(os.listdir(tmp_path)) == ["revocations"]  # no temporary file left

    shutil.rmtree(target)
    assert writes.flush()
    assert target.read_text() == "two"
    assert writes.waiting == ()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "state written again: nothing waits in memory any more"
    ]
    assert writes.write(target, "three")
    assert target.read_text() == "three"
