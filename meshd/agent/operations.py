"""What an operator asks of a running agent over the control socket.

``status``, ``leave``, ``revoke`` and ``route-approve`` (on the CA machine),
``rotate-gossip`` (a new gossip key on every member) and ``rotate-wireguard`` (a new
key and certificate for this node). Each handler takes the request's JSON object and
returns the answer's; a :class:`~meshd.errors.MeshdError` becomes the error the CLI
prints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from meshd.agent.exchange import TrustExchange
from meshd.agent.presence import Presence
from meshd.agent.runtime import Runtime
from meshd.b64 import encode_b64
from meshd.control import Handler
from meshd.desired import current_incarnations
from meshd.errors import GossipError, IdentityError, InputError, SerfCommandError
from meshd.identity import WireGuardKeyPair
from meshd.pki.ca import NetworkCA
from meshd.pki.certificate import CertChain, Role
from meshd.pki.revocation import Revocation
from meshd.pki.token import Token, check_network, parse_token
from meshd.pki.trust import EXPIRY_WARNING
from meshd.types import IPNetwork, Member, PathChoice
from meshd.wireguard.backend import PeerState

log = logging.getLogger(__name__)

# After publishing a new WireGuard key, how long the old one keeps the tunnels up
# while the record spreads (gossip reaches 99 % of 1,000 nodes in about 1.6 s).
KEY_SWITCH_DELAY = 2.0
KEY_STEP_TRIES = 3
KEY_STEP_PAUSE = 1.0


class Operations:
    """The control commands of one agent."""

    def __init__(self, runtime: Runtime, presence: Presence, exchange: TrustExchange) -> None:
        self._rt = runtime
        self._presence = presence
        self._exchange = exchange

    def handlers(self) -> Mapping[str, Handler]:
        return {
            "status": self.status,
            "leave": self.leave,
            "revoke": self.revoke,
            "revoke-token": self.revoke_token,
            "route-approve": self.route_approve,
            "client-add": self.client_add,
            "client-remove": self.client_remove,
            "rotate-gossip": self.rotate_gossip,
            "rotate-wireguard": self.rotate_wireguard,
        }

    async def leave(self, request: Mapping[str, Any]) -> dict[str, Any]:
        self._rt.request_stop(leave=True)
        return {"leaving": self._rt.name}

    def _ca(self) -> NetworkCA:
        rt = self._rt
        secret = rt.store.ca_secret()
        if secret is None:
            raise IdentityError(
                "this machine does not hold the network CA key: revoke where 'meshd init' ran"
            )
        return NetworkCA.from_secret(rt.state.network.name, secret)

    def _check_token_network(self, token: Token) -> None:
        """Refuse a token of another network: its CA key must be one this node trusts
        (after a CA rotation, new tokens name the new key)."""
        roots = self._rt.trust.roots
        if token.ca_public_key not in roots.keys:
            check_network(token, roots.ids[-1])

    async def _publish_revocation(self, revocation: Revocation) -> None:
        self._rt.trust.add(revocation)
        await self._exchange.revoke(revocation.encode())

    async def revoke(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Revoke member ``name``'s certificate and key (needs the CA key here) and gossip it.

        Unless ``keep_token``, the enrolment key that signed it is revoked too: the
        token it joined with admits nobody any more (machines that joined with it
        earlier keep their certificates).
        """
        rt = self._rt
        ca = self._ca()
        name = self._member_name(str(request.get("name", "")))
        if request.get("key"):
            key = str(request["key"])
            await self._publish_revocation(ca.revoke_key(name, key))
            log.warning("revoked the WireGuard key %s of %s", key, name)
            return {"revoked": name, "certificate": None, "public_key": key, "token_revoked": None}
        chain = None
        for member in current_incarnations(rt.snapshot.members):
            if member.name == name and member.record is not None:
                chain = rt.trust.chain(member.record.cert)
        if chain is None:
            raise IdentityError(
                f"no certificate known for {name!r}: it must be (or have been) a member "
                "this node has seen; for a machine nobody remembers, or an old key after "
                "a rotation, revoke its key: meshd revoke NAME --key KEY"
            )
        await self._publish_revocation(ca.revoke(chain.node, include_key=True))
        token_revoked = None
        enrolled = chain.issuers and chain.issuers[0].role is Role.ENROL
        if enrolled and not request.get("keep_token"):
            # (A chain renewed by a CA rotation has no enrolment key, only a cross-signature.)
            enrolment = chain.issuers[0]
            await self._publish_revocation(ca.revoke(enrolment, include_key=True))
            token_revoked = enrolment.name
        log.warning(
            "revoked %s (certificate %s)%s",
            name,
            chain.ref,
            f" and the enrolment key {token_revoked!r} it joined with" if token_revoked else "",
        )
        return {
            "revoked": name,
            "certificate": chain.ref,
            "public_key": chain.node.public_key,
            "token_revoked": token_revoked,
        }

    def _member_name(self, node: str) -> str:
        """The name of the member ``node`` names: a name stays as it is, a mesh address
        becomes the name of the member that holds it (certified members first)."""
        try:
            address = ipaddress.ip_address(node)
        except ValueError:
            return node
        holders = sorted(
            (not member.certified, member.name)
            for member in current_incarnations(self._rt.snapshot.members)
            if member.record is not None and address in member.record.addresses
        )
        if not holders:
            raise IdentityError(
                f"no member has the mesh address {address}: give the node's name "
                "(meshd status lists them)"
            )
        return holders[0][1]

    async def route_approve(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Approve ``prefix`` behind node ``name`` (needs the CA key here) and gossip it."""
        ca = self._ca()
        name = self._member_name(str(request.get("name", "")))
        prefix = parse_prefix(str(request.get("prefix", "")))
        grant = ca.grant_route(name, prefix)
        data = grant.encode()
        self._rt.trust.add_grant(data)
        await self._exchange.grant(data)
        log.warning("approved the route %s behind %s", prefix, name)
        return {"node": name, "prefix": str(prefix)}

    async def client_add(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """A plain WireGuard client: a key, an address, a CA-signed record naming its
        gateway (this node unless ``gateway``); the answer holds its wg-quick settings."""
        rt = self._rt
        ca = self._ca()
        name = str(request.get("name", ""))
        gateway = self._member_name(str(request.get("gateway") or rt.name))
        if gateway == rt.name:
            record = rt.published
        else:
            found = [
                m.record
                for m in current_incarnations(rt.snapshot.members)
                if m.name == gateway and m.record is not None
            ]
            record = found[0] if found else None
        if record is None or not record.endpoints:
            raise IdentityError(f"no member {gateway!r} with an endpoint is known here")
        taken = {a for m in rt.snapshot.members if m.record for a in m.record.addresses}
        taken.update(rt.state.addresses.all())
        taken.update(c.address for c in rt.trust.clients() if c.name != name)
        cidr = rt.state.network.cidr4
        address = next(
            (cidr.broadcast_address - k for k in range(1, cidr.num_addresses - 1)
             if cidr.broadcast_address - k not in taken),
            None,
        )  # fmt: skip
        if address is None:
            raise IdentityError(f"no free address left in {cidr} for a client")
        keys = WireGuardKeyPair.generate()
        data = ca.sign_client(name, keys.public_key, address, gateway).encode()
        rt.trust.add_client(data)
        await self._exchange.announce_client(data)
        log.warning("client %s added (%s, through %s)", name, address, gateway)
        return {
            "name": name,
            "address": str(address),
            "private_key": keys.private_key,
            "public_key": keys.public_key,
            "gateway": gateway,
            "gateway_public_key": record.public_key,
            "gateway_endpoint": record.endpoints[0],
            "allowed_ips": [str(cidr)],
        }

    async def client_remove(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Remove client ``name``: its key is revoked, and every gateway drops it."""
        ca = self._ca()
        name = str(request.get("name", ""))
        found = [c for c in self._rt.trust.clients() if c.name == name]
        if not found:
            raise IdentityError(f"no client {name!r}")
        await self._publish_revocation(ca.revoke_key(name, found[0].public_key))
        log.warning("client %s removed", name)
        return {"removed": name, "public_key": found[0].public_key}

    async def revoke_token(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Revoke the enrolment key of a token: nobody can join with it any more."""
        ca = self._ca()
        token = parse_token(str(request.get("token", "")), int(time.time()))
        self._check_token_network(token)
        enrolment = token.enrolment.cert
        await self._publish_revocation(ca.revoke(enrolment, include_key=True))
        log.warning("revoked the enrolment key %r of a token", enrolment.name)
        return {"revoked_token": enrolment.name, "expired_at": token.expires_at}

    async def rotate_gossip(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """A new gossip key on every member: install everywhere, make it primary, drop the old.

        Members that are down, or revoked (nobody has a tunnel to them any more), cannot
        answer and keep the old key: exactly what a rotation after a revocation is for.
        Every alive, certified member must confirm each step.
        """
        rt = self._rt
        client = rt.gossip.client
        needed = 1 + len(rt.snapshot.alive_certified(rt.name))
        # The primary key Serf uses now: another node may have rotated it since we started.
        old = rt.store.current_gossip_key() or encode_b64(rt.state.gossip_key)
        new_key = os.urandom(32)
        new = encode_b64(new_key)
        await _key_step("install", client.install_key, new, needed)
        await _key_step("use", client.use_key, new, needed)
        rt.state = dataclasses.replace(rt.state, gossip_key=new_key)
        rt.store.save_gossip_key(new_key)
        confirmed = await _key_step("remove", client.remove_key, old, 0)
        log.warning("gossip key rotated; %d member(s) confirmed", confirmed)
        return {"members": confirmed, "required": needed}

    async def rotate_wireguard(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """A new WireGuard key and certificate (signed with a token's enrolment key)."""
        rt = self._rt
        token = parse_token(str(request.get("token", "")), int(time.time()))
        self._check_token_network(token)
        keys = WireGuardKeyPair.generate()
        cert = token.enrolment.sign_node_cert(rt.name, keys.public_key, rt.state.addresses.all())
        chain = CertChain(cert, (token.enrolment.cert,))
        chain.verify(rt.trust.roots, int(time.time()), at_admission=True)
        old = rt.state.keys.public_key
        # Tell the mesh first, through the tunnels the old key still holds up: a node
        # that switched before the others knew its new key would be cut off, unable
        # to gossip the very record that would let them follow.
        rt.state = dataclasses.replace(rt.state, keys=keys, chain=chain.encode())
        rt.store.save_keys(rt.state)
        await self._exchange.announce_own()
        await self._presence.publish()
        await asyncio.sleep(KEY_SWITCH_DELAY)
        await rt.iface.set_private_key(keys.private_key)
        # The others' last handshake attempts failed against the old key and WireGuard
        # waits 5 s to retry: start every session from this side now.
        rt.iface.poke(rt.snapshot.desired.peers)
        log.warning("WireGuard key rotated: %s -> %s", old, keys.public_key)
        return {"old_public_key": old, "public_key": keys.public_key, "certificate": chain.ref}

    async def status(self, request: Mapping[str, Any]) -> dict[str, Any]:
        rt = self._rt
        stats = {p.public_key: p for p in await rt.iface.peer_stats()}
        snapshot = rt.snapshot
        desired = snapshot.desired
        peer_keys = {p.public_key for p in desired.peers}
        carried = {p.public_key: frozenset(p.allowed_ips) for p in desired.peers}
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for member in sorted(current_incarnations(snapshot.others(rt.name)), key=lambda m: m.name):
            key = member.record.public_key if member.record else None
            if key:
                seen.add(key)
            rows.append(
                _member_row(
                    member,
                    stats.get(key) if key else None,
                    is_peer=key in peer_keys,
                    via=desired.relayed.get(member.name),
                    excluded=desired.excluded.get(member.name),
                    path=desired.paths.get(member.name),
                    carried=carried.get(key, frozenset()) if key else frozenset(),
                )
            )
        for known in rt.known:
            if known.public_key in seen:
                continue
            rows.append(
                _row(
                    known.name,
                    known.public_key,
                    tuple(p.network_address for p in known.allowed_ips),
                    "unconfirmed",
                    stats.get(known.public_key),
                    is_peer=known.public_key in stats,
                )
            )
        state, own = rt.state, rt.published
        expires = rt.own_chain.node.not_after
        return {
            "node": {
                "name": state.name,
                "network": state.network.name,
                "network_id": state.network.network_id,
                "public_key": state.keys.public_key,
                "addresses": [str(a) for a in state.addresses.all()],
                "interface": rt.iface.ifname,
                "listen_port": rt.config.wireguard.port,
                "endpoints": list(own.endpoints) if own else [],
                "nat": _nat_type(own.roles) if own else None,
                "backend": rt.iface.backend_name,
                "gossip_joined": rt.joined.is_set(),
                "certificate": rt.own_chain.ref,
                "certificate_expires": expires,
                "certificate_expiring": expires - time.time() < EXPIRY_WARNING,
                "revocations": len(rt.trust.revoked),
                "ca_keys": list(rt.trust.roots.ids),
                "clients": [
                    {
                        "name": c.name,
                        "address": str(c.address),
                        "gateway": c.gateway,
                        "public_key": c.public_key,
                        "peer": c.public_key in peer_keys,
                    }
                    for c in rt.trust.clients()
                ],
                "routes": [
                    {"prefix": str(p), "approved": bool(rt.trust.grants.approved(rt.name, (p,)))}
                    for p in (own.routes if own else ())
                ],
            },
            "peers": rows,
        }


async def _key_step(step: str, call: Callable[[str], Awaitable[Any]], key: str, needed: int) -> int:
    """One keyring step over the whole mesh; how many members confirmed it.

    Serf asks every member by a query, and a member can miss it; the steps are
    idempotent, so a short-handed step is asked again (KEY_STEP_TRIES in all).
    """
    for attempt in range(1, KEY_STEP_TRIES + 1):
        try:
            answer = await call(key)
            return int(answer.num_nodes - answer.num_err)
        except SerfCommandError as exc:
            found = re.search(r"(\d+)/(\d+) nodes reported success", str(exc))
            confirmed = int(found.group(1)) if found else 0
            if confirmed >= needed:
                log.info("gossip key %s: %s (members that are down keep the old key)", step, exc)
                return confirmed
            if attempt == KEY_STEP_TRIES:
                raise GossipError(
                    f"gossip key {step}: only {confirmed} of the {needed} live members "
                    f"confirmed ({exc}) after {attempt} tries; nothing else was changed"
                ) from exc
            log.info("gossip key %s: %d of %d confirmed; asking again", step, confirmed, needed)
            await asyncio.sleep(KEY_STEP_PAUSE)
    raise AssertionError("unreachable")


def parse_prefix(text: str) -> IPNetwork:
    """``10.1.0.0/24`` as a network; InputError for anything else (host bits set too)."""
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        raise InputError(f"{text!r} is not a prefix: {exc}") from None


def _nat_type(roles: frozenset[str]) -> str | None:
    """What this node's record says of its NAT (roles of the NAT plugin), if anything."""
    if "public" in roles:
        return "public"
    found = sorted(r.removeprefix("nat-") for r in roles if r.startswith("nat-"))
    return found[0] if found else None


def _member_row(
    member: Member,
    live: PeerState | None,
    *,
    is_peer: bool,
    via: str | None,
    excluded: str | None,
    path: PathChoice | None,
    carried: frozenset[IPNetwork] = frozenset(),
) -> dict[str, Any]:
    record = member.record
    row = _row(
        member.name,
        record.public_key if record else None,
        record.addresses if record else (),
        member.state.value,
        live,
        is_peer=is_peer,
        via=via,
        excluded=excluded,
    )
    if path is not None:
        row["path"] = path.label or None
        row["path_reason"] = path.reason or None
    approved = set(member.approved_routes)
    row["routes"] = [
        {
            "prefix": str(prefix),
            "approved": prefix in approved,
            # in this node's WireGuard peer (and kernel route) for the member: in use here
            "installed": prefix in carried,
        }
        for prefix in (record.routes if record else ())
    ]
    return row


def _row(
    name: str,
    key: str | None,
    addresses: tuple[Any, ...],
    state: str,
    live: PeerState | None,
    *,
    is_peer: bool,
    via: str | None = None,
    excluded: str | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "public_key": key,
        "addresses": [str(a) for a in addresses],
        "gossip": state,
        "peer": is_peer,
        "via": via,
        "excluded": excluded,
        "endpoint": live.endpoint if live else None,
        "last_handshake": live.last_handshake if live else None,
        "rx_bytes": live.rx_bytes if live else 0,
        "tx_bytes": live.tx_bytes if live else 0,
    }
