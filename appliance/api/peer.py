"""Who is on the other end of a connection, and which names this host answers to.

Loopback is the operator's own machine: without an admin key it is the only place the admin
API answers, and without user keys the only place ``/v1`` answers (unless opened). The peer is
the TCP peer (uvicorn rewrites it from ``X-Forwarded-For`` only for a proxy on 127.0.0.1).
"""

from __future__ import annotations

import ipaddress
import socket

from starlette.types import Scope

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def peer_address(scope: Scope) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's IP address, or None when it is not an IP (a Unix socket, a test client)."""
    client = scope.get("client")
    if not client:
        return None
    try:
        address = ipaddress.ip_address(str(client[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(scope: Scope) -> bool:
    """Whether the request comes from this machine's loopback interface."""
    address = peer_address(scope)
    return address is not None and address.is_loopback


def local_host_names(bind_host: str) -> frozenset[str]:
    """The names and addresses this box answers to: what a Host header may say by default.

    Loopback names, the host name and its fully qualified name, the address served on and,
    when that is a wildcard, every address of every interface (read through psutil, which
    vLLM already depends on).
    """
    names = set(LOOPBACK_NAMES) | {"127.0.0.1", "::1"}
    hostname = socket.gethostname()
    names.update({hostname, socket.getfqdn()})
    if bind_host not in ("", "0.0.0.0", "::"):
        names.add(bind_host)
    else:
        names.update(_interface_addresses())
    return frozenset(name.lower() for name in names if name)


def _interface_addresses() -> set[str]:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with vLLM
        return set()
    found: set[str] = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                found.add(address.address.split("%", 1)[0])
    return found
