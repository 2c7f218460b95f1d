"""The serf agent's generated files and log forwarding (no agent started here)."""

from __future__ import annotations

import json
import logging
import shutil
import stat
from pathlib import Path

import pytest

from meshd import config as config_mod
from meshd.errors import ConfigError
from meshd.gossip.supervisor import SerfAgent, SerfSettings, parse_log_line

GOSSIP_KEY = "0wqnXL/N5SSESOkFA07/vWCD2hVACL/p8q6zQCumB5g="


def settings(tmp_path: Path, **changes: object) -> SerfSettings:
    fields: dict[str, object] = {
        "node_name": "n1",
        "state_dir": tmp_path / "serf",
        "rpc_auth_key": "rpc-secret-value",
        "bind_addr": "192.0.2.1",
        "gossip_keys": (GOSSIP_KEY,),
        "tags": {"m": "1"},
    }
    fields.update(changes)
    return SerfSettings(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("line", "level", "message"),
    [
        (
            "    2026/11/26 05:51:14 [INFO] agent: Serf agent starting",
            logging.INFO,
            "agent: Serf agent starting",
        ),
        (
            "    2026/11/26 05:51:17 [WARN] serf: Shutdown without a Leave",
            logging.WARNING,
            "serf: Shutdown without a Leave",
        ),
        ("    2026/11/26 05:51:17 [ERR] memberlist: failed", logging.ERROR, "memberlist: failed"),
        ("    2026/11/26 05:51:17 [DEBUG] memberlist: probe", logging.DEBUG, "memberlist: probe"),
        ("==> Starting Serf agent...", logging.INFO, "Starting Serf agent..."),
        ("                      Node name: 'gx1'", logging.DEBUG, "Node name: 'gx1'"),
    ],
)
def test_serf_log_lines_keep_their_level(line: str, level: int, message: str) -> None:
    assert parse_log_line(line) == (level, message)


@pytest.mark.parametrize("addr", ["0.0.0.0:7373", "192.0.2.1:7373", "[2001:db8::1]:7373", "x:1"])
def test_rpc_address_that_is_not_loopback_is_refused(tmp_path: Path, addr: str) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        settings(tmp_path, rpc_addr=addr)


@pytest.mark.parametrize("addr", ["0.0.0.0:7373", "10.0.0.1:7373", "[::]:7373"])
def test_config_file_refuses_rpc_address_that_is_not_loopback(addr: str) -> None:
    with pytest.raises(ConfigError, match=r"gossip\.rpc_addr.*loopback"):
        config_mod.parse(f'[gossip]\nrpc_addr = "{addr}"\n')
    assert config_mod.parse('[gossip]\nrpc_addr = "127.0.0.2:7373"\n').gossip.rpc_addr


def test_profile_and_auth_key_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profile"):
        settings(tmp_path, profile="fast")
    with pytest.raises(ConfigError, match="auth key"):
        settings(tmp_path, rpc_auth_key="")
    assert "rpc-secret-value" not in repr(settings(tmp_path))


@pytest.mark.skipif(shutil.which("serf") is None, reason="needs the serf binary")
def test_files_are_private_and_secrets_stay_out_of_argv(tmp_path: Path) -> None:
    agent = SerfAgent(settings(tmp_path, profile="local", extra={"reconnect_timeout": "1m"}))
    agent.write_files()
    directory = tmp_path / "serf"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(agent.config_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(agent.keyring_path.stat().st_mode) == 0o600
    config = json.loads(agent.config_path.read_text())
    assert config["rpc_auth"] == "rpc-secret-value"
    assert config["bind"] == "192.0.2.1:7946"
    assert config["profile"] == "local"
    assert config["reconnect_timeout"] == "1m"
    assert config["snapshot_path"] == str(directory / "snapshot")
    assert json.loads(agent.keyring_path.read_text()) == [GOSSIP_KEY]
    assert json.loads(agent.tags_path.read_text()) == {"m": "1"}
    argv = " ".join(agent._child.argv)
    assert "rpc-secret-value" not in argv
    assert GOSSIP_KEY not in argv
    assert set(agent._child.env) == {"PATH"}


@pytest.mark.skipif(shutil.which("serf") is None, reason="needs the serf binary")
def test_a_rotated_keyring_is_not_overwritten_on_the_next_start(tmp_path: Path) -> None:
    agent = SerfAgent(settings(tmp_path))
    agent.write_files()
    agent.keyring_path.write_text('["rotated"]')
    agent.write_files()
    assert agent.keyring_path.read_text() == '["rotated"]'


@pytest.mark.skipif(shutil.which("serf") is None, reason="needs the serf binary")
def test_netns_runs_the_agent_under_ip_netns_exec(tmp_path: Path) -> None:
    if shutil.which("ip") is None:
        pytest.skip("needs ip")
    agent = SerfAgent(settings(tmp_path), netns="meshd-test-ns")
    assert agent._child.argv[1:4] == ["netns", "exec", "meshd-test-ns"]
    assert agent.client()._netns == "meshd-test-ns"
