"""Which destinations proxyd may connect to, judged on the *resolved* address.

Checking the address that DNS returned (not the name in the request) means a name that
resolves to a denied address is denied too: no bypass by a crafted or rebinding name. The
defaults deny link-local networks (cloud metadata endpoints live there) and proxyd's own
listener, which would be a request loop.
"""

from __future__ import annotations

import fnmatch
import ipaddress

from .errors import DestinationProhibited

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_THIS_HOST = ipaddress.ip_network("0.0.0.0/8")  # RFC 1122 §3.2.1.3: "this host"


def address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as judged by rules: zone id dropped, ``::ffff:a.b.c.d`` as IPv4."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return mapped or addr


def parse_networks(values: tuple[str, ...]) -> tuple[Network, ...]:
    """Networks from CIDR strings (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


class DestinationPolicy:
    """Allow/deny decisions for upstream and tunnel connections."""

    def __init__(self, deny: tuple[str, ...], allow: tuple[str, ...] = (),
                 own: frozenset[tuple[str, int]] = frozenset(),
                 deny_hosts: tuple[str, ...] = (), allow_hosts: tuple[str, ...] = ()) -> None:
        self.deny = parse_networks(deny)
        self.allow = parse_networks(allow)
        self.own = own
        self.deny_hosts = tuple(p.lower() for p in deny_hosts)
        self.allow_hosts = tuple(p.lower() for p in allow_hosts)

    def check_host(self, host: str) -> None:
        """Name rules (shell patterns such as ``*.internal``), judged before DNS."""
        name = host.lower().rstrip(".")
        if any(fnmatch.fnmatchcase(name, p) for p in self.deny_hosts):
            raise DestinationProhibited(f"destination {host} is denied by destinations.deny_hosts",
                                        error_type="http_request_denied")
        if self.allow_hosts and not any(fnmatch.fnmatchcase(name, p) for p in self.allow_hosts):
            raise DestinationProhibited(f"destination {host} is not in destinations.allow_hosts",
                                        error_type="http_request_denied")

    def check(self, host: str, ip: str, port: int) -> None:
        """Raise :class:`DestinationProhibited` unless ``ip:port`` may be reached."""
        addr = address(ip)  # ::ffff:169.254.169.254 is 169.254.169.254
        if addr.is_unspecified or addr in _THIS_HOST:
            # Linux connects 0.0.0.0 (and ::) to the local host, past every rule written
            # for 127.0.0.0/8 or for proxyd's own listener: never a destination.
            raise DestinationProhibited(
                f"destination {host} ({addr}) is an unspecified address (this host)")
        if (str(addr), port) in self.own:
            raise DestinationProhibited(
                f"{host}:{port} is this proxy's own listener (request loop)", status=508,
                error_type="proxy_loop_detected")
        if any(addr in net for net in self.deny):
            raise DestinationProhibited(f"destination {host} ({addr}) is in a denied network")
        if self.allow and not any(addr in net for net in self.allow):
            raise DestinationProhibited(f"destination {host} ({addr}) is not in an allowed network")
