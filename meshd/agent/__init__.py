"""The engine of one node; :class:`Agent` is what ``meshd agent`` runs."""

from meshd.agent.daemon import Agent

__all__ = ["Agent"]
