"""Who a client is, from the address a request came from: the key its quota is kept under.

A wire helper, like ``sandrun.wire``: it imports only the standard library,
nothing from the rest of Sandrun, so the worker (``sandrun.api.app``) and the
coordinator (``coordinator.proxy``) answer alike.

- ``client_key``: IPv4 as is, IPv6 by its /64, IPv4-mapped IPv6 as the IPv4.
- ``trusted_client_address``: X-Forwarded-For is believed only from a trusted
  proxy (``--trusted-proxy``), and then its right-most hop that is not one.
- ``address_in``: whether that address is in a list of networks (``--quota-exempt``).
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

IPV6_CLIENT_PREFIX = 64

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")
_PORT = re.compile(r"[0-9]{1,5}")


def _parse_ip(text: str) -> _Address | None:
    """An address, IPv4-mapped IPv6 turned into its IPv4; None when *text* is not one."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@lru_cache(maxsize=4096)  # asked several times per request: the same few addresses
def client_key(address: str) -> str:
    """The key a client's quota is kept under.

    IPv4 as is; IPv6 reduced to its /64 (one subscriber usually gets a whole /64, so keying
    on the full address would let it mint fresh quotas at will); IPv4-mapped IPv6 as the
    IPv4. Something that is not an IP address (a Unix-socket peer) is its own key.
    """
    addr = _parse_ip(address)
    if addr is None:
        return address.strip()
    if isinstance(addr, ipaddress.IPv4Address):
        return str(addr)
    # int() drops any zone id ("fe80::1%eth0"), which IPv6Network would refuse.
    return str(ipaddress.IPv6Network((int(addr), IPV6_CLIENT_PREFIX), strict=False))


@lru_cache(maxsize=32)
def parse_trusted_proxies(entries: tuple[str, ...]) -> tuple[_Network, ...]:
    """Addresses or CIDR networks of trusted reverse proxies.

    Raises ``ValueError`` on an entry that is neither, so call it once at start-up to reject a
    bad configuration before the first request. IPv4-mapped IPv6 networks become IPv4 ones,
    since addresses are compared in that form.
    """
    networks: list[_Network] = []
    for entry in entries:
        network = ipaddress.ip_network(entry.strip(), strict=False)
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_V4):
            network = ipaddress.IPv4Network(
                (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
            )
        networks.append(network)
    return tuple(networks)


def _is_trusted(addr: _Address, networks: tuple[_Network, ...]) -> bool:
    return any(addr.version == net.version and addr in net for net in networks)


def address_in(address: str, entries: tuple[str, ...]) -> bool:
    """Whether *address* (as ``trusted_client_address`` gives it) lies in one of *entries*,
    addresses or CIDR networks (``--quota-exempt``); a non-IP peer is in none."""
    if not entries:
        return False
    addr = _parse_ip(address)
    return addr is not None and _is_trusted(addr, parse_trusted_proxies(tuple(entries)))


def _parse_forwarded_hop(hop: str) -> _Address | None:
    """One X-Forwarded-For element: an address, optionally ``1.2.3.4:port``/``[v6]:port``."""
    if hop.startswith("["):
        end = hop.find("]")
        rest = hop[end + 1 :]
        if end == -1 or (rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:]))):
            return None
        hop = hop[1:end]
    elif hop.count(":") == 1:
        hop, _, port = hop.partition(":")
        if not _PORT.fullmatch(port):
            return None
    return _parse_ip(hop)


def trusted_client_address(
    peer: str, forwarded_for: str | None, trusted_proxies: tuple[str, ...]
) -> str:
    """The address to charge for a request that arrived from *peer*.

    Only when *peer* is a trusted proxy is *forwarded_for* (the X-Forwarded-For value, several
    headers joined with ",") read: the answer is its right-most address that is not itself a
    trusted proxy, since everything left of that was written by the client and may be forged.
    If every hop is a trusted proxy, the left-most is the origin they vouch for. A missing or
    empty header, or a garbled hop reached before any untrusted one, gives *peer*. From any
    other peer the header is ignored.
    """
    if not trusted_proxies or forwarded_for is None:
        return peer
    networks = parse_trusted_proxies(tuple(trusted_proxies))
    peer_addr = _parse_ip(peer)
    if peer_addr is None or not _is_trusted(peer_addr, networks):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",")]
    hops = [hop for hop in hops if hop]
    origin: _Address | None = None
    for hop in reversed(hops):
        origin = _parse_forwarded_hop(hop)
        if origin is None:
            return peer
        if not _is_trusted(origin, networks):
            return str(origin)
    return peer if origin is None else str(origin)

