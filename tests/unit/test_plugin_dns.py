"""The dns plugin's pure parts: labels, the view's names, the files, the responder."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.zone
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd import (
    ConfigError,
    ConfigView,
    Member,
    MemberState,
    MeshView,
    NodeIdentity,
    NodeRecord,
    PeerConfig,
)
from meshd_dns import parse_settings
from meshd_dns.export import Exporter
from meshd_dns.names import assign_labels, base_label, check_zone, is_label, zone_from_network
from meshd_dns.records import build_zone, hosts_of_view, render_hosts, render_zone
from meshd_dns.resolved import split_dns_commands
from meshd_dns.responder import answer
from tests.conftest import run_meshd

ip = ipaddress.ip_address
ip_net = ipaddress.ip_network

# --- labels ---------------------------------------------------------------------------

names = st.text(min_size=0, max_size=90)


@given(names)
def test_every_name_gets_a_valid_label(name: str) -> None:
    assert is_label(base_label(name))


@given(st.lists(names, max_size=12))
def test_labels_are_valid_distinct_and_independent_of_order(given_names: list[str]) -> None:
    labels = assign_labels(given_names)
    assert set(labels) == set(given_names)
    assert all(is_label(label) for label in labels.values())
    assert len(set(labels.values())) == len(labels)
    shuffled = list(given_names)
    random.Random(len(given_names)).shuffle(shuffled)
    assert assign_labels(reversed(shuffled)) == labels


@given(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True), st.lists(names))
def test_a_name_that_is_a_label_keeps_it_whoever_else_joins(name: str, others: list[str]) -> None:
    assert assign_labels([name, *others])[name] == name


def test_a_name_dns_does_not_allow_gets_a_valid_label() -> None:
    name = "My Laptop_" + "x" * 60  # spaces, an underscore, 70 characters
    label = assign_labels([name])[name]
    assert label == "my-laptop-" + "x" * 53
    assert is_label(label)
    spelt = base_label("Ünïcödé box")  # punycode, and it decodes back
    assert spelt.startswith("xn--")
    assert spelt[4:].encode().decode("punycode") == "ünïcödé-box"
    assert base_label("___") == "node"
    assert base_label("a..b") == "a-b"  # one label, never two


def test_colliding_names_get_distinct_labels_with_a_suffix_of_their_name() -> None:
    labels = assign_labels(["Web Server", "web_server", "n1"])
    assert labels["n1"] == "n1"
    assert labels["Web Server"] != labels["web_server"]
    for name in ("Web Server", "web_server"):
        assert labels[name].startswith("web-server-")
        assert len(labels[name]) == len("web-server-") + 8
    # A name that is the label already keeps it; the others are suffixed.
    assert assign_labels(["web-server", "Web Server"])["web-server"] == "web-server"
    # Two long names cut to the same 63 characters.
    long_a, long_b = "a" * 70 + "1", "a" * 70 + "2"
    cut = assign_labels([long_a, long_b])
    assert cut[long_a] != cut[long_b]
    assert all(len(label) <= 63 for label in cut.values())


def test_the_zone_defaults_to_network_internal_and_never_local() -> None:
    assert zone_from_network("lab") == "lab.internal"
    assert zone_from_network("My Net") == "my-net.internal"
    assert check_zone("mesh.example.") is None
    assert "multicast DNS" in str(check_zone("mesh.local"))
    assert "not a DNS label" in str(check_zone("bad_zone.internal"))
    assert check_zone("") == "must not be empty"


def test_a_bad_setting_names_the_key() -> None:
    view = ConfigView("meshd.toml", "n1", Path("/var/lib/meshd"), {})
    with pytest.raises(ConfigError, match=r"meshd.toml: plugins.dns.zone: .*multicast DNS"):
        parse_settings({"zone": "lab.local"}, view)
    with pytest.raises(ConfigError, match=r"plugins.dns.files: must be a list of: hosts"):
        parse_settings({"files": ["hosts", "bind"]}, view)
    with pytest.raises(ConfigError, match=r"plugins.dns.colour: unknown key"):
        parse_settings({"colour": "blue"}, view)
    with pytest.raises(ConfigError, match=r"plugins.dns.reload: must be a command as a list"):
        parse_settings({"reload": "knotc reload"}, view)  # never a shell line
    assert parse_settings({"reload": ["knotc", "reload"]}, view).reload == ("knotc", "reload")
    settings = parse_settings({}, view)
    assert settings.directory == Path("/var/lib/meshd/dns")
    assert settings.zone is None
    assert not settings.serve


# --- the view's names -------------------------------------------------------------------

OWN = NodeIdentity("n1", "KEY1")


def member(
    name: str,
    index: int,
    state: MemberState = MemberState.ALIVE,
    *,
    certified: bool = True,
    key: str | None = None,
    version: int = 1,
) -> Member:
    record = NodeRecord(
        public_key=key or f"KEY{index}",
        addresses=(ip(f"100.80.0.{index}"), ip(f"fd00::{index}")),
        port=51820,
        version=version,
    )
    return Member(name, f"10.0.0.{index}:7946", state, record, certified=certified)


def peer(index: int, *extra: int) -> PeerConfig:
    allowed = [ip_net(f"100.80.0.{i}/32") for i in (index, *extra)]
    allowed += [ip_net(f"fd00::{i}/128") for i in (index, *extra)]
    return PeerConfig(f"KEY{index}", tuple(allowed))


def test_the_view_names_reachable_certified_members_and_itself() -> None:
    members = (
        member("n2", 2),
        member("n3", 3, MemberState.FAILED),  # may come back: keeps its peer and name
        member("n4", 4, MemberState.LEFT),  # left: no peer, no name
        member("n5", 5, certified=False),  # revoked: not named even where still routed
        member("n6", 6),  # refused by the admission policy: not routed, not named
        member("n7", 7),  # behind a routed relay: its addresses ride n2's peer
    )
    view = MeshView(OWN, members, (peer(2, 7, 5), peer(3)))
    named = hosts_of_view(view, (ip("100.80.0.1"), ip("fd00::1")))
    assert sorted(named) == ["n1", "n2", "n3", "n7"]
    assert named["n2"] == (ip("100.80.0.2"), ip("fd00::2"))


def test_a_leave_nobody_authenticated_keeps_the_name_while_the_peer_stays() -> None:
    view = MeshView(OWN, (member("n2", 2, MemberState.LEFT),), (peer(2),))
    assert "n2" in hosts_of_view(view, (ip("100.80.0.1"),))


def test_an_address_conflict_loser_is_named_only_for_what_it_holds() -> None:
    loser = PeerConfig("KEY3", (ip_net("fd00::3/128"),))  # its IPv4 claim is someone else's
    view = MeshView(OWN, (member("n3", 3),), (loser,))
    assert hosts_of_view(view, (ip("100.80.0.1"),))["n3"] == (ip("fd00::3"),)


def test_one_name_one_member_the_current_incarnation() -> None:
    old = member("n2", 2, MemberState.FAILED, key="OLD", version=9)
    new = member("n2", 2, key="KEY2", version=1)
    for members in [(old, new), (new, old)]:
        view = MeshView(OWN, members, (peer(2),))
        assert hosts_of_view(view, (ip("100.80.0.1"),))["n2"] == (ip("100.80.0.2"), ip("fd00::2"))


# --- the files ----------------------------------------------------------------------------


def zone_of(*names: str, serial: int = 7) -> Any:
    named = {n: (ip(f"100.80.0.{i + 1}"), ip(f"fd00::{i + 1}")) for i, n in enumerate(names)}
    zone = build_zone("lab.internal", 10, names[0], named)
    return zone.__class__(zone.origin, zone.ttl, zone.primary, zone.hosts, serial)


def test_the_zone_file_is_a_valid_zone_with_soa_ns_and_every_address() -> None:
    text = render_zone(zone_of("n1", "n2", "Web Server"))
    parsed = dns.zone.from_text(text, origin="lab.internal.", relativize=False)
    parsed.check_origin()  # SOA and NS at the apex
    soa = parsed.find_rdataset("lab.internal.", "SOA")[0]
    assert soa.serial == 7
    assert str(soa.mname) == "n1.lab.internal."
    assert str(parsed.find_rdataset("lab.internal.", "NS")[0]) == "n1.lab.internal."
    assert str(parsed.find_rdataset("web-server.lab.internal.", "A")[0]) == "100.80.0.3"
    assert str(parsed.find_rdataset("n2.lab.internal.", "AAAA")[0]) == "fd00::2"


def test_the_hosts_file_has_the_full_name_then_the_short_one() -> None:
    lines = render_hosts(zone_of("n1", "n2")).splitlines()
    assert lines[0].startswith("#")
    assert lines[1:] == [
        "100.80.0.1 n1.lab.internal n1",
        "fd00::1 n1.lab.internal n1",
        "100.80.0.2 n2.lab.internal n2",
        "fd00::2 n2.lab.internal n2",
    ]


def test_files_are_written_only_when_the_names_change_with_a_growing_serial(
    tmp_path: Path,
) -> None:
    clock = [1000.0]
    exporter = Exporter(tmp_path, tmp_path / "dns", ("hosts", "zone"), clock=lambda: clock[0])
    assert [p.name for p in exporter.update(zone_of("n1", "n2"))] == ["hosts", "db.lab.internal"]
    assert exporter.current is not None
    assert exporter.current.serial == 1000
    inode = (tmp_path / "dns" / "hosts").stat().st_ino
    assert exporter.update(zone_of("n1", "n2")) == []  # same names: nothing written
    assert (tmp_path / "dns" / "hosts").stat().st_ino == inode
    exporter.update(zone_of("n1"))
    assert exporter.current.serial == 1001  # the clock stood still: previous + 1
    clock[0] = 5000.0
    again = Exporter(tmp_path, tmp_path / "dns", ("hosts", "zone"), clock=lambda: clock[0])
    assert again.current == exporter.current  # the serial survives a restart
    again.update(zone_of("n1", "n3"))
    assert again.current is not None
    assert again.current.serial == 5000
    assert "\nn3 IN A    100.80.0.2\n" in (tmp_path / "dns" / "db.lab.internal").read_text()
    (tmp_path / "dns" / "hosts").unlink()  # lost: written again, same serial
    assert [p.name for p in again.update(zone_of("n1", "n3"))] == ["hosts"]
    assert again.current.serial == 5000


# --- the responder ------------------------------------------------------------------------


def ask(name: str, rdtype: str, zone: Any = None) -> dns.message.Message:
    wire = answer(zone or zone_of("n1", "n2"), dns.message.make_query(name, rdtype).to_wire())
    assert wire is not None
    return dns.message.from_wire(wire)


def test_the_responder_answers_members_authoritatively() -> None:
    reply = ask("N2.Lab.Internal.", "A")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.AA
    assert [str(r) for r in reply.answer[0]] == ["100.80.0.2"]
    assert [str(r) for r in ask("n1.lab.internal.", "AAAA").answer[0]] == ["fd00::1"]
    apex = ask("lab.internal.", "SOA")
    assert apex.answer[0][0].serial == 7


def test_the_responder_says_nxdomain_nodata_and_refused_where_due() -> None:
    missing = ask("n9.lab.internal.", "A")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert missing.authority[0].rdtype == dns.rdatatype.SOA  # for negative caching
    assert ask("x.n1.lab.internal.", "A").rcode() == dns.rcode.NXDOMAIN
    nodata = ask("n1.lab.internal.", "MX")
    assert (nodata.rcode(), nodata.answer) == (dns.rcode.NOERROR, [])
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA
    outside = ask("example.com.", "A")
    assert outside.rcode() == dns.rcode.REFUSED
    assert not outside.flags & dns.flags.AA


def test_the_responder_ignores_garbage_and_responses() -> None:
    assert answer(zone_of("n1"), b"\x00\x01garbage") is None
    query = dns.message.make_query("n1.lab.internal.", "A")
    response = dns.message.make_response(query)
    assert answer(zone_of("n1"), response.to_wire()) is None


@given(st.binary(max_size=300))
def test_the_responder_survives_any_datagram(data: bytes) -> None:
    reply = answer(zone_of("n1"), data)
    if reply is not None:
        assert dns.message.from_wire(reply).flags & dns.flags.QR


# --- the command line ----------------------------------------------------------------------


def test_dns_export_prints_from_the_configured_node_and_formats(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "meshd.toml"
    config.write_text(f'[node]\nname = "n1"\nstate_dir = "{state}"\n[plugins.dns]\nttl = 5\n')
    # A plugin command must read the node's config: click resolves it before --config runs.
    missing = run_meshd("--config", str(config), "dns", "export")
    assert missing.returncode == 1
    assert f"no DNS export in {state} yet" in missing.stderr
    state.mkdir()
    Exporter(state, state / "dns", ("hosts",)).update(zone_of("n1", "n2"))
    hosts = run_meshd("--config", str(config), "dns", "export")
    assert hosts.stdout == (state / "dns" / "hosts").read_text()
    corefile = run_meshd("--config", str(config), "dns", "export", "--format", "corefile")
    assert f"hosts {state / 'dns' / 'hosts'} lab.internal {{" in corefile.stdout
    zone = run_meshd("--config", str(config), "dns", "export", "--format", "zone")
    assert "\nn2 IN A    100.80.0.2\n" in zone.stdout


def test_split_dns_routes_only_the_zone_to_the_mesh_addresses() -> None:
    own = (ip("100.80.0.3"), ip("fd00::3"))
    assert split_dns_commands("meshd0", own, "lab.internal", 53) == [
        ["resolvectl", "dns", "meshd0", "100.80.0.3", "fd00::3"],
        ["resolvectl", "domain", "meshd0", "~lab.internal"],
    ]
    assert split_dns_commands("meshd0", own, "lab.internal", 5353)[0][3:] == [
        "100.80.0.3:5353",
        "[fd00::3]:5353",
    ]
