"""Who owns a TCP socket: read from ``/proc`` (Linux).

The agent hands Serf's RPC auth key only to the Serf it spawned: before it
authenticates, it checks that the process listening on the RPC port is that
child (an unprivileged user may have bound the port first, waiting for the key).
"""

from __future__ import annotations

import ipaddress
import os
import sys

_LISTEN = "0A"


def _hex_endpoint(host: str, port: int) -> str:
    address = ipaddress.ip_address(host)
    packed = address.packed
    # /proc/net/tcp prints each 32-bit word of the address in host byte order.
    text = "".join(
        int.from_bytes(packed[i : i + 4], "big").to_bytes(4, sys.byteorder).hex()
        for i in range(0, len(packed), 4)
    )
    return f"{text.upper()}:{port:04X}"


def listener_inode(pid: int, host: str, port: int) -> int | None:
    """The inode of the TCP socket listening on ``host:port`` in ``pid``'s network namespace."""
    wanted = _hex_endpoint(host, port)
    table = "tcp6" if ipaddress.ip_address(host).version == 6 else "tcp"
    try:
        with open(f"/proc/{pid}/net/{table}", encoding="ascii") as lines:
            next(lines, None)  # the header
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[1] == wanted and fields[3] == _LISTEN:
                    return int(fields[9])
    except OSError:
        return None
    return None


def owns_socket(pid: int, inode: int) -> bool:
    """Whether process ``pid`` holds the socket ``inode`` among its open files."""
    target = f"socket:[{inode}]"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == target:
                return True
        except OSError:
            continue
    return False


def listens(pid: int, host: str, port: int) -> bool:
    """Whether ``host:port`` is listened on by process ``pid`` itself."""
    inode = listener_inode(pid, host, port)
    return inode is not None and owns_socket(pid, inode)


_UDP_UNCONNECTED = "07"


def port_inodes(protocol: str, port: int) -> list[int]:
    """Inodes of the sockets bound to local ``port`` in this process's network namespace:
    TCP listeners, or UDP sockets not connected to one peer (``protocol`` "tcp" or "udp")."""
    wanted_state = _LISTEN if protocol == "tcp" else _UDP_UNCONNECTED
    suffix = f":{port:04X}"
    found = []
    for table in (protocol, f"{protocol}6"):
        try:
            with open(f"/proc/self/net/{table}", encoding="ascii") as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    if len(fields) > 9 and fields[1].endswith(suffix) and fields[3] == wanted_state:
                        found.append(int(fields[9]))
        except OSError:
            continue
    return found


def socket_owners(inode: int) -> list[tuple[int, str]]:
    """``(pid, command name)`` of every process holding socket ``inode`` (none for a
    kernel socket, such as the kernel WireGuard's)."""
    owners = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and owns_socket(int(entry), inode):
            try:
                with open(f"/proc/{entry}/comm", encoding="utf-8", errors="replace") as comm:
                    owners.append((int(entry), comm.read().strip()))
            except OSError:
                continue
    return owners
