"""Shared fixtures of the integration tests: root/binary skips and the lab.

Integration tests run real programs in network namespaces and need root.
Mark them with the ``root`` marker, naming the programs they need besides
``ip``; they are skipped, with the reason, when not root or a program is missing:

    pytestmark = pytest.mark.root("serf", "wireguard-go")    # a whole module
    @requires_root("wg")                                      # one test (same thing)

``lab_factory`` builds labs and tears down every lab it built when the test
ends, passed or failed:

    def test_something(lab_factory):
        lab = lab_factory(nodes=3)                  # flat; or topology="nat"
        lab.run("n1", ["ping", "-c", "1", lab.node("n2").address])

Labs get random ids, so parallel runs (and other people's tests on the same
machine) never share a namespace. Never call ``Lab.down_all()`` from a test:
it would take down other runs' labs too.

A lab's logs (every spawned agent's output) go with it at teardown. For a
post-mortem of a flake, ``MESHD_TEST_LOGS=DIR`` copies them first, to
``DIR/<lab id>/``: take every lab down with :func:`take_down`. meshd agents log
at ``MESHD_TEST_LOG_LEVEL`` (default info; debug adds Serf's own member events).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.lab import Lab

ALWAYS_NEEDED = ("ip",)


def requires_root(*binaries: str) -> pytest.MarkDecorator:
    """The ``root`` marker: skip unless root and ``binaries`` (plus ``ip``) are installed."""
    return pytest.mark.root(*binaries)


def missing_requirements(binaries: tuple[str, ...] = ()) -> str | None:
    """Why a root test cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [b for b in (*ALWAYS_NEEDED, *binaries) if shutil.which(b) is None]
    if missing:
        return f"needs {', '.join(missing)} installed"
    return None


AGENT_LOG_LEVEL = os.environ.get("MESHD_TEST_LOG_LEVEL", "info")


def take_down(lab: Lab) -> None:
    """``lab.down()``, keeping its logs under $MESHD_TEST_LOGS first when that is set."""
    keep = os.environ.get("MESHD_TEST_LOGS")
    logs = lab.dir / "logs"
    if keep and logs.is_dir():
        shutil.copytree(logs, Path(keep) / lab.lab_id, dirs_exist_ok=True)
    lab.down()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # `timeout 600 pytest` ends with SIGTERM, which kills pytest outright and leaves labs
    # behind; as a KeyboardInterrupt, pytest still runs every fixture's teardown.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("root"):
        reason = missing_requirements(tuple(str(arg) for arg in mark.args))
        if reason:
            pytest.skip(reason)


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """``lab_factory(nodes=3, topology="flat", **kw) -> Lab``; all its labs go down at teardown.

    Extra keywords go to :meth:`Lab.create` (``sites``, ``public``, ``lab_id``).
    """
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    labs: list[Lab] = []

    def make(nodes: int = 3, topology: str = "flat", **kwargs: Any) -> Lab:
        lab = Lab.create(nodes=nodes, topology=topology, **kwargs)
        labs.append(lab)
        return lab

    yield make
    errors = []
    for lab in reversed(labs):
        try:
            take_down(lab)
        except Exception as exc:  # take down the others before reporting
            errors.append(f"{lab.lab_id}: {exc}")
    if errors:
        pytest.fail("lab teardown failed: " + "; ".join(errors))
