"""The one exception tree of meshd.

    MeshdError                 anything meshd reports to a user
     ├── ConfigError            bad config file, key or value (names file, key, reason)
     ├── InputError             a bad value given on the command line (names the option)
     ├── StateError             the state directory or a state file is unusable
     ├── IdentityError          a malformed key, certificate or signature
     │    └── TokenError        a join token that is tampered, expired, foreign or garbage
     ├── PluginError            a plugin failed to load or to configure itself
     ├── SupervisorError        a child process (serf, wireguard-go) cannot be started
     ├── GossipError            the Serf layer
     │    ├── SerfConnectionError  the RPC connection cannot be made or was lost
     │    ├── SerfAuthError        the agent refused our RPC auth key
     │    ├── SerfCommandError     the agent answered a command with an error
     │    └── RecordError          a node record that cannot be encoded or decoded
     ├── WireGuardError         configuring a WireGuard interface failed
     ├── NetlinkError           addresses, links or routes could not be changed
     ├── FirewallError          meshd's nftables table could not be installed or removed
     ├── LabError               the network-namespace lab
     └── EnrolError             enrolment with a seed failed (unreachable, timed out)
          └── EnrolRefused      the seed refused the request; ``reason`` says why

Outside errors (OSError, pyroute2's NetlinkError, msgpack's errors) are converted
at the adapter that calls them, ``raise WireGuardError("...") from exc``; only
``meshd.cli.main`` turns a MeshdError into a message and an exit code.

Outside the tree, on purpose:

    ValueError
     └── DecodeError            bytes or text a shared codec cannot read (meshd.binary,
                                meshd.hostport, meshd.b64); the caller knows what the
                                value was and converts it, so it never reaches a user
"""

from __future__ import annotations


class MeshdError(Exception):
    """Base of every error meshd reports; ``str()`` is one line for a user."""

    exit_code = 1


class DecodeError(ValueError):
    """A shared codec could not read its input; ``str()`` says what and why."""


class ConfigError(MeshdError):
    exit_code = 78  # EX_CONFIG

    def __init__(self, reason: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {reason}" if where else reason)


class InputError(MeshdError):
    """A bad value given by the user; ``option`` names where it came from (e.g. ``--cidr``)."""

    exit_code = 2  # what click uses for usage errors

    def __init__(self, reason: str, *, option: str | None = None) -> None:
        self.option = option
        super().__init__(f"{option}: {reason}" if option else reason)


class StateError(MeshdError):
    pass


class IdentityError(MeshdError):
    pass


class TokenError(IdentityError):
    pass


class PluginError(MeshdError):
    pass


class SupervisorError(MeshdError):
    pass


class GossipError(MeshdError):
    pass


class SerfConnectionError(GossipError):
    pass


class SerfAuthError(GossipError):
    pass


class SerfCommandError(GossipError):
    pass


class RecordError(GossipError):
    pass


class WireGuardError(MeshdError):
    pass


class FirewallError(MeshdError):
    pass


class NetlinkError(MeshdError):
    pass


class LabError(MeshdError):
    pass


class EnrolError(MeshdError):
    pass


class EnrolRefused(EnrolError):
    """``taken``: the mesh address the seed found held by another member, if that was why."""

    def __init__(self, reason: str, *, seed: str | None = None, taken: str | None = None) -> None:
        self.reason = reason
        self.seed = seed
        self.taken = taken
        super().__init__(f"seed {seed} refused enrolment: {reason}" if seed else reason)
