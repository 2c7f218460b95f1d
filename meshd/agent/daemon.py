"""The agent: what ``meshd agent`` (and the service) runs on every machine.

One direction per pass (:mod:`meshd.agent.pipeline`)::

    membership view -> certify every member once -> desired.compute (pure)
        -> minimal WireGuard diff -> apply -> meshd_mesh_changed

Start-up order matters. The WireGuard interface comes first, with the peers
applied last time (``peers.json``), so a rebooted node has a data plane before
gossip converges. Then the control socket and the enrolment port, then Serf,
bound to this node's *mesh* address: all gossip flows inside WireGuard. The
agent asks Serf to join every known peer until another member answers.

A pass runs on every view change, every kick, and every ``IDLE_RESYNC`` seconds
(``RESYNC_INTERVAL`` after a failed pass), so whatever was missed is repaired.

Shutdown is bounded: every step has a deadline and the whole takes at most
``SHUTDOWN_BUDGET`` seconds (systemd's stop waits longer, then kills); a task
that ignores its cancellation is named in the log and abandoned.

The rooms: :mod:`~meshd.agent.runtime` (shared handles), :mod:`~meshd.agent.presence`
(record, Serf, joins), :mod:`~meshd.agent.exchange` (chains and revocations),
:mod:`~meshd.agent.addressing` (address conflicts), :mod:`~meshd.agent.seed`
(enrolment, seed side), :mod:`~meshd.agent.operations` (control commands),
:mod:`~meshd.agent.diagnosis` (the facts ``meshd doctor`` judges).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from typing import Any

from meshd import config as config_mod
from meshd import firewall, systemd
from meshd.agent.addressing import Addressing
from meshd.agent.diagnosis import Diagnosis
from meshd.agent.exchange import TrustExchange
from meshd.agent.goodbye import GoodbyeListener, goodbye_targets, say_goodbye
from meshd.agent.operations import Operations
from meshd.agent.pipeline import RECENT_HANDSHAKE, Pipeline
from meshd.agent.presence import RESYNC_INTERVAL, Presence
from meshd.agent.rotation import CaRotation
from meshd.agent.rotation import handlers as rotation_handlers
from meshd.agent.runtime import Runtime
from meshd.agent.seed import Seed
from meshd.config import Config
from meshd.control import ControlServer
from meshd.errors import IdentityError, MeshdError, NetlinkError, WireGuardError
from meshd.gossip.messages import SerfEvent
from meshd.gossip.view import ViewUpdate, is_heartbeat
from meshd.identity import decode_key
from meshd.node import NodeStore, mesh_interface_addresses
from meshd.pki.certificate import CertChain
from meshd.pki.enrol import EnrolRequest
from meshd.pki.enrol_server import EnrolServer
from meshd.pki.rejoin import RejoinServer
from meshd.pki.trust import EXPIRY_WARNING
from meshd.plugins import PluginHost
from meshd.tasks import ShutdownBudget, cancel_and_wait, log_tasks
from meshd.wireguard import InterfaceSpec, WireGuardInterface

log = logging.getLogger(__name__)

INTERFACE_WAIT = 15.0
READY_TIMEOUT = 30.0
# systemd waits 90 s by default; the issue of record asks for 3 s, children included.
SHUTDOWN_BUDGET = 2.5
# A graceful leave waits for Serf to spread the leave intent: not bound by systemd's stop.
LEAVE_EXTRA = 5.0
# With nothing changing, a pass only repairs what time alone changes (a peer's grace,
# its last handshake, both over 100 s windows): at N=30 one pass cost ~25 ms of CPU,
# and every 5 s that was most of an idle agent's 0.5 % of a core.
IDLE_RESYNC = 15.0


class Agent:
    """One node's daemon: lifecycle and the loop; the work is done by its rooms."""

    def __init__(self, config: Config, plugins: PluginHost, store: NodeStore) -> None:
        rt = self._rt = Runtime(config, plugins, store)
        self._expiry_warned = 0.0
        self._control: ControlServer | None = None
        self._enrol: EnrolServer | None = None
        self._rejoin: RejoinServer | None = None
        self.presence = Presence(rt, announce_chain=self._announce_own)
        self.exchange = TrustExchange(rt, republish=self.presence.publish)
        self.rotation = CaRotation(
            rt,
            announce=self.exchange.announce,
            republish=self.presence.publish,
            revoke=self.exchange.revoke,
        )
        self.exchange.on_chain = self.rotation.offer
        self.addressing = Addressing(
            rt, republish=self.presence.publish, restart_gossip=self._restart_gossip
        )
        self.seed = Seed(
            rt, run_pass=self._pass, announce=self.exchange.announce, spread=self.presence.spread
        )
        self.operations = Operations(rt, self.presence, self.exchange)
        self.diagnosis = Diagnosis(rt)
        self.pipeline = Pipeline(rt, own_record=self.presence.record())

    def _verify_joiner(self, request: EnrolRequest) -> None:
        """A joiner's chain leads to a CA key this node trusts (two during a CA rotation),
        fresh, and nothing in it is revoked."""
        trust = self._rt.trust
        request.chain.verify(
            trust.roots, int(time.time()), revoked=trust.revoked, at_admission=True
        )

    async def _announce_own(self) -> None:
        await self.exchange.announce_own()

    def request_stop(self, *, leave: bool = False) -> None:
        self._rt.request_stop(leave=leave)

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or ``meshd leave``); clean up on the way out."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        # `kill -USR1` logs every task with its stack: a hang can be read on a live agent.
        loop.add_signal_handler(signal.SIGUSR1, log_tasks)
        # From the first moment to the last: start-up and shutdown are the loop's too.
        interval = systemd.watchdog_interval()
        pinger = asyncio.create_task(systemd.watchdog(interval)) if interval else None
        try:
            # Start-up itself races the stop request: SIGTERM during start-up ends it.
            started = asyncio.ensure_future(self._start_and_wait_joined())
            stop = asyncio.ensure_future(self._rt.stop_requested.wait())
            await asyncio.wait({started, stop}, return_when=asyncio.FIRST_COMPLETED)
            if started.done():
                stop.cancel()
                started.result()  # start-up failed: raise
                systemd.notify("READY=1\nSTATUS=mesh interface up, gossip joined")
                await self._rt.stop_requested.wait()
            else:
                await cancel_and_wait([started], 0.5, what="start-up")
        finally:
            systemd.notify("STOPPING=1")
            await self._shutdown()
            if pinger is not None:
                await cancel_and_wait([pinger], 0.5, what="watchdog")
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)

    async def _start_and_wait_joined(self) -> None:
        await self._start()
        await self._wait_joined()

    async def _start(self) -> None:
        rt = self._rt
        cfg, state = rt.config, rt.state
        spec = InterfaceSpec(
            ifname=cfg.wireguard.interface,
            private_key=state.keys.private_key,
            listen_port=cfg.wireguard.port,
            addresses=mesh_interface_addresses(state.network, state.addresses),
            mtu=cfg.wireguard.mtu,
        )
        rt.iface = await self._open_interface(spec)
        rt.tasks.start(rt.iface.supervise(), name="wireguard")
        await self.presence.refresh_local_addresses()

        for peer in rt.store.load_peers():
            rt.known.add(peer)
            if peer.chain is not None:
                try:
                    rt.trust.add_chain(peer.chain, CertChain.decode(peer.chain).ref)
                except IdentityError as exc:
                    log.warning("ignored the cached certificate of %s: %s", peer.name, exc)
        if len(rt.known):
            log.info("restoring %d peer(s) from the last run", len(rt.known))
        await self.pipeline.run(())

        # Serf writes its snapshot as it starts: none yet means this node never ran.
        first_start = not (rt.store.serf_dir / "snapshot").exists()
        # Gossip first: every join waits for it; the control and enrolment ports can wait.
        await self.presence.start_gossip(self._on_gossip_event)
        if first_start and len(rt.known):
            rt.tasks.start(self.presence.greet(), name="greet")
        self._control = ControlServer(
            rt.store.dir,
            {
                **self.operations.handlers(),
                **rotation_handlers(self.rotation),
                "doctor": self.diagnosis.report,
            },
        )
        await self._control.start()
        if cfg.enrol.enabled:
            self._enrol = EnrolServer(
                "0.0.0.0",
                cfg.enrol.port,
                verify=self._verify_joiner,
                on_enrolled=self.seed.enrolled,
                identity=self.seed.identity,
            )
            await self._enrol.start()
            # The same port number over UDP: members everybody dropped ask to come back.
            self._rejoin = RejoinServer(
                "0.0.0.0",
                cfg.enrol.port,
                decode_key(state.keys.private_key),
                on_rejoin=self.seed.rejoined,
            )
            await self._rejoin.start()

        rt.plugins.startup(rt.face)
        rt.tasks.start(self._loop(), name="reconcile-loop")
        rt.tasks.start(self.presence.join_loop(), name="gossip-join")
        rt.tasks.start(self.presence.rejoin_loop(), name="gossip-rejoin")
        rt.tasks.start(self.exchange.revocation_loop(), name="revocation-sync")
        if self.rotation.held_ca() is not None:
            rt.tasks.start(self.rotation.renew_loop(), name="ca-renewal")
        rt.tasks.start(self.presence.reannounce_loop(), name="reannounce")
        rt.tasks.start(self.presence.roam_loop(), name="roaming")
        rt.tasks.start(self.presence.prune_loop(), name="prune-old-self")
        rt.tasks.start(GoodbyeListener(rt).run(), name="goodbye")

    async def _wait_joined(self) -> None:
        """Until gossip has joined another member: at once for a node that knows nobody
        (the first one), at most READY_TIMEOUT for the others (a mesh that is down must
        not keep the service from starting)."""
        rt = self._rt
        if not len(rt.known):
            return
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(READY_TIMEOUT):
                await rt.joined.wait()
        if not rt.joined.is_set():
            log.warning("no other member answered within %.0f s; running alone", READY_TIMEOUT)

    async def _open_interface(self, spec: InterfaceSpec) -> WireGuardInterface:
        """Open the interface, waiting a while for the wireguard-go of a crashed agent
        (it gets SIGTERM when its parent dies, and may take a moment to go)."""
        deadline = time.monotonic() + INTERFACE_WAIT
        while True:
            try:
                return await WireGuardInterface.open(
                    spec, backend=self._rt.config.wireguard.backend
                )
            except (WireGuardError, NetlinkError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("interface %s not ready yet (%s); retrying", spec.ifname, exc)
                await asyncio.sleep(0.5)

    async def _restart_gossip(self) -> None:
        """Serf again, on this node's new address: leave, start afresh, re-join known peers.

        A graceful leave, so the others take the new address at once instead of
        refusing a second member of this name while the old one is only suspected dead.
        """
        await self.presence.stop_gossip(leave=True, timeout=SHUTDOWN_BUDGET)
        await self.presence.start_gossip(self._on_gossip_event)
        # Goodbyes arrive on the gossip address: listen on the new one.
        await self._rt.tasks.cancel(self._rt.tasks.named("goodbye"), 0.5)
        self._rt.tasks.start(GoodbyeListener(self._rt).run(), name="goodbye")

    async def _shutdown(self) -> None:
        """Every step bounded, all within SHUTDOWN_BUDGET (more when leaving the mesh)."""
        rt = self._rt
        leaving = rt.leaving
        budget = ShutdownBudget(SHUTDOWN_BUDGET + (LEAVE_EXTRA if leaving else 0.0))
        log.info("stopping%s", " (leaving the mesh)" if leaving else "")
        try:
            rt.plugins.shutdown(rt.face)
        except Exception:
            log.exception("a plugin failed at shutdown")
        if leaving and rt.has_iface:
            # Through each peer's tunnel, so nobody can forge it (see agent/goodbye.py).
            targets = goodbye_targets(rt, rt.snapshot.desired.peers)
            await budget.step(
                "saying goodbye", say_goodbye(rt.state.keys.public_key, targets), limit=0.3
            )
        # Tasks first (they use what is closed below), then what they used, children last.
        budget.abandoned += await rt.tasks.cancel_all(budget.share(0.5))
        await budget.step(
            "stopping gossip",
            self.presence.stop_gossip(
                leave=leaving, timeout=budget.share(0.8 + LEAVE_EXTRA * leaving)
            ),
            limit=1.0 + LEAVE_EXTRA * leaving,
        )
        closers = [
            budget.step("removing meshd's nftables table", firewall.remove(), limit=0.5),
            budget.step("undoing the gateway's forwarding", rt.forwarding.stop(), limit=0.5),
        ]
        if self._enrol is not None:
            closers.append(budget.step("stopping the enrolment port", self._enrol.stop()))
        if self._rejoin is not None:
            closers.append(budget.step("stopping the re-join port", self._rejoin.stop()))
        if self._control is not None:
            closers.append(budget.step("stopping the control socket", self._control.stop()))
        if rt.has_iface:
            closers.append(budget.step("removing the interface", rt.iface.close()))
        await asyncio.gather(*closers)
        if leaving:
            rt.store.save_peers([])
        else:
            self.pipeline.flush()
        if budget.abandoned:
            log.warning("stopped, abandoning: %s", ", ".join(budget.abandoned))
        else:
            log.info("stopped")

    def _reload(self) -> None:
        """SIGHUP: the plugins' tables of the config file, read again (the rest of the
        file needs a restart: the interface, ports and state directory are in use)."""
        rt = self._rt
        log.info("SIGHUP: re-reading the configuration of plugins")
        try:
            fresh = config_mod.reload_plugin_sections(rt.config)
            rt.plugins.configure(fresh.view())
        except MeshdError as exc:
            log.error("reload refused: %s", exc)
        else:
            rt.config = fresh
        rt.kick()

    def _on_gossip_event(self, event: SerfEvent) -> None:
        self.exchange.on_event(event)

    # --- the loop --------------------------------------------------------

    async def _loop(self) -> None:
        """A pass on every view change, on a kick, and every IDLE_RESYNC seconds
        (RESYNC_INTERVAL after a failed pass)."""
        rt = self._rt
        resync = IDLE_RESYNC
        last_pass = time.monotonic()
        while True:
            if not rt.has_gossip:  # restarting on a new address
                await asyncio.sleep(0.2)
                continue
            view = rt.gossip.view
            subscription = view.subscribe()
            next_change = asyncio.ensure_future(subscription.__anext__())
            kick: asyncio.Future[bool] = asyncio.ensure_future(rt.kicked.wait())
            try:
                # Until gossip restarts on a new address and a new view replaces this one.
                while rt.has_gossip and rt.gossip.view is view:
                    if kick.done():
                        kick = asyncio.ensure_future(rt.kicked.wait())
                    waiting: set[asyncio.Future[Any]] = {next_change, kick}
                    await asyncio.wait(
                        waiting,
                        timeout=max(0.0, last_pass + resync - time.monotonic()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    kicked = kick.done()
                    if kicked:
                        rt.kicked.clear()
                    update = next_change.result() if next_change.done() else None
                    if update is not None:
                        next_change = asyncio.ensure_future(subscription.__anext__())
                        if not kicked and self._heartbeats_only(update):
                            continue
                    last_pass = time.monotonic()
                    try:
                        await self._pass()
                        resync = IDLE_RESYNC
                    except MeshdError as exc:
                        log.warning("reconcile pass failed, retrying: %s", exc)
                        resync = RESYNC_INTERVAL
            finally:
                next_change.cancel()
                kick.cancel()
                subscription.close()

    def _heartbeats_only(self, update: ViewUpdate) -> bool:
        """Whether a view update holds only heartbeats (:func:`is_heartbeat`): at N=40
        one pass on every node for every member's minutely heartbeat was most of an idle
        agent's CPU. Not for a member that said goodbye (a newer record is how it comes
        back), one whose name two Serf members hold (the newer record may win), or one
        with no recent handshake: an unheard member re-announces its record to poke the
        others, and their pass is what moves NAT traversal on (asking a relay, trying a
        punch again; without it a symmetric-NAT lab took 25-30 s to form, not 15 s)."""
        rt = self._rt
        names = Counter(m.name for m in update.members.values())
        heard = rt.recent_handshakes(RECENT_HANDSHAKE)
        return all(
            is_heartbeat(c)
            and c.after.record is not None
            and c.after.record.public_key not in rt.departed
            and c.after.record.public_key in heard
            and names[c.after.name] == 1
            for c in update.changes
        )

    async def _pass(self) -> None:
        members = self.pipeline.observe()
        self.exchange.fetch_missing(members)
        self.exchange.notice_digests(members)
        self._warn_expiry()
        if await self.addressing.resolve(members):
            members = self.pipeline.observe()
        await self.pipeline.run(members)

    def _warn_expiry(self) -> None:
        """Warn, at most hourly, when this node's certificate lapses within two weeks."""
        left = self._rt.own_chain.node.not_after - time.time()
        if left > EXPIRY_WARNING or time.monotonic() - self._expiry_warned < 3600:
            return
        self._expiry_warned = time.monotonic()
        log.warning(
            "this node's certificate %s in %.1f days: rotate it with "
            "'meshd key rotate-wireguard --token-file TOKEN'",
            "expires" if left > 0 else "expired",
            abs(left) / 86400,
        )
