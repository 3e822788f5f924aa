"""Connections to untrusted backends check the address they actually connect to.

A registry entry's backend host is checked when the entry arrives, but DNS can answer
differently a second later (DNS rebinding): a name that resolved to a public address at the
check may resolve to 127.0.0.1 or a cloud metadata address when the connection is made. So
the connections of registry backends resolve the host themselves, refuse the whole host if
any address is forbidden, and connect to the address they checked. TLS still verifies the
host name: httpcore passes it separately from the address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

import httpcore
import httpx

AddressCheck = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], str | None]
"""Why a backend may not be at an address, or None when it may."""


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, but TCP connects go only to addresses ``check`` allows."""

    def __init__(self, check: AddressCheck) -> None:
        self._check = check
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve ``host``, refuse it if any address is forbidden, connect to the first."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            why = self._check(ipaddress.ip_address(address.split("%", 1)[0]))
            if why is not None:
                raise httpcore.ConnectError(f"{host} resolves to {why}; refused")
        return await self._inner.connect_tcp(
            addresses[0], port, timeout, local_address, socket_options
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        """Never: a backend is a network address."""
        raise httpcore.ConnectError("unix sockets are not allowed for untrusted backends")

    async def sleep(self, seconds: float) -> None:
        """As the inner backend sleeps."""
        await self._inner.sleep(seconds)


def guarded_transport(check: AddressCheck, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections pass ``check`` at connect time."""
    transport = httpx.AsyncHTTPTransport(limits=limits)
    # httpx offers no public way to choose httpcore's network backend; the pool it builds is
    # rebuilt here with the same limits and a guarded backend.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=GuardedNetworkBackend(check),
    )
    return transport
