"""Who the client is: the peer address, or what trusted proxies say in X-Forwarded-For.

Pure. X-Forwarded-For is a list any client can start; only the hops appended by proxies we
trust mean anything, so it is read right to left and the first address that is not a trusted
proxy is the client. From an untrusted peer the header is ignored entirely.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache
from typing import Final

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAX_HOPS: Final = 32  # a longer chain is an attack on our CPU, not a real proxy path


class TrustedProxies:
    """A set of networks whose X-Forwarded-For entries are believed."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cidrs
        )
        # Peers repeat (a few proxies, many requests): remember each verdict.
        self.trusts = lru_cache(maxsize=1024)(self._trusts)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def _trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def client_ip(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client address for a request from `peer` carrying `forwarded_for`.

        Returns:
            The rightmost address not belonging to a trusted proxy; the peer itself when it
            is not trusted or nothing was forwarded; "" when the peer is unknown (a Unix
            socket).
        """
        client = peer or ""
        if not forwarded_for or not self._networks or not self.trusts(client):
            return client
        hops = [h.strip() for h in forwarded_for.split(",")[-_MAX_HOPS:]]
        for hop in reversed(hops):
            if not _is_address(hop):
                # Garbage from further left cannot be attributed; the last good hop is the
                # best we know.
                return client
            client = hop
            if not self.trusts(hop):
                return hop
        return client


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
