"""A third-party plugin installed as a real distribution, seen through the real CLI.

The fixture builds tests/fixtures/meshd-testplugin with pip into a private
target directory and puts it on PYTHONPATH for the ``meshd`` subprocesses, so
the project's own environment is never changed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import pip_install_target, run_meshd

FIXTURE = Path(__file__).parent.parent / "fixtures" / "meshd-testplugin"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pip_install_target(FIXTURE, tmp_path_factory.mktemp("site"))


def meshd(
    plugin_path: Path, tmp_path: Path, *args: str, config: str = ""
) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "meshd.toml"
    cfg.write_text(config)
    env = {
        "PYTHONPATH": str(plugin_path),
        "MESHD_CONFIG": str(cfg),
        "MESHD_STATE_DIR": str(tmp_path / "state"),
    }
    return run_meshd(*args, env=env)


def by_name(output: str) -> dict[str, dict]:
    return {p["name"]: p for p in json.loads(output)["plugins"]}


def test_installed_plugin_is_listed_with_its_hooks(plugin_path: Path, tmp_path: Path) -> None:
    result = meshd(plugin_path, tmp_path, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = by_name(result.stdout)
    test = plugins["testplugin"]
    assert test["status"] == "loaded"
    assert test["distribution"] == "meshd-testplugin"
    assert test["version"] == "1.2.3"
    assert test["standard"] is False
    assert test["hooks"] == ["meshd_cli", "meshd_configure"]
    assert plugins["ipam"]["standard"] is True
    assert "meshd_allocate_address" in plugins["ipam"]["hooks"]


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_load(
    plugin_path: Path, tmp_path: Path
) -> None:
    result = meshd(plugin_path, tmp_path, "plugins", "--json")
    plugins = by_name(result.stdout)
    assert plugins["brokenplugin"]["status"] == "failed"
    assert "broken on purpose" in plugins["brokenplugin"]["error"]
    assert plugins["testplugin"]["status"] == "loaded"
    table = meshd(plugin_path, tmp_path, "plugins")
    assert "failed: ImportError: this plugin is broken on purpose" in table.stdout


def test_the_plugins_hooks_are_called(plugin_path: Path, tmp_path: Path) -> None:
    config = '[node]\nname = "n7"\n[plugins.testplugin]\ngreeting = "bonjour"\n'
    result = meshd(plugin_path, tmp_path, "testplugin-echo", config=config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "bonjour from n7"
    assert "testplugin-echo" in meshd(plugin_path, tmp_path, "--help", config=config).stdout


def test_a_plugin_refusing_its_config_stops_the_command(plugin_path: Path, tmp_path: Path) -> None:
    config = "[plugins.testplugin]\ncolour = 1\n"
    result = meshd(plugin_path, tmp_path, "plugins", config=config)
    assert result.returncode == 78
    assert "plugins.testplugin.colour: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_disabling_in_config_removes_it(plugin_path: Path, tmp_path: Path) -> None:
    config = '[plugins]\ndisable = ["testplugin"]\n'
    plugins = by_name(meshd(plugin_path, tmp_path, "plugins", "--json", config=config).stdout)
    assert plugins["testplugin"]["status"] == "disabled"
    assert plugins["testplugin"]["hooks"] == []
    result = meshd(plugin_path, tmp_path, "testplugin-echo", config=config)
    assert result.returncode == 2
    assert "No such command 'testplugin-echo'" in result.stderr
