"""Helpers shared by the unit and the integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from hypothesis import HealthCheck, settings

# Hypothesis' per-example deadline (200 ms) is a timed assertion: on this shared
# 2-core machine a loaded moment failed a codec test with it. Speed is measured by
# benchmarks, not asserted here; slow-data checks are off for the same reason.
settings.register_profile("meshd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("meshd")


def run_meshd(
    *args: str,
    env: Mapping[str, str | None] | None = None,
    stdin: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """The real command line, in a process of its own, as a user runs it.

    The environment is this one with ``env`` on top; a ``None`` value removes a variable.
    """
    merged = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "meshd", *args],
        capture_output=True,
        text=True,
        env={key: value for key, value in merged.items() if value is not None},
        input=stdin,
        timeout=timeout,
        check=False,
    )


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples called ``name`` in Prometheus text ``text``: sorted labels -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def pip_install_target(source: Path, target: Path) -> Path:
    """Install the distribution at ``source`` with pip into directory ``target`` (for
    PYTHONPATH), never into the project's environment; returns ``target``."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-build-isolation",
            "--no-deps",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    return target
