"""``meshd ca``: rotate the network CA to a new key without downtime, then retire the old one.

The work is done by the running agent on the machine holding the CA key
(:mod:`meshd.agent.rotation`); these commands ask it and report progress.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from meshd import control
from meshd.bootstrap import parse_duration
from meshd.errors import IdentityError
from meshd.invocation import CliState

POLL_INTERVAL = 0.5


@click.group()
def ca() -> None:
    """The network CA: rotate it to a new key, then retire the old one."""


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _wait_for_renewals(state: CliState, timeout: float, *, quiet: bool) -> dict[str, Any]:
    """Poll the agent until every alive member holds a certificate of the new CA."""
    deadline = time.monotonic() + timeout
    shown: set[str] = set()
    while True:
        progress = control.call(state.config.state_dir, "ca-status")
        for name in progress.get("renewed", []):
            if name not in shown and not quiet:
                click.echo(f"  renewed {name}")
            shown.add(name)
        if not progress.get("pending") or time.monotonic() > deadline:
            return dict(progress)
        time.sleep(POLL_INTERVAL)


@ca.command("rotate")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until every alive member holds a certificate of the new CA.",
)
@click.option("--timeout", default="2m", show_default=True, help="How long to wait (90, 2m, 1h).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def ca_rotate(state: CliState, wait: bool, timeout: str, as_json: bool) -> None:
    """Give the network a new CA key, with no loss of connectivity.

    Run it where the CA key is (where 'meshd init' ran), with the agent running.
    The old CA cross-signs the new key, and every member trusts both from then on.
    The agent renews the certificate of every member it sees (same name, key,
    addresses and expiry, new issuer) and gossips it; each member installs its
    own and re-announces. Members that are down are renewed when they come back.
    No tunnel is touched. New tokens ('meshd token create') name the new CA;
    tokens made before keep working until the old CA is retired.

    When every member is renewed, finish with 'meshd ca retire'.

    \b
    Example:
      meshd ca rotate            # prints each member as it is renewed
      meshd ca status
      meshd ca retire
    """
    seconds = parse_duration(timeout, option="--timeout")
    started = control.call(state.config.state_dir, "ca-rotate", timeout=30)
    if not as_json:
        click.echo(f"new CA key {started['new_ca']}, cross-signed by {started['old_ca']}")
    result = dict(started)
    if wait:
        result.update(_wait_for_renewals(state, seconds, quiet=as_json))
    if as_json:
        _print_json(result)
        return
    renewed, pending = result.get("renewed", []), result.get("pending", [])
    click.echo(f"{len(renewed)} of {len(renewed) + len(pending)} alive member(s) renewed")
    if pending:
        raise IdentityError(
            f"not renewed yet: {', '.join(pending)} (renewal goes on in the agent; "
            "see 'meshd ca status')"
        )
    click.echo("when every member is renewed: meshd ca retire")


@ca.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def ca_status(state: CliState, as_json: bool) -> None:
    """The CA keys this node trusts and, on the CA machine, who is renewed."""
    result = control.call(state.config.state_dir, "ca-status")
    if as_json:
        _print_json(result)
        return
    click.echo(f"trusted CA keys: {', '.join(result['ca_keys'])}")
    if "ca" in result:
        click.echo(f"CA key held here: {result['ca']}")
    if result["rotating"] and "pending" in result:
        click.echo(f"renewed: {', '.join(result['renewed']) or '-'}")
        click.echo(f"not renewed yet: {', '.join(result['pending']) or '-'}")


@ca.command("retire")
@click.option(
    "--force",
    is_flag=True,
    help="Retire even if some alive members are not renewed yet (they are cut off).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def ca_retire(state: CliState, force: bool, as_json: bool) -> None:
    """Finish a CA rotation: every member stops trusting the old CA key.

    Signs, with the new CA, a revocation of the old CA key and gossips it like
    any revocation (members that are down learn it when they return). From
    then on a certificate issued only by the old CA is refused, and so are
    tokens made before the rotation. A member that was not renewed must join
    again with a new token. Refused while an alive member is not renewed,
    unless --force.
    """
    result = control.call(state.config.state_dir, "ca-retire", force=force, timeout=30)
    if as_json:
        _print_json(result)
        return
    click.echo(f"retired CA key(s) {', '.join(result['retired'])}; the CA is {result['ca']}")
    if result["cut_off"]:
        click.echo(f"cut off (not renewed): {', '.join(result['cut_off'])}")
