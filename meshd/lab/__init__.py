"""The network-namespace lab: a whole mesh on one machine (demo, tests, benchmarks).

    from meshd.lab import Lab
    with Lab.create(nodes=4, topology="flat") as lab:
        lab.run("n1", ["ping", "-c", "1", lab.node("n2").address])

See :mod:`meshd.lab.lab` for the API, :mod:`meshd.lab.plan` for names and
addresses, and ``meshd lab --help`` for the command line.
"""

from meshd.lab.lab import Lab
from meshd.lab.plan import LabNode, LabPlan, LabRouter

__all__ = ["Lab", "LabNode", "LabPlan", "LabRouter"]
