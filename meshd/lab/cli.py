"""``meshd lab``: build a whole network of hosts in namespaces on this machine."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import click
from tabulate import tabulate

from meshd.errors import LabError
from meshd.lab import netns
from meshd.lab.lab import Lab
from meshd.lab.mesh import MeshLab, meshd_argv
from meshd.lab.plan import NAT_TYPES, TOPOLOGIES

ENV_LAB = "MESHD_LAB"
DEFAULT_LAB = "lab"

lab_option = click.option(
    "--lab",
    "lab_id",
    metavar="ID",
    envvar=ENV_LAB,
    default=DEFAULT_LAB,
    show_default=True,
    help=f"Which lab (1-8 of a-z, 0-9) [env {ENV_LAB}].",
)


@click.group()
def lab() -> None:
    """A test network on this machine: hosts in Linux network namespaces (needs root).

    \b
    meshd lab up --nodes 4                  4 hosts on one switch (198.18.0.1-4), meshd on each
    meshd lab up --nodes 5 --topology nat   1 public host, 4 hosts in 2 sites behind NAT routers
    meshd lab up -n 9 -t nat --sites 3 --public 2 --nat-type symmetric
    meshd lab up --nodes 4 --no-mesh        the network alone, no meshd
    meshd lab exec n1 -- ping -c 1 198.18.0.2
    meshd lab ping                          every host pings every mesh address
    meshd lab status
    meshd lab down

    Nothing in a lab can reach outside this machine: its switches live in
    namespaces of their own, not in the machine's network. Several labs can
    exist side by side; pick one with --lab or $MESHD_LAB (default "lab").
    """


@lab.command()
@click.option("--nodes", "-n", type=int, default=4, show_default=True, help="Number of hosts.")
@click.option(
    "--topology",
    "-t",
    type=click.Choice(TOPOLOGIES),
    default="flat",
    show_default=True,
    help="flat: every host on one switch. nat: sites behind NAT routers, plus public hosts.",
)
@click.option("--sites", type=int, default=2, show_default=True, help="nat: number of sites.")
@click.option(
    "--public", type=int, default=1, show_default=True, help="nat: hosts outside any NAT."
)
@click.option(
    "--nat-type",
    type=click.Choice(NAT_TYPES),
    default="restricted",
    show_default=True,
    help="nat: restricted = Linux masquerade, hole punching works; "
    "symmetric = a random port per destination, it does not.",
)
@click.option("--no-check", is_flag=True, help="Skip the reachability checks at the end.")
@click.option(
    "--mesh/--no-mesh",
    default=True,
    show_default=True,
    help="Run meshd on every host: the first inits the network, each other joins through "
    "a random earlier one it can reach (nat: a public host or one of its own site).",
)
@click.option(
    "--timeout",
    type=float,
    default=60,
    show_default=True,
    help="Seconds to wait, once every agent runs, for every mesh pair to answer.",
)
@lab_option
def up(
    nodes: int,
    topology: str,
    sites: int,
    public: int,
    nat_type: str,
    no_check: bool,
    mesh: bool,
    timeout: float,
    lab_id: str,
) -> None:
    """Build a lab, run meshd on every host, and show that every host reaches every other.

    First the underlay: every host pings every other host's lab address. Then
    (with --mesh, the default) a meshd agent on every host, and the same over
    the mesh addresses, through WireGuard, until every pair answers or --timeout.

    In the nat topology hosts n1..nP are public and the others are dealt over
    the sites; a site host reaches public hosts and its own site, and nothing
    from outside reaches into a site, exactly as behind a home router ("-" in
    the underlay matrix). Public hosts get [plugins.nat] public = true. Over the
    mesh every pair should answer when the NAT plugin is installed; without it,
    two hosts in different sites have no path ("-" in the mesh matrix too).
    """
    built = Lab.create(
        nodes=nodes,
        topology=topology,
        lab_id=lab_id,
        sites=sites,
        public=public,
        nat_type=nat_type,
        progress=click.echo,
    )
    _print_plan(built)
    if not no_check:
        click.echo("\nreachability (each row pings each column's underlay address):")
        matrix = built.ping_matrix()
        click.echo(format_matrix(built, matrix))
        if not matrix["ok"]:
            raise LabError(
                f"lab {built.lab_id} is up but not as planned: {', '.join(matrix['failed'])}"
            )
    if mesh:
        _start_mesh(built, check=not no_check, timeout=timeout)
        return
    click.echo(
        f"\nlab {built.lab_id} is up.  Try: meshd lab exec --lab {built.lab_id} n1 -- ip addr"
    )


def _start_mesh(built: Lab, *, check: bool, timeout: float) -> None:
    mesh = MeshLab(built)
    click.echo("\nstarting meshd on every host:")
    mesh.up(say=lambda line: click.echo(f"  {line}"))
    if check:
        click.echo()
        if built.topology == "nat" and not mesh.nat_traversal:
            click.echo(
                "the NAT plugin is not installed: hosts in different sites have no path "
                "to each other, over the mesh either"
            )
        missing, took = mesh.wait_mesh(timeout=timeout, say=lambda line: click.echo(line))
        if not missing:
            click.echo(f"every mesh pair that should answer did, after {took:.1f} s")
        click.echo("\nmesh reachability (each row pings each column's mesh address):")
        matrix = mesh.ping_matrix()
        click.echo(format_matrix(built, matrix, mesh.mesh_addresses()))
        if not matrix["ok"]:
            raise LabError(
                f"the mesh in lab {built.lab_id} is incomplete: {', '.join(matrix['failed'])}"
            )
    flag = "" if built.lab_id == DEFAULT_LAB else f" --lab {built.lab_id}"
    click.echo(
        f"\nlab {built.lab_id} is up with meshd on every host.  Try:\n"
        f"  meshd lab meshd{flag} n1 status        # one node's view of the mesh\n"
        f"  meshd lab kill{flag} n1                # crash the first node; the others carry on\n"
        f"  meshd lab ping{flag}                   # every node pings every mesh address\n"
        f"  meshd lab down{flag}"
    )


@lab.command()
@lab_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--deadline", type=float, default=3, show_default=True, help="Seconds per pair.")
def ping(lab_id: str, as_json: bool, deadline: float) -> None:
    """Every host pings every host's mesh address; exit 0 only if all answer as they should.

    In a nat lab the underlay comes first: there a site host reaches public hosts
    and its own site only, so its pings into another site fail by design ("-",
    not an error). Over the mesh every pair should answer when the NAT plugin is
    installed; without it, pairs in different sites have no path ("-" too).
    "FAIL" marks a pair that does not do what it should.

    \b
    --json: {"addresses": {host: mesh address}, "ok", "failed": ["n1->n2", ...],
             "pairs": [{"src", "dst", "address", "reachable", "expected", "rtt_ms"}],
             "underlay": {"ok", "failed", "pairs"}  (nat labs only)}
    """
    netns.require_root()
    found = Lab.load(lab_id)
    mesh = MeshLab(found)
    addresses = mesh.mesh_addresses()
    if not addresses:
        raise LabError(f"no host of lab {lab_id} runs meshd (lab up --mesh)")
    underlay = found.ping_matrix(deadline=deadline) if found.topology == "nat" else None
    matrix = mesh.ping_matrix(deadline=deadline)
    ok = matrix["ok"] and (underlay is None or underlay["ok"])
    if as_json:
        extra = {} if underlay is None else {"underlay": underlay}
        click.echo(json.dumps({"addresses": addresses, **matrix, **extra}, indent=2))
        sys.exit(0 if ok else 1)
    if underlay is not None:
        click.echo("underlay (each row pings each column's lab address):")
        click.echo(format_matrix(found, underlay))
        click.echo(f"{_count(underlay)}\n\nmesh (each row pings each column's mesh address):")
    click.echo(format_matrix(found, matrix, addresses))
    click.echo(_count(matrix))
    sys.exit(0 if ok else 1)


def _count(matrix: dict[str, Any]) -> str:
    """One line, e.g. "40/72 pairs answered, 32 blocked as planned, 0 failed"."""
    pairs = matrix["pairs"]
    answered = sum(1 for p in pairs if p["reachable"])
    blocked = sum(1 for p in pairs if not p["expected"] and not p["reachable"])
    return (
        f"{answered}/{len(pairs)} pairs answered, {blocked} blocked as planned, "
        f"{len(matrix['failed'])} failed"
    )


_SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}


@lab.command()
@lab_option
@click.option(
    "--signal",
    "sig",
    type=click.Choice(sorted(_SIGNALS)),
    default="KILL",
    show_default=True,
    help="KILL: a crash (no goodbye); TERM: a clean stop.",
)
@click.argument("node")
def kill(lab_id: str, sig: str, node: str) -> None:
    """Stop NODE's meshd agent: a crash by default (kill -9)."""
    netns.require_root()
    mesh = MeshLab(Lab.load(lab_id))
    if not mesh.stop(node, sig=_SIGNALS[sig]):
        raise LabError(f"no meshd agent runs on {node}")
    click.echo(f"{node}: agent stopped (SIG{sig})")


@lab.command()
@lab_option
@click.argument("node")
def start(lab_id: str, node: str) -> None:
    """Start NODE's meshd agent again (after lab kill)."""
    netns.require_root()
    mesh = MeshLab(Lab.load(lab_id))
    if mesh.running(node):
        raise LabError(f"the agent on {node} already runs")
    mesh.start(node)
    mesh.wait_ready(node)
    click.echo(f"{node}: agent started")


@lab.command(name="meshd", context_settings={"ignore_unknown_options": True})
@lab_option
@click.argument("node")
@click.argument("args", nargs=-1, required=True, type=click.UNPROCESSED)
def meshd_(lab_id: str, node: str, args: tuple[str, ...]) -> None:
    """Run a meshd command as NODE (its config and state): meshd lab meshd n2 status"""
    netns.require_root()
    mesh = MeshLab(Lab.load(lab_id))
    argv = netns.exec_argv(
        mesh.lab.netns_of(node),
        [*meshd_argv(), "--config", str(mesh.config_path(node)), *args],
    )
    sys.exit(subprocess.call(argv))


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@lab_option
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(lab_id: str, node: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside NODE (a host "n1", a router "r1", or "hub"/"inet"); exit with its code.

    \b
    meshd lab exec n2 -- ip route
    meshd lab exec r1 -- nft list ruleset
    """
    netns.require_root()
    target = Lab.load(lab_id)
    argv = netns.exec_argv(target.netns_of(node), command)
    try:
        code = subprocess.call(argv)
    except OSError as exc:
        raise LabError(f"cannot run {command[0]}: {exc.strerror}") from exc
    # Not ctx.exit(): meshd's main runs click non-standalone, which drops that code.
    sys.exit(code)


@lab.command()
@lab_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(lab_id: str, as_json: bool) -> None:
    """Show a lab's hosts, routers and the processes started in it."""
    try:
        found = Lab.load(lab_id)
    except LabError as exc:
        others = Lab.list_ids()
        if others and "no lab" in str(exc):
            raise LabError(f"{exc}; labs on this machine: {', '.join(others)}") from None
        raise
    if as_json:
        click.echo(json.dumps(status_dict(found), indent=2))
        return
    _print_plan(found)
    procs = found.processes()
    if procs:
        click.echo()
        rows = [
            [
                p["node"],
                p["name"],
                p["pid"],
                "running" if p["alive"] else "exited",
                " ".join(p["argv"]),
            ]
            for p in procs
        ]
        click.echo(tabulate(rows, headers=["NODE", "PROCESS", "PID", "STATE", "COMMAND"]))
    others = [i for i in Lab.list_ids() if i != lab_id]
    if others:
        click.echo(f"\nother labs on this machine: {', '.join(others)}")


@lab.command(name="list")
def list_() -> None:
    """List the labs on this machine (also ones half-built or crashed)."""
    for lab_id in Lab.list_ids():
        click.echo(lab_id)


@lab.command()
@lab_option
@click.option("--all", "all_labs", is_flag=True, help="Take down every lab on this machine.")
def down(lab_id: str, all_labs: bool) -> None:
    """Remove a lab: its processes, namespaces and files. Safe to repeat.

    Works from the lab's names alone, so it also cleans up after a crashed
    or interrupted 'meshd lab up'.
    """
    if all_labs:
        removed = Lab.down_all()
        click.echo(f"took down {len(removed)} lab(s){': ' + ', '.join(removed) if removed else ''}")
        return
    if Lab.down_by_id(lab_id):
        click.echo(f"lab {lab_id} is down")
    else:
        click.echo(f"no lab {lab_id}; nothing to do")


def status_dict(found: Lab) -> dict[str, Any]:
    data = found.plan.to_dict()
    data["dir"] = str(found.dir)
    data["processes"] = found.processes()
    return data


def _print_plan(found: Lab) -> None:
    rows = [
        [
            n.name,
            n.cidr,
            n.site or ("public" if found.topology == "nat" else "-"),
            n.gateway or "-",
            n.netns,
        ]
        for n in found.nodes
    ]
    click.echo(tabulate(rows, headers=["HOST", "ADDRESS", "SITE", "GATEWAY", "NAMESPACE"]))
    if found.routers:
        click.echo()
        rrows = [
            [r.name, r.site, r.wan_address, r.lan_cidr, found.plan.nat_type, r.netns]
            for r in found.routers
        ]
        headers = ["ROUTER", "SITE", "WAN", "LAN", "NAT", "NAMESPACE"]
        click.echo(tabulate(rrows, headers=headers))


def format_matrix(found: Lab, matrix: dict[str, Any], only: dict[str, str] | None = None) -> str:
    """A table: "ok" answered, "-" blocked as planned (NAT), "FAIL" not as planned."""
    names = [n.name for n in found.nodes if only is None or n.name in only]
    cell: dict[tuple[str, str], str] = {}
    for pair in matrix["pairs"]:
        if pair["reachable"] != pair["expected"]:
            mark = "FAIL"
        elif pair["reachable"]:
            mark = "ok"
        else:
            mark = "-"
        cell[(pair["src"], pair["dst"])] = mark
    rows = [[src, *(cell.get((src, dst), "") for dst in names)] for src in names]
    return tabulate(rows, headers=["from \\ to", *names])
