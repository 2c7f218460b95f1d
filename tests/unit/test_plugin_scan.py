"""The entry-point scan: installed plugins found, loaded and ordered as documented."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from meshd.plugins import build_plugin_host


def _distribution(site: Path, dir_name: str, name: str, version: str, entry_points: str) -> None:
    dist = site / dir_name
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nName: not-a-header\n"
    )
    (dist / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first on sys.path, with a plugin module in it."""
    (tmp_path / "scan_probe_plugin.py").write_text(
        "from meshd import hookimpl\n"
        "class Probe:\n"
        "    @hookimpl\n"
        "    def meshd_startup(self, agent):\n"
        "        pass\n"
        "plugin = Probe()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("scan_probe_plugin", None)


def test_an_installed_plugin_is_loaded_with_its_distribution_and_version(site: Path) -> None:
    _distribution(
        site,
        "scan_probe-1.2.3.dist-info",
        "scan-probe",
        "1.2.3",
        "[console_scripts]\nx = y:z\n\n[meshd.plugins]\nprobe = scan_probe_plugin:plugin\n",
    )
    infos = {i.name: i for i in build_plugin_host().plugins()}
    probe = infos["probe"]
    assert (probe.distribution, probe.version, probe.status) == ("scan-probe", "1.2.3", "loaded")
    assert probe.hooks == ("meshd_startup",)
    # The standard plugins come first, then the others by name.
    assert [i.standard for i in infos.values()] == sorted(
        (i.standard for i in infos.values()), reverse=True
    )


def test_the_first_distribution_of_a_name_on_sys_path_wins(
    site: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    later = tmp_path_factory.mktemp("later")
    _distribution(
        site, "scan_probe-2.0.dist-info", "scan-probe", "2.0", "[meshd.plugins]\n"
    )  # this one declares no plugin: it shadows the other all the same
    _distribution(
        later,
        "scan_probe-1.0.dist-info",
        "scan-probe",
        "1.0",
        "[meshd.plugins]\nprobe = scan_probe_plugin:plugin\n",
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(sys, "path", [*sys.path, str(later)])
    assert "probe" not in {i.name for i in build_plugin_host().plugins()}


def test_a_plugin_that_does_not_import_is_listed_as_failed(site: Path) -> None:
    _distribution(
        site,
        "scan_broken-0.1.dist-info",
        "scan-broken",
        "0.1",
        "[meshd.plugins]\nbroken = scan_no_such_module:plugin\n",
    )
    broken = {i.name: i for i in build_plugin_host().plugins()}["broken"]
    assert broken.status == "failed"
    assert broken.error is not None
    assert broken.error.startswith("ModuleNotFoundError")
