"""The gossip layer: Serf, wrapped. Knows nothing of WireGuard.

- :mod:`meshd.gossip.rpc`: ``SerfClient`` (implements the ``SerfRPC`` protocol), the
  event values (``MemberEvent``, ``UserEvent``, ``QueryEvent``, ``StreamGap``).
- :mod:`meshd.gossip.supervisor`: ``SerfSettings`` and ``SerfAgent``, the supervised
  ``serf agent`` child with its generated config.
- :mod:`meshd.gossip.record`: ``encode_record`` / ``decode_record``, NodeRecord <-> tags.
- :mod:`meshd.gossip.view`: ``MembershipView`` with its change feed, ``publish_record``.
- :mod:`meshd.gossip.names`: ``serf_node_name`` / ``display_name``, a node's name <-> its
  Serf member name (name plus a key suffix, so a wiped machine re-joins under its name).
"""
