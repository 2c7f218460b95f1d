"""NAT traversal at run time: what this node learns, and the tasks that learn it.

- **Discovery.** A node behind NAT asks two public members, over the control
  channel, which endpoint they see its WireGuard packets come from (their
  WireGuard's live endpoint for its key): that is its reflexive endpoint, the one
  WireGuard's own socket is mapped to (a STUN client would learn another socket's
  mapping). Both saw the same one: an endpoint-independent ("cone") NAT. Different
  ones: symmetric. Asked again every 30 s, and at once while unknown.
- **Relays.** A relay (a public member, by default) forwards WireGuard ciphertext
  for a pair through a port per end (:mod:`meshd_nat.relay`). A node behind NAT
  probes the relays every 0.5 s and keeps the nearest that answers as its *home*
  (published in its record); it moves when its home stops answering for 1.5 s.
  Both ends of a pair use the home of the pair's lower-key member
  (:func:`meshd_nat.paths.pair_relay`) and each asks that relay for its port.
- **Hole punching.** For two cone-NATed members in different sites, the one with
  the lower key (the controller) sends ``punch`` through the pair's current
  (relayed) tunnel. The other answers first, then aims its WireGuard at the
  controller's reflexive endpoint; the controller does so when the answer arrives.
  Each sends echoes through the tunnel, so WireGuard sends to the new endpoint from
  its own socket and both NATs see outbound packets. The one that sends last gets
  through the other's NAT: no simultaneous-open race, so no conntrack clash (Linux
  keeps an UNREPLIED entry for an inbound first packet that arrives before the
  local one leaves, and remaps the local one; staggering by a round trip avoids
  being the first inbound). The controller decides (echoes answered over the new
  path, WireGuard's live endpoint the direct one) and tells the other. A failure
  goes back to the relay and retries after 20 s, doubling to 10 minutes; a direct
  path that stops carrying traffic for 60 s does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from meshd import AgentAPI, Member, MeshdError, PathChoice
from meshd_nat.control import PORT_OFFSET, Channel, ControlError
from meshd_nat.paths import (
    CONE,
    HOME_PREFIX,
    NAT_PREFIX,
    PUBLIC,
    RELAY,
    SYMMETRIC,
    UNKNOWN,
    Punch,
    Side,
    can_punch,
    choose,
    key_tag,
    pair_relay,
    sides,
)

log = logging.getLogger("meshd_nat")

OBSERVE_INTERVAL = 30.0
OBSERVE_RETRY = 2.0
OBSERVE_SINGLE = 10.0
PROBE_INTERVAL = 0.5
HOME_DEAD_AFTER = 1.5
ALLOCATION_REFRESH = 30.0
PUNCH_WINDOW = 3.0
PUNCH_GIVE_UP = 1.2  # no echo through the new path by then: it failed
PUNCH_BACKOFF = 20.0
PUNCH_BACKOFF_MAX = 600.0
DIRECT_SILENT_LIMIT = 60.0
KICKS = 6
NOT_STARTED_RETRY = 3.0
KICK_INTERVAL = 0.2
# WireGuard's Reject-After-Time: a session older than this carries no data.
SESSION_LIFETIME = 180.0


@dataclass(frozen=True)
class Settings:
    public: bool
    relay: bool
    punch: bool


@dataclass
class RelayProbe:
    rtt: float = 1.0
    answered_at: float = 0.0


class Traversal:
    """The NAT plugin's running state; its hooks read it, its tasks write it."""

    def __init__(self, agent: AgentAPI, settings: Settings) -> None:
        self.agent = agent
        self.settings = settings
        self.channel: Channel | None = None
        self.reflexive: str | None = None
        self.nat: str | None = None
        self.observed: dict[str, str] = {}
        self.home: str | None = None  # member name of this node's home relay
        self.probes: dict[str, RelayProbe] = {}
        self._alive_relays: set[str] = set()  # relays answering at the last probe round
        # (relay name, peer key) -> (forwarding endpoint, when obtained)
        self.allocations: dict[tuple[str, str], tuple[str, float]] = {}
        self._asking: set[tuple[str, str]] = set()
        self.punches: dict[str, Punch] = {}  # by peer key
        self._rx: dict[str, tuple[int, float]] = {}  # peer key -> (rx bytes, when it last grew)
        self.relay_server: Any = None
        self._sides: dict[str, Side] = {}
        self._mesh6: dict[str, str] = {}  # member name -> its IPv6 mesh address
        self._learnt_from: tuple[Member, ...] | None = None
        self._me: tuple[tuple[object, ...], Side] | None = None

    # --- facts for the hooks --------------------------------------------------

    @property
    def me(self) -> Side:
        # Asked once per member in every pass: rebuilt only when what it says changed.
        identity = self.agent.identity
        home = self._sides.get(self.home) if self.home else None
        facts = (identity, self.settings, self.nat, self.reflexive, home.key if home else None)
        if self._me is not None and self._me[0] == facts:
            return self._me[1]
        roles = self.roles()
        side = Side(
            name=identity.name,
            key=identity.public_key,
            endpoints=tuple(self.endpoints()),
            public=PUBLIC in roles,
            nat=self.nat if self.nat in (CONE, SYMMETRIC, UNKNOWN) else None,
            relay=RELAY in roles,
            home=next(
                (r.removeprefix(HOME_PREFIX) for r in roles if r.startswith(HOME_PREFIX)), None
            ),
        )
        self._me = (facts, side)
        return side

    def roles(self) -> set[str]:
        roles: set[str] = set()
        if self.settings.public:
            roles.add(PUBLIC)
            if self.settings.relay:
                roles.add(RELAY)
            return roles
        if self.nat in (CONE, SYMMETRIC, UNKNOWN):
            roles.add(NAT_PREFIX + self.nat)
        home = self._sides.get(self.home) if self.home else None
        if home is not None:
            roles.add(HOME_PREFIX + key_tag(home.key))
        return roles

    def endpoints(self) -> list[str]:
        return [self.reflexive] if self.reflexive and not self.settings.public else []

    def select(self, member: Member) -> PathChoice | None:
        if member.record is None:
            return None
        self._learn(self.agent.members)
        peer = self._sides.get(member.name) or Side.of(member.name, member.record)
        me = self.me
        now = time.monotonic()
        punch = self.punches.get(peer.key, Punch())
        relays = self._relays()
        relay = pair_relay(me, peer, relays) if me.natted and peer.natted else None
        endpoint = None
        if relay is not None:
            held = self.allocations.get((relay, peer.key))
            if held is None or now - held[1] > ALLOCATION_REFRESH:
                self._ask_relay(relay, peer)
            if held is not None:
                endpoint = held[0]
        return choose(me, peer, punch=punch, relay=relay, relay_endpoint=endpoint, now=now)

    # --- the tasks --------------------------------------------------------------

    async def run(self) -> None:
        """Open the control channel, then run every task this node's role needs."""
        mesh6 = next((str(a) for a in self.agent.mesh_addresses if a.version == 6), None)
        if mesh6 is None:
            log.warning("NAT traversal is off: this node has no IPv6 mesh address")
            return
        channel = Channel(mesh6, self.agent.listen_port + PORT_OFFSET, self.agent.interface)
        for attempt in range(50):  # the interface may still be coming up
            try:
                channel.open()
                break
            except OSError as exc:
                if attempt == 49:
                    log.warning("NAT traversal is off: control channel on [%s]: %s", mesh6, exc)
                    return
                await asyncio.sleep(0.2)
        self.channel = channel
        # The record may have gone out before this plugin started: publish its roles.
        self.agent.refresh()
        channel.handle("echo", self._on_echo)
        channel.handle("observe", self._on_observe)
        channel.handle("punch", self._on_punch)
        channel.handle("verdict", self._on_verdict)
        if self.settings.public and self.settings.relay:
            from meshd_nat.relay import Relay

            self.relay_server = Relay()
            channel.handle("alloc", self._on_alloc)
        try:
            async with asyncio.TaskGroup() as group:
                if not self.settings.public:
                    group.create_task(self._discover())
                    group.create_task(self._probe_relays())
                    if self.settings.punch:
                        group.create_task(self._punch_loop())
                if self.relay_server is not None:
                    group.create_task(self._expire_relay())
        finally:
            self.close()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.relay_server is not None:
            self.relay_server.close()
            self.relay_server = None

    async def _discover(self) -> None:
        while True:
            self._learn(self.agent.members)
            observers = sorted(
                (side for side in self._sides.values() if side.public), key=lambda s: s.name
            )
            random.shuffle(observers)
            seen: dict[str, str] = {}
            for side in observers[:2]:
                address = self._mesh6.get(side.name)
                if address is None or self.channel is None:
                    continue
                try:
                    answer = await self.channel.request(address, {"t": "observe"}, timeout=1.0)
                except ControlError as exc:
                    log.debug("observe via %s: %s", side.name, exc)
                    continue
                endpoint = answer.get("ep")
                if isinstance(endpoint, str) and endpoint:
                    seen[side.name] = endpoint
            # Two observers tell a symmetric NAT from a cone one. With one answer (a
            # public member with no session to us yet sees nothing; or only one public
            # member exists) the endpoint is known, the type only guessed: ask again soon.
            if seen:
                self._conclude(seen)
            if len(seen) >= 2:
                await asyncio.sleep(OBSERVE_INTERVAL)
            else:
                # With no public member known yet (the start) this waits OBSERVE_SINGLE,
                # and a NATed node learns its NAT type about 9 s after it starts. Asking
                # again after OBSERVE_RETRY instead was tried. Its failed punches (12/32
                # site pairs direct) came from joiners dialling reflexive endpoints
                # (docs/nat.md; fixed in meshd.agent.seed.dialable). With that fixed, one
                # run of test_nat.py showed no gain (symmetric lab 14.7 s, a joiner's
                # full mesh 15.8 s), so the wait stays.
                await asyncio.sleep(OBSERVE_RETRY if len(observers) >= 2 else OBSERVE_SINGLE)

    def _single_observer(self) -> bool:
        return sum(side.public for side in self._sides.values()) < 2

    def _conclude(self, seen: Mapping[str, str]) -> None:
        endpoints = sorted(set(seen.values()))
        if len(endpoints) > 1:
            nat = SYMMETRIC
        elif len(seen) > 1 or self._single_observer():
            nat = CONE
        elif self.nat in (CONE, SYMMETRIC):
            nat = self.nat  # one answer this time: what two said before still holds
        else:
            nat = UNKNOWN  # relayed meanwhile; never punched on a guess
        # Under a symmetric NAT the reflexive endpoint is one observer's only: it
        # still tells same-site members apart by address.
        reflexive = seen[min(seen)]
        if (reflexive, nat) != (self.reflexive, self.nat):
            log.info(
                "NAT: %s, reflexive endpoint %s (seen by %s)",
                nat,
                reflexive,
                ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())),
            )
            self.reflexive, self.nat = reflexive, nat
            self.agent.refresh()

    async def _probe_relays(self) -> None:
        while True:
            self._learn(self.agent.members)
            relays = sorted(name for name, side in self._sides.items() if side.relay)
            if relays and self.channel is not None:
                await asyncio.gather(*(self._probe(name) for name in relays[:4]))
            now = time.monotonic()
            alive = {
                name: probe
                for name, probe in self.probes.items()
                if name in relays and now - probe.answered_at <= HOME_DEAD_AFTER
            }
            home = self.home
            if home not in alive:
                home = min(alive, key=lambda n: (alive[n].rtt, n)) if alive else None
            if home != self.home:
                log.info("NAT: home relay %s (was %s)", home or "none", self.home or "none")
                self.home = home
                self.agent.refresh()
            elif alive.keys() != self._alive_relays:
                # A relay that stops (or starts) answering moves the pairs it carries at
                # once: passes are not run for unchanged records any more, so waiting for
                # one (or for Serf to call the relay failed) took 7 s in a loaded lab.
                self.agent.refresh()
            self._alive_relays = set(alive)
            await asyncio.sleep(PROBE_INTERVAL)

    async def _probe(self, name: str) -> None:
        address = self._mesh6.get(name)
        if address is None or self.channel is None:
            return
        started = time.monotonic()
        with contextlib.suppress(ControlError):
            await self.channel.request(
                address, {"t": "echo"}, timeout=PROBE_INTERVAL * 1.6, tries=1
            )
            now = time.monotonic()
            probe = self.probes.setdefault(name, RelayProbe(rtt=now - started))
            probe.rtt = 0.7 * probe.rtt + 0.3 * (now - started)
            probe.answered_at = now

    def _ask_relay(self, relay: str, peer: Side) -> None:
        wanted = (relay, peer.key)
        if wanted in self._asking or self.channel is None:
            return
        self._asking.add(wanted)
        self.agent.spawn(self._allocate(relay, peer), name=f"nat-alloc-{relay}")

    async def _allocate(self, relay: str, peer: Side) -> None:
        try:
            side = self._sides.get(relay)
            address = self._mesh6.get(relay)
            if side is None or address is None or not side.endpoints or self.channel is None:
                return
            try:
                answer = await self.channel.request(
                    address, {"t": "alloc", "peer": peer.key}, timeout=1.5, tries=3
                )
            except ControlError as exc:
                log.info("relay %s gives no port for %s: %s", relay, peer.name, exc)
                return
            port = answer.get("port")
            host = _host(side.endpoints[0])
            if not isinstance(port, int) or host is None:
                return
            endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            before = self.allocations.get((relay, peer.key))
            self.allocations[(relay, peer.key)] = (endpoint, time.monotonic())
            if before is None or before[0] != endpoint:
                log.info("relay %s forwards to %s at %s", relay, peer.name, endpoint)
                if not await self._has_session(peer.key):
                    # Its last attempts went where they could not arrive; without this, its
                    # first packet to the relay would wait up to 5 s (67 of 176 relayed pairs
                    # in 44 lab runs: both ends known to the relay only 5 s apart).
                    with contextlib.suppress(MeshdError):
                        await self.agent.restart_peer(peer.key, endpoint)
                self.agent.refresh()
                self._kick(peer.name)
        finally:
            self._asking.discard((relay, peer.key))

    async def _has_session(self, key: str) -> bool:
        """Whether WireGuard holds a session with ``key`` that still carries data."""
        try:
            stats = {p.public_key: p for p in await self.agent.peer_stats()}
        except MeshdError:
            return True  # unknown: leave the peer as it is
        shaken = stats[key].last_handshake if key in stats else None
        return shaken is not None and time.time() - shaken < SESSION_LIFETIME

    def _kick(self, name: str) -> None:
        """Send echoes through the tunnel to ``name``: WireGuard sends them to the
        endpoint it has now, from its own socket (a relay learns where we are, a NAT
        opens its mapping)."""
        address = self._mesh6.get(name)
        if address is None:
            return

        async def kicks() -> None:
            for _ in range(KICKS):
                await asyncio.sleep(KICK_INTERVAL)
                if self.channel is not None:
                    self.channel.send(address, {"t": "echo", "i": 0})

        self.agent.spawn(kicks(), name=f"nat-kick-{name}")

    async def _punch_loop(self) -> None:
        running: dict[str, asyncio.Task[None]] = {}
        while True:
            await asyncio.sleep(1.0)
            self._learn(self.agent.members)
            me = self.me
            now = time.monotonic()
            await self._watch_direct(now)
            for side in self._sides.values():
                punch = self.punches.get(side.key, Punch())
                if (
                    side.key <= me.key
                    or not can_punch(me, side)
                    or punch.direct
                    or punch.trying
                    or now < punch.next_try
                    or side.name in running
                ):
                    continue
                running[side.name] = asyncio.get_running_loop().create_task(self._punch(side))
            for name in [n for n, task in running.items() if task.done()]:
                del running[name]

    async def _punch(self, peer: Side) -> None:
        address = self._mesh6.get(peer.name)
        if address is None or self.channel is None or not peer.reflexive:
            return
        try:
            await self.channel.request(address, {"t": "punch"}, timeout=1.5, tries=3)
        except ControlError as exc:
            # No tunnel yet (the relay's port is still being asked for): not a failed punch.
            log.debug("punch with %s not started: %s", peer.name, exc)
            held = self.punches.get(peer.key, Punch())
            self.punches[peer.key] = replace(held, next_try=time.monotonic() + NOT_STARTED_RETRY)
            return
        log.debug("punching with %s at %s", peer.name, peer.reflexive)
        self.punches[peer.key] = replace(self.punches.get(peer.key, Punch()), trying=True)
        self.agent.refresh()
        ok = await self._verify(peer, address)
        for _ in range(3):
            try:
                await self.channel.request(address, {"t": "verdict", "ok": ok}, timeout=1.0)
                break
            except ControlError:
                continue
        self._settle(peer, ok)

    async def _aim(self, peer: Side) -> None:
        """Point WireGuard at the peer's reflexive endpoint again: a packet of the pair
        still on its way through the relay moves it back there when it arrives."""
        if peer.reflexive:
            with contextlib.suppress(MeshdError):
                await self.agent.set_endpoint(peer.key, peer.reflexive)

    async def _verify(self, peer: Side, address: str) -> bool:
        assert self.channel is not None
        answered = late = 0
        started = time.monotonic()
        deadline = started + PUNCH_WINDOW
        while time.monotonic() < deadline:
            await self._aim(peer)
            try:
                await self.channel.request(address, {"t": "echo"}, timeout=0.25, tries=1)
                answered += 1
                if deadline - time.monotonic() < PUNCH_WINDOW / 2:
                    late += 1
            except ControlError:
                pass
            if not answered and time.monotonic() - started > PUNCH_GIVE_UP:
                break  # nothing came through: the pair is cut off while this lasts
            await asyncio.sleep(0.05)
        answered = late
        try:
            live = {p.public_key: p.endpoint for p in await self.agent.peer_stats()}
        except MeshdError:
            return False
        return answered >= 2 and live.get(peer.key) == peer.reflexive

    def _settle(self, peer: Side, ok: bool) -> None:
        if ok:
            log.info("hole punching with %s worked: direct at %s", peer.name, peer.reflexive)
            self.punches[peer.key] = Punch(direct=True)
            self._rx.pop(peer.key, None)
        else:
            self._failed(peer.key)
            punch = self.punches[peer.key]
            log.info(
                "hole punching with %s failed (%dx); relayed, next try in %.0f s",
                peer.name,
                punch.failures,
                punch.next_try - time.monotonic(),
            )
        self.agent.refresh()

    def _failed(self, key: str) -> None:
        failures = self.punches.get(key, Punch()).failures + 1
        wait = min(PUNCH_BACKOFF_MAX, PUNCH_BACKOFF * 2 ** (failures - 1)) * random.uniform(
            0.9, 1.1
        )
        self.punches[key] = Punch(failures=failures, next_try=time.monotonic() + wait)

    async def _watch_direct(self, now: float) -> None:
        direct = [key for key, punch in self.punches.items() if punch.direct]
        if not direct:
            return
        try:
            stats = {p.public_key: p for p in await self.agent.peer_stats()}
        except MeshdError:
            return
        for key in direct:
            peer = stats.get(key)
            rx = peer.rx_bytes if peer else 0
            last, since = self._rx.get(key, (-1, now))
            if rx != last:
                self._rx[key] = (rx, now)
            elif now - since > DIRECT_SILENT_LIMIT:
                log.info("direct path to %s went silent; back to the relay", key)
                self._failed(key)
                self._rx.pop(key, None)
                self.agent.refresh()

    async def _expire_relay(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            if self.relay_server is not None:
                self.relay_server.expire()

    # --- what others ask ----------------------------------------------------------

    def _member_at(self, address: str) -> Member | None:
        for member in self.agent.members:
            record = member.record
            if record is not None and member.certified and address in map(str, record.addresses):
                return member
        return None

    async def _on_echo(self, source: str, message: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return {} if message.get("i") else None

    async def _on_observe(
        self, source: str, message: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        member = self._member_at(source)
        if member is None or member.record is None:
            raise ControlError("not a member")
        live = {p.public_key: p.endpoint for p in await self.agent.peer_stats()}
        return {"ep": live.get(member.record.public_key)}

    async def _on_alloc(self, source: str, message: Mapping[str, Any]) -> Mapping[str, Any] | None:
        member = self._member_at(source)
        peer_key = message.get("peer")
        if member is None or member.record is None:
            raise ControlError("not a member")
        known = {m.record.public_key for m in self.agent.members if m.record and m.certified}
        if not isinstance(peer_key, str) or peer_key not in known:
            raise ControlError("no such member")
        try:
            port = await self.relay_server.allocate(member.record.public_key, peer_key)
        except (ValueError, MeshdError) as exc:
            raise ControlError(str(exc)) from None
        return {"port": port}

    async def _on_punch(self, source: str, message: Mapping[str, Any]) -> Mapping[str, Any] | None:
        member = self._member_at(source)
        if member is None or member.record is None:
            raise ControlError("not a member")
        key = member.record.public_key
        if not self.settings.punch:
            raise ControlError("hole punching is off here")

        side = self._sides.get(member.name) or Side.of(member.name, member.record)
        address = source

        async def switch() -> None:
            # Answer first (through the relay), then aim at the controller directly.
            await asyncio.sleep(0.05)
            self.punches[key] = replace(self.punches.get(key, Punch()), trying=True)
            self.agent.refresh()
            until = time.monotonic() + PUNCH_WINDOW
            while time.monotonic() < until and self.punches.get(key, Punch()).trying:
                await self._aim(side)
                if self.channel is not None:
                    self.channel.send(address, {"t": "echo", "i": 0})
                await asyncio.sleep(KICK_INTERVAL)
            await asyncio.sleep(4.0)
            if self.punches.get(key, Punch()).trying:  # no verdict came: go back
                self._failed(key)
                self.agent.refresh()

        self.agent.spawn(switch(), name=f"nat-punch-{member.name}")
        return {}

    async def _on_verdict(
        self, source: str, message: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        member = self._member_at(source)
        if member is None or member.record is None:
            raise ControlError("not a member")
        key = member.record.public_key
        if self.punches.get(key, Punch()).trying or message.get("ok") is False:
            side = self._sides.get(member.name) or Side.of(member.name, member.record)
            self._settle(side, bool(message.get("ok")))
        return {}

    # --- bookkeeping ----------------------------------------------------------------

    def _learn(self, members: tuple[Member, ...]) -> None:
        if members is self._learnt_from:  # once per pass, not once per member
            return
        self._learnt_from = members
        self._sides = sides(members, self.agent.identity.name)
        self._mesh6 = {
            m.name: str(next(a for a in m.record.addresses if a.version == 6))
            for m in members
            if m.record is not None and any(a.version == 6 for a in m.record.addresses)
        }

    def _relays(self) -> dict[str, str]:
        """Relays alive in gossip that answer this node's probes, by key tag."""
        now = time.monotonic()
        found = {}
        for name, side in self._sides.items():
            if not side.relay:
                continue
            probe = self.probes.get(name)
            if self.probes and (probe is None or now - probe.answered_at > HOME_DEAD_AFTER):
                continue
            found[key_tag(side.key)] = name
        return found


def _host(endpoint: str) -> str | None:
    from meshd_nat.paths import host_of

    return host_of(endpoint)
