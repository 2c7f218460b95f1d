"""docs/plugins.md keeps up with meshd/hookspecs.py: every hook has its section."""

from __future__ import annotations

import inspect
from pathlib import Path

from meshd import hookspecs

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def test_every_hook_has_a_section_with_an_example_in_the_plugin_guide() -> None:
    text = GUIDE.read_text()
    sections = {
        line.split("`")[1].split("(")[0]: line
        for line in text.splitlines()
        if line.startswith("### `")
    }
    specs = {
        n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("meshd_")
    }
    assert set(sections) == specs
    for name in specs:
        body = text.split(sections[name], 1)[1].split("\n### ", 1)[0]
        assert f"def {name}(" in body, f"{name}: no example"
