"""Join tokens: round trip, offline use, expiry, tampering, wrong network, garbage, sources."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import string
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.errors import IdentityError, TokenError
from meshd.identity import WireGuardKeyPair
from meshd.pki.ca import NetworkCA
from meshd.pki.certificate import DAY, verify_chain
from meshd.pki.token import (
    TOKEN_PREFIX,
    Seed,
    Token,
    check_network,
    create_token,
    parse_token,
    read_token_source,
    split_endpoint,
)

NOW = 1_790_000_000
HOUR = 3600


@pytest.fixture(scope="module")
def ca() -> NetworkCA:
    return NetworkCA.generate("office")


@pytest.fixture(scope="module")
def token(ca: NetworkCA) -> Token:
    seeds = [
        Seed(
            "192.0.2.10:51820",
            7947,
            WireGuardKeyPair.generate().public_key,
            IPv4Address("100.80.0.1"),
        ),
        Seed(
            "[2001:db8::10]:51820",
            7947,
            WireGuardKeyPair.generate().public_key,
            IPv6Address("fd80::1"),
        ),
        Seed(
            "seed.example.org:51820",
            7000,
            WireGuardKeyPair.generate().public_key,
            IPv4Address("100.80.0.2"),
        ),
    ]
    return create_token(
        ca,
        gossip_key=os.urandom(32),
        cidr4=IPv4Network("100.80.0.0/16"),
        cidr6=IPv6Network("fd80::/64"),
        seeds=seeds,
        ttl=24 * HOUR,
        now=NOW,
    )


def test_round_trip(token: Token, ca: NetworkCA) -> None:
    text = token.encode()
    assert text.startswith(TOKEN_PREFIX)
    assert "\n" not in text
    assert " " not in text
    parsed = parse_token(text, NOW + 60)
    assert parsed == token
    assert parsed.network_id == ca.network_id
    assert parsed.network.name == "office"
    assert parsed.network.cidr6 == IPv6Network("fd80::/64")
    assert parsed.seeds[1].enrol_host == "2001:db8::10"
    assert parsed.expires_at == NOW + 24 * HOUR
    # Copy-paste that wraps lines or adds blanks still works.
    wrapped = "\n  ".join(text[i : i + 60] for i in range(0, len(text), 60)) + "\n"
    assert parse_token(wrapped, NOW) == token


def test_token_is_one_reasonable_line(token: Token) -> None:
    assert len(token.encode()) < 1200


def test_secrets_not_in_repr(token: Token) -> None:
    assert token.gossip_key.hex() not in repr(token)
    assert str(token.gossip_key) not in repr(token)
    assert str(token.enrolment.secret) not in repr(token)


def test_token_signs_node_certs_with_ca_offline(token: Token) -> None:
    # Only what is inside the token: the enrolment key signs, the CA key verifies.
    parsed = parse_token(token.encode(), NOW)
    key = WireGuardKeyPair.generate().public_key
    cert = parsed.enrolment.sign_node_cert("laptop", key, [IPv4Address("100.80.3.4")], now=NOW + 5)
    verify_chain(cert, (parsed.enrolment.cert,), parsed.ca_public_key, NOW + 5, at_admission=True)


def test_expired_token_says_when(token: Token) -> None:
    with pytest.raises(TokenError, match=r"expired at .* \(2 h ago\)"):
        parse_token(token.encode(), NOW + 26 * HOUR)


def test_token_from_the_future_is_refused(token: Token) -> None:
    with pytest.raises(TokenError, match="check this machine's clock"):
        parse_token(token.encode(), NOW - DAY)


def test_wrong_network(token: Token, ca: NetworkCA) -> None:
    check_network(token, ca.network_id)
    check_network(token, ca.network_id.upper() + "\n")
    other = NetworkCA.generate("office")
    with pytest.raises(TokenError, match=rf"token is for network 'office' \({ca.network_id}\)"):
        check_network(token, other.network_id)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "meshd2-AAAA",
        "wg0 = abc",
        TOKEN_PREFIX,
        TOKEN_PREFIX + "A",
        TOKEN_PREFIX + "!!!!",
        TOKEN_PREFIX + "AAAA",
        TOKEN_PREFIX + "é",
    ],
)
def test_garbage_is_refused_clearly(text: str) -> None:
    with pytest.raises(TokenError) as info:
        parse_token(text, NOW)
    message = str(info.value)
    assert "\n" not in message
    assert "not a meshd join token" in message or "damaged" in message


def test_every_changed_character_is_refused(token: Token) -> None:
    text = token.encode()
    alphabet = string.ascii_letters + string.digits + "-_"
    for index in range(len(TOKEN_PREFIX), len(text)):
        replacement = alphabet[(alphabet.index(text[index]) + 1) % len(alphabet)]
        tampered = text[:index] + replacement + text[index + 1 :]
        with pytest.raises(TokenError):
            parse_token(tampered, NOW)


def test_tampered_payload_names_the_signature(token: Token, ca: NetworkCA) -> None:
    # A well-formed token whose signed content changed: a different gossip key.
    forged = dataclasses.replace(token, gossip_key=bytes(32))
    with pytest.raises(TokenError, match="tampered"):
        parse_token(forged.encode(), NOW)


def test_truncated_token_is_damaged(token: Token) -> None:
    text = token.encode()
    with pytest.raises(TokenError, match="damaged"):
        parse_token(text[: len(text) // 2], NOW)


def test_errors_are_identity_errors(token: Token) -> None:
    with pytest.raises(IdentityError):
        parse_token("nope", NOW)


def test_split_endpoint() -> None:
    assert split_endpoint("192.0.2.1:51820") == ("192.0.2.1", 51820)
    assert split_endpoint("[2001:db8::1]:1") == ("2001:db8::1", 1)
    assert split_endpoint("host-a.example:65535") == ("host-a.example", 65535)
    for bad in (
        "192.0.2.1",
        "host:0",
        "host:65536",
        ":80",
        "[zz]:80",
        "a b:80",
        "h:\uff18\uff10",
        "h\n:80",
    ):
        with pytest.raises(IdentityError):
            split_endpoint(bad)


def test_seed_validation() -> None:
    key = WireGuardKeyPair.generate().public_key
    with pytest.raises(IdentityError):
        Seed("192.0.2.1", 7947, key, IPv4Address("100.80.0.1"))
    with pytest.raises(IdentityError):
        Seed("192.0.2.1:1", 0, key, IPv4Address("100.80.0.1"))
    with pytest.raises(IdentityError):
        Seed("192.0.2.1:1", 7947, "not-a-key", IPv4Address("100.80.0.1"))


# --- reading the token: file, stdin, environment; never argv -----------------------------


def test_read_from_file(tmp_path: Path, token: Token) -> None:
    path = tmp_path / "token"
    path.write_text(token.encode() + "\n")
    path.chmod(0o600)
    assert read_token_source(str(path)) == token.encode()


def test_read_from_world_readable_file_warns(
    tmp_path: Path, token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    path.write_text(token.encode())
    path.chmod(0o644)
    assert read_token_source(str(path)) == token.encode()
    assert "readable by others" in caplog.text
    assert token.encode() not in caplog.text


def test_read_from_stdin_and_env(token: Token) -> None:
    assert read_token_source("-", stdin=io.StringIO(token.encode() + "\n")) == token.encode()
    env = {"MESHD_TOKEN": token.encode(), "OTHER": " " + token.encode()}
    assert read_token_source(None, environ=env) == token.encode()
    assert read_token_source("env:OTHER", environ=env) == token.encode()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (None, "no token given"),
        ("env:MISSING", "MISSING holds no token"),
        ("-", "no token on standard input"),
        ("/nonexistent/meshd-token", "cannot read token file"),
    ],
)
def test_missing_sources_say_what(source: str | None, message: str) -> None:
    with pytest.raises(TokenError, match=message):
        read_token_source(source, environ={}, stdin=io.StringIO(""))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(TokenError, match="is empty"):
        read_token_source(str(path))


# --- the token text decoder: only TokenError, whatever the input -------------------------


@settings(max_examples=400, deadline=5000)
@given(st.text(max_size=2000))
def test_random_text_only_raises_token_error(text: str) -> None:
    with pytest.raises(TokenError):
        parse_token(text, NOW)


@settings(max_examples=400, deadline=5000)
@given(st.binary(max_size=1500))
def test_random_payload_after_prefix_only_raises_token_error(payload: bytes) -> None:
    text = TOKEN_PREFIX + base64.urlsafe_b64encode(payload).decode().rstrip("=")
    with pytest.raises(TokenError):
        parse_token(text, NOW)


@settings(max_examples=300, deadline=5000)
@given(data=st.data())
def test_mutated_tokens_are_refused(data: st.DataObject) -> None:
    token = _SHARED_TOKEN
    raw = bytearray(base64.urlsafe_b64decode(token.encode()[len(TOKEN_PREFIX) :] + "=="))
    original = bytes(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[pos] = data.draw(st.integers(0, 255))
        else:
            del raw[pos : pos + data.draw(st.integers(1, 40))]
    text = TOKEN_PREFIX + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    if bytes(raw) == original:
        assert parse_token(text, NOW) == token
        return
    with pytest.raises(TokenError):
        parse_token(text, NOW)


_SHARED_CA = NetworkCA.generate("fuzz")
_SHARED_TOKEN = create_token(
    _SHARED_CA,
    gossip_key=bytes(range(32)),
    cidr4=IPv4Network("10.99.0.0/16"),
    seeds=[
        Seed(
            "192.0.2.1:51820",
            7947,
            WireGuardKeyPair.generate().public_key,
            IPv4Address("10.99.0.1"),
        )
    ],
    ttl=HOUR,
    now=NOW,
)
