"""The package face plugins import: complete, cheap to import, and all they import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import meshd
from meshd import hookspecs

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SOURCES = sorted(
    [*(ROOT / "plugins").rglob("*.py"), *(ROOT / "tests" / "fixtures").rglob("*.py")]
)


def meshd_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name.split(".")[0] == "meshd"]


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_meshd_package(path: Path) -> None:
    assert set(meshd_imports(path)) <= {"meshd"}


def test_plugin_sources_are_found() -> None:
    assert len(PLUGIN_SOURCES) >= 4  # the three standard plugins and the test plugin


def test_every_exported_name_resolves() -> None:
    for name in meshd.__all__:
        assert getattr(meshd, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Lab'"):
        _ = meshd.Lab


def test_every_type_a_hookspec_names_is_exported() -> None:
    named = {
        node.id
        for spec in ast.walk(ast.parse(Path(hookspecs.__file__).read_text(encoding="utf-8")))
        if isinstance(spec, ast.FunctionDef) and spec.name.startswith("meshd_")
        for annotation in [*(a.annotation for a in spec.args.args), spec.returns]
        if annotation is not None
        for node in ast.walk(ast.parse(ast.unparse(annotation).strip("'\""), mode="eval"))
        if isinstance(node, ast.Name) and node.id[0].isupper()
    }
    builtin_or_typing = {"Sequence", "Mapping", "IPv4Address", "IPv6Address", "None"}
    assert named - builtin_or_typing <= set(meshd.__all__)
    assert {"AgentAPI", "ConfigView", "PeerPatch"} <= named


def test_importing_meshd_loads_no_types_or_helpers() -> None:
    code = "import meshd, sys; print(sorted(m for m in sys.modules if m.startswith('meshd')))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert loaded.strip() == "['meshd', 'meshd.errors']"
