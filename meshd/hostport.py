"""``host:port`` text, written and read in one place.

An IPv6 address stands in brackets (``[2001:db8::1]:51820``), anything else bare
(``192.0.2.1:51820``, ``seed.example:7947``). Parsing is strict: the port is
1-65535 in ASCII digits; the host is a bracketed IPv6 address or a name made of
letters, digits, dots and inner dashes (an IPv4 address is one), so an IPv6
address without brackets, a space or a newline never gets through.

Bad text raises :class:`meshd.errors.DecodeError`, whose message starts with the
text's ``repr``; the caller converts it into its own error and names the value:
``raise IdentityError(f"endpoint {exc}") from exc`` reads
``endpoint 'x:0' has a port out of range (1-65535)``.

    format_host_port(host: str | IPAddress, port: int) -> str
    parse_host_port(text: str) -> tuple[str, int]        # host without brackets
    parse_ip_port(text: str) -> tuple[IPAddress, int]    # the host must be an IP address
"""

from __future__ import annotations

import ipaddress
import re

from meshd.errors import DecodeError
from meshd.types import IPAddress

_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def format_host_port(host: str | IPAddress, port: int) -> str:
    """``host:port``, or ``[host]:port`` when ``host`` is an IPv6 address."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def parse_host_port(text: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` or ``[ipv6]:port``; DecodeError if malformed.

    An IPv6 host comes back without brackets and in its compressed form.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit():
        raise DecodeError(f"{text!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 < port < 65536:
        raise DecodeError(f"{text!r} has a port out of range (1-65535)")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), port
        except ValueError as exc:
            raise DecodeError(f"{text!r} has a bad IPv6 address") from exc
    if not _HOST_RE.fullmatch(host):
        raise DecodeError(f"{text!r} has a bad host name")
    return host, port


def parse_ip_port(text: str) -> tuple[IPAddress, int]:
    """(address, port) of ``ip:port`` or ``[ipv6]:port``; DecodeError for a name or junk."""
    host, port = parse_host_port(text)
    try:
        return ipaddress.ip_address(host), port
    except ValueError as exc:
        raise DecodeError(f"{text!r}: {host!r} is not an IP address") from exc
