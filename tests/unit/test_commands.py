"""init / join / token as a user meets them, without root: refusals write nothing."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
from pathlib import Path

import pytest

from meshd.identity import WireGuardKeyPair
from meshd.pki.ca import NetworkCA
from meshd.pki.token import Seed, create_token
from tests.conftest import run_meshd


def meshd(tmp_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "none.toml").write_text('[node]\nname = "t1"\n')
    env = {
        "MESHD_STATE_DIR": str(tmp_path / "state"),
        "MESHD_CONFIG": str(tmp_path / "none.toml"),
        "MESHD_TOKEN": None,
    }
    return run_meshd(*args, env=env, stdin=stdin)


def token_text(*, ttl: int = 3600, now: int | None = None) -> str:
    ca = NetworkCA.generate("lab")
    seed = Seed(
        "198.18.0.1:51820",
        51821,
        WireGuardKeyPair.generate().public_key,
        ipaddress.ip_address("100.80.0.1"),
    )
    token = create_token(
        ca,
        gossip_key=os.urandom(32),
        cidr4=ipaddress.IPv4Network("100.80.0.0/16"),
        seeds=[seed],
        ttl=ttl,
        now=now,
    )
    return token.encode()


def tampered(text: str) -> str:
    middle = len(text) // 2
    return text[:middle] + ("A" if text[middle] != "A" else "B") + text[middle + 1 :]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: "hello world", "not a meshd join token"),
        (lambda: tampered(token_text()), "token"),
        (lambda: token_text(ttl=60, now=int(time.time()) - 3600), "expired"),
    ],
    ids=["garbage", "tampered", "expired"],
)
def test_bad_tokens_are_refused_before_anything_is_written(
    tmp_path: Path, make, message: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(make())
    token_file.chmod(0o600)
    result = meshd(tmp_path, "join", "198.18.0.1", "--token-file", str(token_file), "--no-start")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshd: error: ")
    assert message in lines[0].lower()
    assert not (tmp_path / "state").exists()


def test_a_token_read_from_stdin_reaches_the_seed_step(tmp_path: Path) -> None:
    # No seed listens on loopback port 9: the token passes, enrolment fails, nothing is written.
    result = meshd(
        tmp_path,
        "join",
        "127.0.0.1:9",
        "--token-file",
        "-",
        "--endpoint",
        "127.0.0.1:51820",
        "--no-start",
        stdin=token_text(),
    )
    assert result.returncode != 0
    assert "cannot reach seed 127.0.0.1:9" in result.stderr
    assert not (tmp_path / "state").exists()


def test_join_without_any_token_says_where_tokens_come_from(tmp_path: Path) -> None:
    result = meshd(tmp_path, "join", "198.18.0.1", "--no-start")
    assert result.returncode != 0
    assert "MESHD_TOKEN" in result.stderr


def test_init_writes_a_0600_token_and_refuses_to_run_twice(tmp_path: Path) -> None:
    first = meshd(
        tmp_path, "init", "--network", "lab", "--endpoint", "198.18.0.1:51820", "--no-start"
    )
    assert first.returncode == 0, first.stderr
    token = tmp_path / "state" / "join-token"
    assert token.read_text().startswith("meshd1-")
    assert token.stat().st_mode & 0o777 == 0o600
    for secret in ("wireguard.key", "gossip.key", "ca.key"):
        assert (tmp_path / "state" / secret).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    before = sorted(p.name for p in (tmp_path / "state").iterdir())
    second = meshd(
        tmp_path, "init", "--network", "other", "--endpoint", "198.18.0.1:51820", "--no-start"
    )
    assert second.returncode != 0
    assert "already holds a node" in second.stderr
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == before


def test_token_create_needs_the_ca_and_prints_only_when_asked(tmp_path: Path) -> None:
    assert (
        meshd(
            tmp_path, "init", "--network", "lab", "--endpoint", "198.18.0.1:51820", "--no-start"
        ).returncode
        == 0
    )
    out = meshd(
        tmp_path, "token", "create", "--ttl", "2h", "--endpoint", "198.18.0.1:51820", "--out", "-"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("meshd1-")
    (tmp_path / "state" / "ca.key").unlink()
    refused = meshd(tmp_path, "token", "create", "--endpoint", "198.18.0.1:51820")
    assert refused.returncode != 0
    assert "does not hold the network CA key" in refused.stderr


def test_bad_ttl_is_a_usage_error(tmp_path: Path) -> None:
    result = meshd(
        tmp_path,
        "init",
        "--network",
        "lab",
        "--token-ttl",
        "soon",
        "--endpoint",
        "198.18.0.1:51820",
        "--no-start",
    )
    assert result.returncode == 2
    assert "not a duration" in result.stderr
    assert not (tmp_path / "state").exists()


def test_join_refuses_a_seed_and_discover_together(tmp_path: Path) -> None:
    result = meshd(tmp_path, "join", "198.18.0.1", "--discover", "--no-start")
    assert result.returncode == 2
    assert "--discover: give SEED-HOST or --discover, not both" in result.stderr
