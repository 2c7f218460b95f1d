"""``meshd join`` as the README's user runs it, on a machine without systemd: the
command forks into the agent (one Python start-up for the join and the agent), which
runs detached, answers ``status``, and ends with everything it started on ``leave``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.lab import netns
from meshd.lab.mesh import MeshLab
from tests.integration.conftest import eventually, mesh_lab

pytestmark = pytest.mark.root("serf", "wireguard-go", "wg", "ping")


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    with mesh_lab(nodes=3, up=["n1", "n2"]) as built:
        yield built


def processes(mesh: MeshLab, node: str) -> dict[int, str]:
    """pid -> command line of every process in the node's network namespace."""
    found: dict[int, str] = {}
    for pid in netns.netns_pids(mesh.lab.node(node).netns):
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # ended meanwhile
    return found


def test_join_forks_a_detached_agent_that_leave_ends(mesh: MeshLab) -> None:
    token = mesh.token_path("n3")
    shutil.copyfile(mesh.state_dir(mesh.first_node()) / "join-token", token)
    token.chmod(0o600)
    mesh.write_config("n3", "")
    seed = str(mesh.lab.node("n2").address)

    done = mesh.meshd("n3", "join", seed, "--token-file", str(token), check=False)

    assert done.returncode == 0, done.stderr
    assert "agent started in the background" in done.stdout
    assert not token.exists(), "a used token stays on disk"
    agents = {pid: cmd for pid, cmd in processes(mesh, "n3").items() if " join " in cmd}
    assert len(agents) == 1, f"expected the forked agent alone, found {agents}"
    (agent,) = agents
    assert os.getsid(agent) == agent, "the agent is not in a session of its own"
    assert os.readlink(f"/proc/{agent}/fd/0") == os.devnull
    mesh.wait_full_mesh(["n1", "n2", "n3"], timeout=30)
    assert "accepting enrolments" in (mesh.state_dir("n3") / "agent.log").read_text()

    left = mesh.meshd("n3", "leave", check=False)

    assert left.returncode == 0, left.stderr
    eventually(
        lambda: not processes(mesh, "n3"),
        10,
        "the agent, serf and wireguard-go of n3 end after leave",
        lambda: processes(mesh, "n3"),
    )
