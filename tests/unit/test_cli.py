"""The command line as a user meets it: help, version, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from meshd import __version__


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshd", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_help_lists_commands_and_teaches() -> None:
    result = run("--help")
    assert result.returncode == 0
    for word in ("lab", "plugins", "version", "meshd init", "--config", "--state-dir"):
        assert word in result.stdout


def test_version_text_and_json() -> None:
    assert run("version").stdout.startswith(f"meshd {__version__} ")
    assert json.loads(run("version", "--json").stdout)["meshd"] == __version__


def test_bad_config_is_one_line_and_exit_78(tmp_path: Path) -> None:
    cfg = tmp_path / "meshd.toml"
    cfg.write_text("[wireguard]\nport = 0\n")
    result = run("plugins", env={"MESHD_CONFIG": str(cfg)})
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f"meshd: error: {cfg}: wireguard.port: must be a port number from 1 to 65535, not 0"
    ]


def test_unknown_command_is_a_usage_error() -> None:
    result = run("frobnicate")
    assert result.returncode == 2
    assert "No such command" in result.stderr
    assert "Traceback" not in result.stderr
