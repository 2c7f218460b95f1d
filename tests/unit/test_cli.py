"""The command line as a user meets it: help, version, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from meshd import __version__
from tests.conftest import run_meshd


def test_help_lists_commands_and_teaches() -> None:
    result = run_meshd("--help")
    assert result.returncode == 0
    for word in ("lab", "plugins", "version", "meshd init", "--config", "--state-dir"):
        assert word in result.stdout


def test_version_text_and_json() -> None:
    assert run_meshd("version").stdout.startswith(f"meshd {__version__} ")
    assert json.loads(run_meshd("version", "--json").stdout)["meshd"] == __version__


def test_bad_config_is_one_line_and_exit_78(tmp_path: Path) -> None:
    cfg = tmp_path / "meshd.toml"
    cfg.write_text("[wireguard]\nport = 0\n")
    result = run_meshd("plugins", env={"MESHD_CONFIG": str(cfg)})
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f"meshd: error: {cfg}: wireguard.port: must be a port number from 1 to 65535, not 0"
    ]


def test_unknown_command_is_a_usage_error() -> None:
    result = run_meshd("frobnicate")
    assert result.returncode == 2
    assert "No such command" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_takes_one_format(tmp_path: Path) -> None:
    result = run_meshd("status", "--json", "--graph", env={"MESHD_STATE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: --json and --graph are two formats: choose one"
    )


def test_a_bad_metrics_table_is_refused_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "meshd.toml"
    cfg.write_text('[plugins.metrics]\nlisten = "0.0.0.0:9477"\n')
    result = run_meshd("plugins", env={"MESHD_CONFIG": str(cfg)})
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f"meshd: error: {cfg}: plugins.metrics.listen: '0.0.0.0:9477': metrics listen on "
        "loopback or on this node's mesh address only (use mesh:PORT for the mesh address)"
    ]
