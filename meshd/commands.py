"""The mesh commands: ``init``, ``join``, ``token create``, ``agent``, ``status``, ``leave``.

Each command checks everything it can before it writes anything: a bad token,
a taken state directory or an unreachable seed leave no state behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from meshd import control
from meshd.b64 import decode_b64
from meshd.bootstrap import (
    check_endpoint,
    create_network,
    discover_seeds,
    join_network,
    local_endpoint,
    parse_duration,
)
from meshd.errors import DecodeError, InputError, StateError
from meshd.graph import edges_of_status, to_dot
from meshd.invocation import CliState
from meshd.node import (
    NodeStore,
)
from meshd.pki.ca import NetworkCA
from meshd.pki.token import (
    Seed,
    Token,
    create_token,
    parse_token,
    read_token_source,
)
from meshd.state import write_secret
from meshd.timetext import ago, utc

TOKEN_FILE = "join-token"
DEFAULT_CIDR = "100.80.0.0/16"


def _gossip_key(text: str) -> bytes:
    try:
        return decode_b64(text)
    except DecodeError as exc:
        raise StateError(f"Serf's keyring holds a malformed key: {exc}") from None


def _endpoint_option(value: str | None) -> str | None:
    try:
        return check_endpoint(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


def _write_token(path: Path | None, token: Token, *, echo: bool) -> None:
    text = token.encode()
    if path is not None:
        write_secret(path, text + "\n")
        expires = utc(token.expires_at)
        click.echo(f"join token written to {path} (0600, expires {expires})", err=echo)
    if echo:
        click.echo(text)


def _start_agent(state: CliState, mode: str) -> None:
    """Start the agent: in this process, through systemd, or detached with a log file."""
    if mode == "none":
        click.echo("not starting the agent (--no-start); start it with: meshd agent")
        return
    if mode == "foreground":
        run_agent(state)
        return
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        found = subprocess.run(
            ["systemctl", "cat", "meshd.service"], capture_output=True, check=False
        )
        if found.returncode == 0:
            subprocess.run(["systemctl", "enable", "--now", "meshd.service"], check=True)
            click.echo("agent started: systemctl status meshd")
            return
    store_dir = state.config.state_dir
    log_path = store_dir / "agent.log"
    child = _fork_agent(state, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            control.call(store_dir, "status", timeout=2)
            click.echo(f"agent started in the background (log: {log_path})")
            return
        except control.ControlError:
            time.sleep(0.1)
        ended, status = os.waitpid(child, os.WNOHANG)
        if ended:
            raise StateError(
                f"the agent exited at start (status {os.waitstatus_to_exitcode(status)}); "
                f"see {log_path}"
            )
    raise StateError(f"the agent did not start within 20 s; see {log_path}")


def _fork_agent(state: CliState, log_path: Path) -> int:
    """Become the agent in a detached child of this process; the child's pid.

    A fork, not a new ``python -m meshd agent``: this process has imported most of
    what the agent needs, and a second interpreter start-up was a third of a join's
    time on a small mesh (bench/mesh_join.py). The child runs in its own session with
    stdin on /dev/null and stdout/stderr appended to ``log_path``, and never returns
    into the command that forked it.
    """
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(log_fd)
        return pid
    code = 1
    try:
        os.setsid()
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null_fd)
        os.close(log_fd)
        root = logging.getLogger()
        root.setLevel(min(root.level, logging.INFO))
        run_agent(state)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logging.getLogger(__name__).exception("the agent failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never back into click, nor the parent's atexit handlers


def run_agent(state: CliState) -> None:
    from meshd.agent import Agent
    from meshd.tasks import DEFAULT_LOOP, ENV_LOOP, event_loop_factory, run

    # $MESHD_LOOP picks the loop (asyncio or uvloop); bench/uvloop.py measures both.
    # pyroute2 (the kernel backend) runs on a selector loop of its own either way.
    loop_factory = event_loop_factory(os.environ.get(ENV_LOOP, DEFAULT_LOOP))
    agent = Agent(state.config, state.plugins, NodeStore(state.config.state_dir))
    run(agent.run(), loop_factory=loop_factory)


start_options = [
    click.option(
        "--foreground",
        "start",
        flag_value="foreground",
        help="Run the agent in this process (Ctrl-C stops it).",
    ),
    click.option("--no-start", "start", flag_value="none", help="Only write the node's state."),
    click.option(
        "--background",
        "start",
        flag_value="background",
        default=True,
        help="Start the agent as the service would (systemd if installed, else detached). "
        "The default.",
    ),
]


address_option = click.option(
    "--address",
    metavar="IP",
    help="This node's static mesh address (default: derived from its key).",
)
endpoint_option = click.option(
    "--endpoint",
    callback=lambda c, p, v: _endpoint_option(v),
    metavar="HOST:PORT",
    help="Where other nodes reach this node's WireGuard port (default: its first address).",
)


_F = TypeVar("_F", bound=Callable[..., Any])


def token_source_option(what: str) -> Callable[[_F], _F]:
    """``--token-file FILE`` for a command that reads a token (never from argv)."""
    return click.option(
        "--token-file",
        "token_source",
        metavar="FILE",
        help=f"{what} [default: env MESHD_TOKEN].",
    )


def with_start_options(func: Any) -> Any:
    for option in reversed(start_options):
        func = option(func)
    return func


@click.command()
@click.option("--network", "network_name", required=True, help="The network's name.")
@click.option(
    "--cidr",
    default=DEFAULT_CIDR,
    show_default=True,
    help="The network's IPv4 range; every node gets an address in it.",
)
@click.option(
    "--ipv6/--no-ipv6",
    default=True,
    show_default=True,
    help="Also give every node an address in a ULA /64 derived from the network.",
)
@address_option
@endpoint_option
@click.option(
    "--token-ttl",
    default="24h",
    show_default=True,
    help="How long the join token is valid (30m, 24h, 7d).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Where to write the join token [default: STATE_DIR/{TOKEN_FILE}].",
)
@click.option(
    "--print-token", is_flag=True, help="Also print the token on stdout (it is a secret)."
)
@with_start_options
@click.pass_obj
def init(
    state: CliState,
    network_name: str,
    cidr: str,
    ipv6: bool,
    address: str | None,
    endpoint: str | None,
    token_ttl: str,
    token_file: Path | None,
    print_token: bool,
    start: str,
) -> None:
    """Create a network with this machine as its first member.

    Makes the network CA (keep STATE_DIR/ca.key safe: it signs tokens and
    revocations), the gossip key and this node's identity, writes a join
    token for other machines, then starts the agent.

    \b
    Example:
      meshd init --network lab --cidr 100.80.0.0/16
      scp /var/lib/meshd/join-token other-host:
      other-host$ meshd join THIS-HOST --token-file join-token
    """
    created = create_network(
        state.config,
        state.plugins,
        network_name=network_name,
        cidr=cidr,
        ipv6=ipv6,
        address=address,
        endpoint=endpoint,
        token_ttl=parse_duration(token_ttl, option="--token-ttl"),
    )
    node, network = created.node, created.node.network
    click.echo(
        f"network {network_name} ({network.network_id}) created: {network.cidr4}"
        + (f", {network.cidr6}" if network.cidr6 else "")
    )
    click.echo(f"this node: {node.name} at {', '.join(map(str, node.addresses.all()))}")
    store = NodeStore(state.config.state_dir)
    _write_token(token_file or store.path(TOKEN_FILE), created.token, echo=print_token)
    _start_agent(state, start)


@click.group()
def token() -> None:
    """Join tokens: what a new machine needs to join (a secret; it expires)."""


@token.command("create")
@click.option(
    "--ttl", default="24h", show_default=True, help="How long it is valid (30m, 24h, 7d)."
)
@endpoint_option
@click.option(
    "--out",
    "out",
    metavar="FILE",
    help="Write it to FILE (0600); '-' prints it [default: STATE_DIR/join-token].",
)
@click.pass_obj
def token_create(state: CliState, ttl: str, endpoint: str | None, out: str | None) -> None:
    """Make a new join token on a machine that holds the network CA key."""
    store = NodeStore(state.config.state_dir)
    node = store.load()
    secret = store.ca_secret()
    if secret is None:
        raise StateError(
            f"this machine does not hold the network CA key ({store.path('ca.key')}); "
            "create tokens where 'meshd init' ran"
        )
    ca = NetworkCA.from_secret(node.network.name, secret)
    seed = Seed(
        endpoint or local_endpoint(state.config),
        state.config.enrol.port,
        node.keys.public_key,
        node.addresses.ipv4,
    )
    current = store.current_gossip_key()
    created = create_token(
        ca,
        gossip_key=_gossip_key(current) if current else node.gossip_key,
        cidr4=node.network.cidr4,
        cidr6=node.network.cidr6,
        seeds=[seed],
        ttl=parse_duration(ttl, option="--ttl"),
    )
    if out == "-":
        _write_token(None, created, echo=True)
    else:
        _write_token(Path(out) if out else store.path(TOKEN_FILE), created, echo=False)


@click.command()
@click.argument("seed", required=False, metavar="[SEED-HOST[:ENROL-PORT]]")
@token_source_option("Read the token from FILE ('-' for stdin), removed after a successful join")
@address_option
@endpoint_option
@click.option(
    "--discover",
    is_flag=True,
    help="Find a seed of the token's network on the LAN (mDNS) instead of SEED.",
)
@click.option(
    "--discover-timeout",
    type=click.FloatRange(0.5, 120),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="How long --discover looks before giving up.",
)
@with_start_options
@click.pass_obj
def join(
    state: CliState,
    seed: str | None,
    token_source: str | None,
    address: str | None,
    endpoint: str | None,
    discover: bool,
    discover_timeout: float,
    start: str,
) -> None:
    """Join a network through any member (SEED), the seeds the token names, or
    with --discover a seed found on the LAN.

    The token comes from a file, stdin or the MESHD_TOKEN variable, never from
    the command line (it would show in 'ps'). Nothing is written unless the
    seed admits this node. A seed found by --discover is a hint: it must show a
    certificate of the token's network, or the next one is tried.

    \b
    Examples:
      meshd join 192.0.2.10 --token-file join-token
      meshd join --discover --token-file join-token
    """
    if discover and seed is not None:
        raise InputError("give SEED-HOST or --discover, not both", option="--discover")
    token_ = parse_token(read_token_source(token_source), int(time.time()))

    def report(line: str) -> None:
        click.echo(f"meshd: {line}", err=True)

    targets = (
        discover_seeds(state.config, token_, timeout=discover_timeout, report=report)
        if discover
        else None
    )
    # The agent this command may become, or start, must not inherit the secret.
    os.environ.pop("MESHD_TOKEN", None)
    joined = join_network(
        state.config,
        state.plugins,
        token_,
        seed=seed,
        address=address,
        endpoint=endpoint,
        report=report,
        targets=targets,
    )
    node, network = joined.node, joined.node.network
    if token_source not in (None, "-") and not token_source.startswith("env:"):
        # A token is a secret that admits machines: once used, it has no business here.
        Path(token_source).unlink(missing_ok=True)
    click.echo(
        f"joined network {network.name} ({network.network_id}) through {joined.seed_name}: "
        f"this node is {node.name} at {', '.join(map(str, node.addresses.all()))}"
    )
    _start_agent(state, start)


@click.command()
@click.pass_obj
def agent(state: CliState) -> None:
    """Run the agent in the foreground (what the systemd/launchd service runs).

    It keeps WireGuard in line with the gossip view until SIGTERM; SIGHUP
    re-reads the plugins' configuration.
    """
    run_agent(state)


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def _printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (escape sequences from a rogue
    member's name, say) shown escaped, never sent raw."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _path(row: dict[str, Any]) -> str:
    if row.get("excluded"):
        return f"excluded: {row['excluded']}"
    if row.get("path"):
        reason = f" ({row['path_reason']})" if row.get("path_reason") else ""
        return f"{row['path']}{reason}"
    if row.get("via"):
        return f"via {row['via']}"
    return "direct" if row.get("peer") else "-"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--graph",
    "as_graph",
    is_flag=True,
    help="Print this node's view of the mesh as Graphviz DOT (edges coloured by path).",
)
@click.pass_obj
def status(state: CliState, as_json: bool, as_graph: bool) -> None:
    """This node, then every other member: addresses, gossip state, endpoint,
    last handshake, traffic and whether it is reached directly."""
    if as_json and as_graph:
        raise click.UsageError("--json and --graph are two formats: choose one")
    result = control.call(state.config.state_dir, "status")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if as_graph:
        now = time.time()
        members = [(str(r["name"]), str(r["gossip"])) for r in result["peers"]]
        edges = edges_of_status(result, now)
        click.echo(to_dot(str(result["node"]["name"]), members, edges, now), nl=False)
        return
    node = result["node"]
    click.echo(
        f"{_printable(node['name'])}  network {node['network']} ({node['network_id']})  "
        f"{', '.join(node['addresses'])}  {node['interface']}:{node['listen_port']}"
        + (f"  NAT: {node['nat']}" if node.get("nat") else "")
    )
    rows = [
        [
            r["name"],
            ", ".join(r["addresses"]),
            r["gossip"],
            r["endpoint"] or "-",
            ago(r["last_handshake"]),
            _bytes(r["rx_bytes"]),
            _bytes(r["tx_bytes"]),
            _path(r),
        ]
        for r in result["peers"]
    ]
    headers = ["PEER", "ADDRESSES", "GOSSIP", "ENDPOINT", "HANDSHAKE", "RX", "TX", "PATH"]
    rows = [[_printable(str(cell)) for cell in row] for row in rows]
    from tabulate import tabulate  # only status prints a table: spare every other command

    click.echo(tabulate(rows, headers=headers) if rows else "no other members yet")
    routes = _route_rows(result)
    if routes:
        click.echo("")
        click.echo(tabulate(routes, headers=["ROUTE", "GATEWAY", "STATE"]))


def _route_rows(result: dict[str, Any]) -> list[list[str]]:
    """Routes this node advertises, then every member's, with what this node does with them."""
    node = result["node"]
    rows = [
        [
            r["prefix"],
            f"{node['name']} (this node)",
            "advertised, approved" if r["approved"] else "advertised, not approved by the CA",
        ]
        for r in node.get("routes", [])
    ]
    for peer in result["peers"]:
        for r in peer.get("routes", []):
            if not r["approved"]:
                state = "ignored: not approved by the CA"
            elif r["installed"]:
                state = "approved, in use"
            elif r["prefix"] in ("0.0.0.0/0", "::/0"):
                state = "approved exit node, not used here (meshd exit use)"
            else:
                state = "approved, standby"
            rows.append([r["prefix"], peer["name"], state])
    return [[_printable(cell) for cell in row] for row in rows]


@click.command()
@click.pass_obj
def leave(state: CliState) -> None:
    """Leave the mesh gracefully: the others drop this node at once, the agent stops."""
    state_dir = state.config.state_dir
    result = control.call(state_dir, "leave")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and control.socket_path(state_dir).exists():
        time.sleep(0.2)
    click.echo(f"{result['leaving']} left the mesh")


@click.command()
@click.argument("node")
@click.option(
    "--keep-token",
    is_flag=True,
    help="Do not revoke the token NODE joined with (other machines may still join with it).",
)
@click.option(
    "--key",
    metavar="PUBLIC-KEY",
    help="Revoke this WireGuard key of NODE (a machine no member remembers, or its old key "
    "after 'meshd key rotate-wireguard').",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def revoke(state: CliState, node: str, keep_token: bool, key: str | None, yes: bool) -> None:
    """Throw NODE (a name or a mesh address) out of the network for good, on a machine
    holding the CA key.

    Signs a revocation of NODE's certificate and WireGuard key and gossips it:
    every member drops NODE as a peer at once and refuses that identity from
    then on, also members that were down (they learn it when they return).

    The token NODE joined with is revoked too (unless --keep-token): nobody can
    join with it any more, so a wiped NODE cannot come back with its old token
    file. Machines that joined with that token earlier keep their place. NODE
    can come back only with a new token, as a new identity.

    \b
    Example:
      meshd revoke edge-7
      meshd revoke 100.80.12.7                      # the same, by its mesh address
      meshd revoke edge-7 --key OLD-PUBLIC-KEY        # e.g. the key before a rotation
      meshd token revoke --token-file old-token     # a token on its own
    """
    if not yes:
        click.confirm(f"revoke {node} for good?", abort=True)
    result = control.call(
        state.config.state_dir, "revoke", name=node, keep_token=keep_token, key=key
    )
    if result["certificate"] is None:
        click.echo(f"revoked the key {result['public_key']} of {result['revoked']}")
    else:
        click.echo(f"revoked {result['revoked']} (certificate {result['certificate']})")
    if result.get("token_revoked"):
        click.echo(f"revoked the token it joined with (enrolment key {result['token_revoked']})")


@token.command("revoke")
@token_source_option("The token to revoke ('-' for stdin)")
@click.pass_obj
def token_revoke(state: CliState, token_source: str | None) -> None:
    """Revoke a token on a machine holding the CA key: nobody can join with it any more.

    Machines that already joined with it keep their place; revoke them one by one
    with 'meshd revoke NODE'.
    """
    text = read_token_source(token_source)
    result = control.call(state.config.state_dir, "revoke-token", token=text)
    click.echo(f"revoked the token (enrolment key {result['revoked_token']})")


@click.group()
def key() -> None:
    """Rotate keys: the network's gossip key, or this node's WireGuard key."""


@key.command("rotate-gossip")
@click.pass_obj
def key_rotate_gossip(state: CliState) -> None:
    """Give the whole network a new gossip key, with no loss of connectivity.

    Installs a new key on every member, makes it the primary one, then drops
    the old one. A member that is down meanwhile keeps the old key and cannot
    gossip when it returns: re-join it with a new token.
    """
    result = control.call(state.config.state_dir, "rotate-gossip", timeout=60)
    click.echo(
        f"gossip key rotated: {result['members']} member(s) confirmed "
        f"({result['required']} live member(s) needed it)"
    )


@key.command("rotate-wireguard")
@token_source_option("A current join token ('-' for stdin)")
@click.pass_obj
def key_rotate_wireguard(state: CliState, token_source: str | None) -> None:
    """Give this node a new WireGuard key and certificate.

    The new certificate is signed with the enrolment key of a current join
    token (so the CA machine may be offline); the others switch to the new key
    as soon as they see this node's new record.
    """
    text = read_token_source(token_source)
    parse_token(text, int(time.time()))  # a bad token is refused here, before the agent
    result = control.call(state.config.state_dir, "rotate-wireguard", token=text, timeout=30)
    click.echo(f"new WireGuard key {result['public_key']} (certificate {result['certificate']})")
