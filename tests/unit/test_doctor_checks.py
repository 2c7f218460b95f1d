"""The doctor's judgements (pure functions of the facts) and the nftables rule reader."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd import doctor
from meshd.firewall import dropping_rules

NOW = 1_800_000_000.0

# `nft -j list ruleset` of: tcp dport 51821 drop; iifname "eth0" tcp dport { 22, 51820-51830 }
# reject; an output chain dropping 51821 (not inbound); and meshd's own gossip table.
RULESET = {
    "nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "fault", "handle": 1}},
        {
            "chain": {
                "family": "inet",
                "table": "fault",
                "name": "input",
                "handle": 1,
                "type": "filter",
                "hook": "input",
                "prio": 0,
                "policy": "accept",
            }
        },
        {
            "chain": {
                "family": "inet",
                "table": "fault",
                "name": "out",
                "handle": 3,
                "type": "filter",
                "hook": "output",
                "prio": 0,
                "policy": "accept",
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "fault",
                "chain": "input",
                "handle": 2,
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                            "right": 51821,
                        }
                    },
                    {"drop": None},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "fault",
                "chain": "input",
                "handle": 4,
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}},
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                            "right": {"set": [22, {"range": [51820, 51830]}]},
                        }
                    },
                    {"reject": {"type": "icmpx", "expr": "port-unreachable"}},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "fault",
                "chain": "out",
                "handle": 5,
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                            "right": 7000,
                        }
                    },
                    {"drop": None},
                ],
            }
        },
    ]
}


def test_dropping_rules_finds_plain_set_and_range_matches_on_inbound_chains() -> None:
    assert dropping_rules(RULESET, "tcp", 51821) == ["inet fault input #2", "inet fault input #4"]
    assert dropping_rules(RULESET, "tcp", 22) == ["inet fault input #4"]
    assert dropping_rules(RULESET, "udp", 51821) == []
    assert dropping_rules(RULESET, "tcp", 7000) == []  # an output chain
    assert dropping_rules(RULESET, "tcp", 51831) == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_dropping_rules_reads_any_json_without_raising(value: object) -> None:
    assert dropping_rules({"nftables": [value]}, "tcp", 51821) == []


def test_certificate_ok_warn_fail() -> None:
    assert doctor.judge_certificate(int(NOW + 100 * 86400), NOW).status == "ok"
    soon = doctor.judge_certificate(int(NOW + 3 * 86400), NOW)
    assert (soon.status, soon.detail) == ("warn", "expires in 3.0 days")
    gone = doctor.judge_certificate(int(NOW - 86400), NOW)
    assert gone.status == "FAIL"
    assert "rotate-wireguard" in gone.fix


def member(name: str, published: float, state: str = "alive") -> dict[str, object]:
    return {"name": name, "state": state, "record_version": int(published * 1000)}


def test_clock_skew_from_record_times() -> None:
    members = [
        member("ahead", NOW + 40),
        member("fresh", NOW - 10),
        member("behind", NOW - 65 - 400),
        member("dead", NOW - 9000, state="failed"),
        {"name": "old-meshd", "state": "alive", "record_version": 17},
    ]
    skews = doctor.clock_skews(members, NOW, 65)
    assert skews == pytest.approx({"ahead": 40.0, "fresh": 0.0, "behind": -400.0})
    check = doctor.judge_clock(skews, 65)
    assert check.status == "FAIL"
    assert check.detail.startswith("behind's clock is at least 400 s behind ours")
    ahead = doctor.judge_clock({"ahead": 40.0, "fresh": 0.0}, 65)
    assert (ahead.status, ahead.detail) == ("warn", "ahead's clock is at least 40 s ahead of ours")
    assert doctor.judge_clock({"fresh": 0.0}, 65).status == "ok"


def test_serf_dead_restarted_alone_and_healthy() -> None:
    assert doctor.judge_serf({"running": False}, 2).status == "FAIL"
    restarted = doctor.judge_serf({"running": True, "pid": 7, "restarts": 2, "joined": True}, 2)
    assert restarted.status == "warn"
    assert "died 2 time(s)" in restarted.detail
    # Died, and the new Serf is not ready yet (restarts still 0): never ok.
    between = {"running": True, "pid": 8, "restarts": 0, "died": 1, "joined": True}
    assert doctor.judge_serf(between, 2).status == "warn"
    assert doctor.judge_serf({"running": True, "pid": 7, "joined": False}, 2).status == "FAIL"
    assert doctor.judge_serf({"running": True, "pid": 7, "joined": False}, 0).status == "ok"


def test_failed_and_uncertified_members_are_named() -> None:
    check = doctor.judge_members(
        [{"name": "a", "state": "failed"}, {"name": "b", "state": "alive", "certified": True}]
    )
    assert (check.status, check.detail) == ("warn", "failed (unreachable): a")
    check = doctor.judge_members(
        [{"name": "c", "state": "alive", "certified": False, "certificate_error": "revoked"}]
    )
    assert (check.status, check.detail) == ("warn", "not admitted: c (revoked)")


def test_mtu_that_does_not_fit_a_path_names_the_mtu_that_would() -> None:
    assert doctor.judge_mtu(1420, {"192.0.2.1:51820": (4, 1500)}).status == "ok"
    check = doctor.judge_mtu(1420, {"[2001:db8::1]:51820": (6, 1480), "192.0.2.1:51820": (4, 1500)})
    assert check.status == "warn"
    assert "[2001:db8::1]:51820 (path 1480)" in check.detail
    assert check.fix.startswith("set [wireguard] mtu = 1400 ")


def test_nat_without_endpoint_or_behind_a_symmetric_nat_warns() -> None:
    assert doctor.judge_nat(None, ["192.0.2.1:51820"]).status == "ok"
    assert doctor.judge_nat("public", ["192.0.2.1:51820"]).status == "ok"
    assert doctor.judge_nat("symmetric", ["192.0.2.1:51820"]).status == "warn"
    assert doctor.judge_nat(None, []).status == "warn"


def test_permissions_of_secrets_directory_and_owners() -> None:
    state = Path("/var/lib/meshd")
    good = {".": stat.S_IFDIR | 0o700, "wireguard.key": stat.S_IFREG | 0o600}
    good |= {"node.json": stat.S_IFREG | 0o644, "control.sock": stat.S_IFSOCK | 0o777}
    assert doctor.judge_permissions(state, good, 0, {".": 0}).status == "ok"
    bad = good | {".": stat.S_IFDIR | 0o755, "serf/keyring.json": stat.S_IFREG | 0o640}
    check = doctor.judge_permissions(state, bad, 0, {".": 0, "node.json": 1000})
    assert check.status == "FAIL"
    assert check.detail == (
        "/var/lib/meshd is 755; secret serf/keyring.json is 640; owned by another user: node.json"
    )
    assert "chmod 600 /var/lib/meshd/serf/keyring.json" in check.fix


def test_render_lists_fixes_only_for_problems() -> None:
    text = doctor.render(
        [doctor.Check("agent", "ok", "answers"), doctor.Check("mtu", "warn", "too big", "lower it")]
    )
    assert text.splitlines()[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert text.endswith("1 problem(s); how to fix:\n  mtu: lower it")
