"""Standard NAT-traversal plugin: endpoint discovery, hole punching and relays.

Being written (issue 11); see docs/nat.md once it lands.
"""
