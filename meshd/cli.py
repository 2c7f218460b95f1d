"""The command line: ``meshd <command>``.

Commands are loaded lazily from the modules that own them (importing pyroute2
for ``meshd version`` would be waste), and installed plugins add their own
through the ``meshd_cli`` hook. The same goes for the heavy imports of this
module's own commands: every command pays for this module's imports, and two
Python start-ups (``meshd join``'s and the agent's) sit in every node's join.
Only :func:`main` turns errors into messages and exit codes: a MeshdError is one
line on stderr, never a traceback.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

import click

from meshd import __version__
from meshd import config as config_mod
from meshd.errors import MeshdError
from meshd.invocation import CliState

log = logging.getLogger(__name__)

# name -> "module:attribute" of a click command; imported only when used.
LAZY_COMMANDS: dict[str, str] = {
    "agent": "meshd.commands:agent",
    "init": "meshd.commands:init",
    "join": "meshd.commands:join",
    "key": "meshd.commands:key",
    "lab": "meshd.lab.cli:lab",
    "leave": "meshd.commands:leave",
    "revoke": "meshd.commands:revoke",
    "status": "meshd.commands:status",
    "token": "meshd.commands:token",
}


class MeshdGroup(click.Group):
    """A group that imports built-in commands on use and asks plugins for theirs."""

    def _plugin_commands(self, ctx: click.Context) -> dict[str, click.Command]:
        state = ctx.ensure_object(CliState)
        group = click.Group()
        try:
            state.plugins.cli(group)
        except MeshdError as exc:
            # A broken config must not hide the built-in commands (or `--help`).
            log.debug("plugin commands unavailable: %s", exc)
            return {}
        return {n: c for n, c in group.commands.items() if n not in self.commands}

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx)) | set(LAZY_COMMANDS)
        return sorted(names | set(self._plugin_commands(ctx)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        if cmd_name in LAZY_COMMANDS:
            module_name, attr = LAZY_COMMANDS[cmd_name].split(":")
            found: click.Command = getattr(importlib.import_module(module_name), attr)
            return found
        return self._plugin_commands(ctx).get(cmd_name)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pyroute2 logs every netlink message at DEBUG: far too much for meshd's debug level.
    logging.getLogger("pyroute2").setLevel(max(logging.INFO, logging.getLogger().level))


@click.group(
    cls=MeshdGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    envvar=config_mod.ENV_CONFIG,
    help=f"Config file [env {config_mod.ENV_CONFIG}; default {config_mod.DEFAULT_CONFIG_PATH}].",
)
@click.option(
    "--state-dir",
    metavar="DIR",
    envvar=config_mod.ENV_STATE_DIR,
    help=(
        f"State directory [env {config_mod.ENV_STATE_DIR}; default {config_mod.DEFAULT_STATE_DIR}]."
    ),
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    help="How much to log on stderr.",
)
@click.version_option(__version__, "-V", "--version", prog_name="meshd")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, state_dir: str | None, log_level: str) -> None:
    """meshd: a WireGuard mesh network with no server.

    Every machine runs the same agent. Members find each other through gossip
    (Serf) and reach each other directly over WireGuard; no machine is special,
    any of them can be down.

    \b
    First machine:     meshd init --network lab --cidr 100.80.0.0/16
    Other machines:    meshd join SEED-HOST --token-file token
    See the mesh:      meshd status
    Try it locally:    meshd lab up --nodes 4   (network namespaces, needs root)
    """
    _setup_logging(log_level)
    ctx.obj = CliState(config_path=config_path, state_dir=state_dir)
    sub = ctx.invoked_subcommand
    if sub is not None and sub not in cli.commands and sub not in LAZY_COMMANDS:
        # A plugin's command: click resolved it before this ran, with plugins configured
        # from the default config; configure them again from this invocation's options.
        ctx.obj.plugins  # noqa: B018


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def version(as_json: bool) -> None:
    """Print meshd's version (and Python's)."""
    info = {"meshd": __version__, "python": sys.version.split()[0]}
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"meshd {info['meshd']} (Python {info['python']})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def plugins(state: CliState, as_json: bool) -> None:
    """List plugins: name, version, where each comes from and the hooks it implements.

    Plugins are installed Python distributions that declare an entry point in
    the group 'meshd.plugins'. Disable one with  [plugins] disable = ["NAME"]
    in the config file. A plugin that failed to load is listed with its error.
    """
    from tabulate import tabulate  # only this command prints a table

    infos = state.plugins.plugins()
    if as_json:
        click.echo(json.dumps({"plugins": [i.as_dict() for i in infos]}, indent=2))
        return
    rows = [
        [
            i.name,
            i.version,
            "meshd (standard)" if i.standard else i.distribution,
            i.status if i.status != "failed" else f"failed: {i.error}",
            ", ".join(h.removeprefix("meshd_") for h in i.hooks),
        ]
        for i in infos
    ]
    click.echo(tabulate(rows, headers=["NAME", "VERSION", "FROM", "STATUS", "HOOKS"]))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``meshd`` console script."""
    debug = os.environ.get("MESHD_DEBUG") == "1"
    try:
        code = cli.main(args=argv, prog_name="meshd", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("meshd: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MeshdError as exc:
        if debug:
            raise
        click.echo(f"meshd: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("meshd: interrupted", err=True)
        sys.exit(130)
    # Without standalone mode, click returns a command's ctx.exit(code) instead of exiting.
    sys.exit(code if isinstance(code, int) else 0)
