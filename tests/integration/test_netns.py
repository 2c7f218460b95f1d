"""meshd.netns: a call made inside a lab namespace, the caller's thread left where it was."""

from __future__ import annotations

import os
import socket

import pytest

from meshd.lab import Lab
from meshd.netns import NETNS_DIR, call_in_netns

pytestmark = pytest.mark.root()


def namespace_inode() -> int:
    # "net:[4026531840]": the inode of the calling thread's network namespace
    return int(os.readlink("/proc/thread-self/ns/net").split("[")[1].rstrip("]"))


def test_a_socket_made_inside_a_namespace_lives_there(lab_factory):
    lab: Lab = lab_factory(nodes=1)
    node = lab.nodes[0]
    before = namespace_inode()

    inside = call_in_netns(node.netns, namespace_inode)
    assert inside == os.stat(os.path.join(NETNS_DIR, node.netns)).st_ino
    assert inside != before
    assert namespace_inode() == before  # the caller's thread never moved

    # The node's address exists only in its namespace: binding to it proves where the socket is.
    sock = call_in_netns(node.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with sock:
        sock.bind((node.address, 0))
    refused = "Cannot assign requested address"
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as here,
        pytest.raises(OSError, match=refused),
    ):
        here.bind((node.address, 0))


def test_errors_of_the_call_and_of_a_missing_namespace_reach_the_caller(lab_factory):
    lab: Lab = lab_factory(nodes=1)

    def refuse() -> None:
        raise LookupError("made inside")

    with pytest.raises(LookupError, match="made inside"):
        call_in_netns(lab.nodes[0].netns, refuse)
    with pytest.raises(FileNotFoundError):
        call_in_netns(f"{lab.nodes[0].netns}-absent", refuse)
