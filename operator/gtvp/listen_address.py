"""Where a listener binds: an address as given, or every address the pod has.

`--webhook-address`, `--metrics-address` and `--key-release-address` take an IPv4 or IPv6
address, a host name, or `*`: every address, IPv6 and IPv4 on one socket where the host
has IPv6, IPv4 alone where it has none (as Go's `net.Listen(":port")`); `::` is every
address too, IPv4 included where the host allows it. The chart listened on `0.0.0.0`,
which takes no IPv6 connection: in a cluster whose pods and Services are IPv6 the API
server reached no webhook (every gated VM start refused, fail closed) and no guest reached
key release, while the pod stayed Ready. An IPv6 address or a name that resolves only to
one could not be given at all (the servers were IPv4 sockets).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

ALL = "*"


@dataclass(frozen=True)
class Bind:
    host: str
    family: socket.AddressFamily
    dualstack: bool  # an IPv6 socket that takes IPv4 connections too


def bind_for(address: str | None) -> Bind:
    """How to listen on `address` (None, "" or `*`: every address)."""
    if not address or address == ALL:
        if socket.has_dualstack_ipv6():
            return Bind("::", socket.AF_INET6, True)
        return Bind("0.0.0.0", socket.AF_INET, False)  # noqa: S104 - asked for every address
    try:
        ip = ipaddress.ip_address(address.removeprefix("[").removesuffix("]"))
    except ValueError:  # a name: its IPv4 address if it has one (`localhost` binds
        # 127.0.0.1, as before: a pod's /etc/hosts lists ::1 for it first), else its first
        found = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
        family, *_, sockaddr = min(found, key=lambda a: a[0] != socket.AF_INET)
        return Bind(str(sockaddr[0]), family, False)
    if ip.version == 6:
        return Bind(str(ip), socket.AF_INET6, ip.is_unspecified and socket.has_dualstack_ipv6())
    return Bind(str(ip), socket.AF_INET, False)


def listening_socket(address: str | None, port: int) -> socket.socket:
    """A listening socket on `address`:`port` (`bind_for`), SO_REUSEPORT set."""
    b = bind_for(address)
    return socket.create_server(
        (b.host, port), family=b.family, dualstack_ipv6=b.dualstack, reuse_port=True
    )


def unbound_socket(address: str | None) -> tuple[socket.socket, tuple[str, int]]:
    """A stream socket of `address`'s family (`bind_for`), not bound yet, and the host to
    bind it to (with port 0: the caller's server puts its own)."""
    b = bind_for(address)
    sock = socket.socket(b.family, socket.SOCK_STREAM)
    try:
        if b.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if b.dualstack else 1)
    except OSError:
        sock.close()
        raise
    return sock, (b.host, 0)
