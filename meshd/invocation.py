"""Per-invocation state of the CLI, shared by :mod:`meshd.cli` and the commands
(its own module, so neither imports the other for it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshd import config as config_mod

if TYPE_CHECKING:
    from meshd.plugins import PluginHost


@dataclass
class CliState:
    """Per-invocation state: the global options, and config/plugins once loaded."""

    config_path: str | None = None
    state_dir: str | None = None
    _config: config_mod.Config | None = None
    _plugins: PluginHost | None = field(default=None, repr=False)

    @property
    def config(self) -> config_mod.Config:
        if self._config is None:
            self._config = config_mod.load(self.config_path, state_dir=self.state_dir)
        return self._config

    @property
    def plugins(self) -> PluginHost:
        if self._plugins is None:
            # Imported on first use: `meshd version` or `--help` never need plugins.
            from meshd.plugins import build_plugin_host

            self._plugins = build_plugin_host(self.config.disabled_plugins)
            self._plugins.configure(self.config.view())
        return self._plugins
