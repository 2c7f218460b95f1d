"""meshd-webhook: POST a JSON event to a URL when a member joins, leaves or fails.

An example of a third-party meshd plugin (docs/plugins.md). It uses three hooks:

- ``meshd_configure`` reads ``[plugins.webhook]`` (``url``, ``timeout``) and refuses
  unknown keys or a URL that is not http(s);
- ``meshd_startup`` starts its tasks (hooks never block: the POSTs happen there):
  one compares the members' states (``agent.members``, the last pass's) with
  what it saw before and queues an event per change, one sends them;
- ``meshd_mesh_changed`` wakes the first at once after an interface change.

It imports only ``meshd`` itself, as every plugin must.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from meshd import AgentAPI, ConfigError, ConfigView, Member, MeshView, hookimpl

log = logging.getLogger(__name__)

NAME = "webhook"
KEYS = {"url", "timeout"}
QUEUE_LIMIT = 1000
POLL_INTERVAL = 1.0
# A member's state as this plugin reports it; any other (leaving, reaped) is "gone".
_EVENTS = {"alive": "member-join", "failed": "member-failed"}


@dataclass
class Webhook:
    """The plugin: settings, the last pass's member states, and the queue of events."""

    url: str | None = None
    timeout: float = 5.0
    states: dict[str, str] | None = None
    queue: asyncio.Queue[dict[str, Any]] | None = None
    changed: asyncio.Event | None = None
    sent: int = 0

    @hookimpl
    def meshd_configure(self, config: ConfigView) -> None:
        section = config.section(NAME)
        unknown = sorted(set(section) - KEYS)
        if unknown:
            raise ConfigError(
                f"unknown key (known: {', '.join(sorted(KEYS))})",
                file=config.path,
                key=f"plugins.{NAME}.{unknown[0]}",
            )
        url = section.get("url")
        if url is not None and (
            not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https")
        ):
            raise ConfigError(
                "must be an http:// or https:// URL", file=config.path, key=f"plugins.{NAME}.url"
            )
        timeout = section.get("timeout", 5)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ConfigError(
                "must be a positive number of seconds",
                file=config.path,
                key=f"plugins.{NAME}.timeout",
            )
        self.url, self.timeout = url, float(timeout)

    @hookimpl
    def meshd_startup(self, agent: AgentAPI) -> None:
        if self.url is None:
            return
        self.queue = asyncio.Queue(QUEUE_LIMIT)
        self.changed = asyncio.Event()
        agent.spawn(self._watch(agent), name="webhook-watch")
        agent.spawn(self._send_all(), name="webhook-sender")

    @hookimpl
    def meshd_mesh_changed(self, agent: AgentAPI, view: MeshView) -> None:
        # Only a wake-up: this hook follows passes that changed the interface, and a
        # member can come and go without that (its peer was known from enrolment).
        if self.changed is not None:
            self.changed.set()

    async def _watch(self, agent: AgentAPI) -> None:
        """Compare the members of the last pass with what was seen before, on every
        interface change and at least every POLL_INTERVAL seconds."""
        assert self.changed is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_INTERVAL):
                    await self.changed.wait()
            self.changed.clear()
            self.observe(agent, member_states(agent.members, own=agent.identity.name))

    def observe(self, agent: AgentAPI, now: dict[str, str]) -> None:
        """Queue an event per member whose state changed since the last call."""
        if self.states is None:  # the members already there when the agent started
            self.states = now
            return
        assert self.queue is not None
        for event in changes(self.states, now):
            event |= {
                "node": agent.identity.name,
                "network": agent.network.name,
                "time": time.time(),
            }
            try:
                self.queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("webhook: %d events wait already; dropped %s", QUEUE_LIMIT, event)
        self.states = now

    async def _send_all(self) -> None:
        assert self.queue is not None
        assert self.url is not None
        while True:
            event = await self.queue.get()
            try:
                await asyncio.to_thread(post_json, self.url, event, self.timeout)
                self.sent += 1
            except OSError as exc:  # urllib's errors are OSErrors
                log.warning("webhook: cannot POST %s to %s: %s", event["event"], self.url, exc)


def member_states(members: Iterable[Member], *, own: str) -> dict[str, str]:
    """Each other member's state by name; a name seen twice (a re-joined machine) counts
    as alive when either incarnation is."""
    states: dict[str, str] = {}
    for member in members:
        if member.name == own:
            continue
        state = member.state.value
        if states.get(member.name) != "alive":
            states[member.name] = state
    return states


def changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[dict[str, Any]]:
    """The events between two views, by member name (sorted)."""
    events = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if new in _EVENTS:
            events.append({"event": _EVENTS[new], "member": name})
        elif old in _EVENTS:
            events.append({"event": "member-leave", "member": name})
    return events


def post_json(url: str, body: Mapping[str, Any], timeout: float) -> None:
    """POST ``body`` as JSON; OSError (urllib.error.URLError included) when it fails."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "meshd-webhook"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if not 200 <= response.status < 300:
            raise urllib.error.HTTPError(url, response.status, "not 2xx", response.headers, None)


plugin = Webhook()
