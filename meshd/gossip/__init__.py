"""The gossip layer: Serf, wrapped. Knows nothing of WireGuard.

- :mod:`meshd.gossip.rpc`: ``SerfClient`` (implements the ``SerfRPC`` protocol), the
  event values (``MemberEvent``, ``UserEvent``, ``QueryEvent``, ``StreamGap``).
- :mod:`meshd.gossip.supervisor`: ``SerfSettings`` and ``SerfAgent``, the supervised
  ``serf agent`` child with its generated config.
- :mod:`meshd.gossip.record`: ``encode_record`` / ``decode_record``, NodeRecord <-> tags.
- :mod:`meshd.gossip.view`: ``MembershipView`` with its change feed, ``publish_record``.
"""
