"""Config loading: defaults, precedence, and one test per kind of refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd import config
from meshd.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meshd.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    cfg = config.load(environ={}, state_dir=tmp_path)
    assert cfg.wireguard.interface == "meshd0"
    assert cfg.wireguard.port == 51820
    assert cfg.gossip.rpc_addr == "127.0.0.1:7373"
    assert cfg.state_dir == tmp_path


def test_file_values_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[node]\nname = "edge-1"\nstate_dir = "/srv/meshd"\n'
        '[wireguard]\nport = 51999\nbackend = "userspace"\n'
        '[plugins]\ndisable = ["mdns"]\n[plugins.dns]\nzone = "mesh.test"\n',
    )
    cfg = config.load(path, environ={})
    assert cfg.node.name == "edge-1"
    assert cfg.state_dir == Path("/srv/meshd")
    assert cfg.wireguard.port == 51999
    assert cfg.disabled_plugins == ("mdns",)
    assert cfg.view().section("dns") == {"zone": "mesh.test"}
    assert cfg.view().section("absent") == {}


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nstate_dir = "/from/file"\n')
    env = {config.ENV_CONFIG: str(path), config.ENV_STATE_DIR: "/from/env"}
    assert config.load(environ=env).state_dir == Path("/from/env")
    assert config.load(environ=env, state_dir="/from/flag").state_dir == Path("/from/flag")
    assert config.load(environ={config.ENV_CONFIG: str(path)}).state_dir == Path("/from/file")


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[node\n", None, "not valid TOML"),
        ("[bogus]\n", "bogus", "unknown section"),
        ("[wireguard]\nprot = 1\n", "wireguard.prot", "unknown key (known keys: backend"),
        ('[wireguard]\nport = "51820"\n', "wireguard.port", "must be an integer"),
        ("[wireguard]\nport = true\n", "wireguard.port", "must be an integer"),
        ("[wireguard]\nport = 70000\n", "wireguard.port", "from 1 to 65535"),
        ('[wireguard]\nbackend = "fast"\n', "wireguard.backend", "one of auto, kernel, userspace"),
        ('[wireguard]\ninterface = "much-too-long-name"\n', "wireguard.interface", "1-15"),
        ('[node]\nname = "Bad_Name"\n', "node.name", "lowercase"),
        ('[gossip]\nrpc_addr = "0.0.0.0:7373"\n', "gossip.rpc_addr", "loopback"),
        ('[gossip]\nrpc_addr = "nonsense"\n', "gossip.rpc_addr", "HOST:PORT"),
        ("[enrol]\nenabled = 1\n", "enrol.enabled", "true or false"),
        ("node = 3\n", "node", "must be a table"),
        ('[plugins]\ndisable = "mdns"\n', "plugins.disable", "list of plugin names"),
        ("[plugins]\nverbose = true\n", "plugins.verbose", "unknown key"),
    ],
)
def test_each_kind_of_bad_config_names_file_key_and_reason(
    tmp_path: Path, text: str, key: str | None, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    err = caught.value
    assert err.file == str(path)
    assert err.key == key
    assert reason in err.reason
    message = str(err)
    assert message.startswith(str(path))
    assert "\n" not in message


def test_a_named_missing_file_is_an_error_but_the_default_is_not(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml", environ={})
    assert config.load(environ={}).path == config.DEFAULT_CONFIG_PATH


@given(st.text(max_size=200))
def test_arbitrary_text_either_loads_or_is_refused_cleanly(text: str) -> None:
    try:
        config.parse(text)
    except ConfigError as exc:
        message = str(exc)
    else:
        return
    assert message
