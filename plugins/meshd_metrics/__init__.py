"""Prometheus metrics and a picture of the mesh, served by the agent (opt-in).

With a ``[plugins.metrics]`` table (see :mod:`meshd_metrics.settings`) the agent
serves, on loopback (or its mesh address), ``/metrics`` in Prometheus' text
format, ``/`` a page drawing the mesh (every member a node, every pair an edge
coloured by path: direct, LAN, relayed, down) and ``/mesh.json``, the data the
page draws. Or it writes the metrics to a file for node_exporter's textfile
collector, atomically, every ``interval`` seconds.

Everything is read from the agent when asked (:mod:`meshd_metrics.collector`):
nothing is counted on events, so a scrape costs the agent nothing between scrapes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from meshd import AgentAPI, ConfigError, ConfigView, MeshdError, atomic_write, hookimpl
from meshd_metrics.settings import MESH, Settings, check_addresses, parse_settings

# Every CLI command loads the plugins: prometheus_client (about 50 ms) is imported
# only by an agent that serves or writes metrics.

log = logging.getLogger(__name__)

NAME = "metrics"


class MetricsPlugin:
    def __init__(self) -> None:
        self.settings = Settings()
        self.config_path: str | None = None

    @hookimpl
    def meshd_configure(self, config: ConfigView) -> None:
        section: Mapping[str, Any] | None = config.sections.get(NAME)
        self.config_path = config.path
        self.settings = Settings() if section is None else parse_settings(section, config.path)

    @hookimpl
    def meshd_startup(self, agent: AgentAPI) -> None:
        settings = self.settings
        if not settings.enabled:
            return
        try:
            check_addresses(settings.listen, agent.mesh_addresses)
        except ValueError as exc:
            raise ConfigError(
                str(exc), file=self.config_path, key="plugins.metrics.listen"
            ) from None
        if settings.listen:
            agent.spawn(self._serve(agent, settings), name="metrics-server")
        if settings.textfile is not None:
            agent.spawn(self._write_textfile(agent, settings), name="metrics-textfile")

    async def _serve(self, agent: AgentAPI, settings: Settings) -> None:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        from meshd_metrics.collector import exposition, gather
        from meshd_metrics.server import Answer, Route, WebServer
        from meshd_metrics.topology import mesh_json, page

        async def metrics() -> Answer:
            return Answer(exposition(await gather(agent)), CONTENT_TYPE_LATEST)

        async def view() -> Answer:
            body = json.dumps(mesh_json(await gather(agent)), indent=1).encode()
            return Answer(body, "application/json")

        async def picture() -> Answer:
            return Answer(page(mesh_json(await gather(agent))), "text/html; charset=utf-8")

        everything = {
            "/metrics": Route(metrics),
            "/": Route(picture),
            "/mesh.json": Route(view, cross_origin=True),
        }
        on_mesh = everything if settings.mesh_page else {"/metrics": everything["/metrics"]}
        # Closed when the agent cancels this task at shutdown.
        loopback, mesh = WebServer(everything), WebServer(on_mesh)
        bound = []
        try:
            for listener in settings.listen:
                server = loopback if listener.loopback else mesh
                hosts = (
                    [str(a) for a in agent.mesh_addresses]
                    if listener.host == MESH
                    else [listener.host]
                )
                for host in hosts:
                    try:
                        await server.start(host, listener.port)
                    except OSError as exc:
                        raise MeshdError(
                            f"metrics: cannot listen on {host} port {listener.port}: "
                            f"{exc.strerror or exc}"
                        ) from None
                    bound.append(f"{host}:{listener.port}")
            log.info("metrics and the mesh page served on %s", ", ".join(bound))
            await asyncio.Event().wait()  # until the agent cancels its tasks
        finally:
            loopback.close()
            mesh.close()

    async def _write_textfile(self, agent: AgentAPI, settings: Settings) -> None:
        from meshd_metrics.collector import exposition, gather

        assert settings.textfile is not None
        warned = False
        while True:
            try:
                atomic_write(settings.textfile, exposition(await gather(agent)))
                warned = False
            except MeshdError as exc:
                # Once at WARNING, then DEBUG until it works again.
                log.log(logging.DEBUG if warned else logging.WARNING, "metrics: %s", exc)
                warned = True
            await asyncio.sleep(settings.interval)


plugin = MetricsPlugin()
