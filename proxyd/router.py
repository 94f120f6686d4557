"""Decide where a request goes: the origin (scheme, host, port) and the upstream target.

A forward proxy receives absolute-form targets (RFC 9112 §3.2.2) and, for CONNECT,
authority-form (§3.2.3). proxyd upgrades ``http://`` to TLS on the wire unless the origin is
configured ``tls = false``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

from .config import Config, OriginConfig
from .errors import ParseError, ProxyError

# RFC 3986 §3.2.2 reg-name (unreserved / pct-encoded / sub-delims), kept to DNS-ish names.
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=]+")
_DNS_NAME = re.compile(r"[A-Za-z0-9\-._]+")  # what a resolver is given (underscore: seen in use)
# absolute-form: scheme "://" authority path-abempty [ "?" query ] (RFC 3986 §3)
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)", re.S)
# The usual target in one match: http(s), an authority, a path without a fragment.
_HTTP_TARGET = re.compile(rb"(?i:https?)://([^/?#]*)(/[^#]*)")
_CACHE_SIZE = 1024
# RFC 9110 §7.2: Host = uri-host [ ":" port ] (RFC 3986 §3.2.2-3.2.3): an IP literal, or a
# reg-name (which includes IPv4 addresses and the empty name), then an optional port.
_HOST_FIELD = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|\[[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\]"
    rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?")


class OriginKey(NamedTuple):
    """Identity of a pool: connections are only shared between equal keys.

    A tuple, so that the per-request pool lookup hashes and compares in C.
    """

    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Route(NamedTuple):
    """Where one request goes (a tuple: made once per request, so it must be cheap)."""

    origin: OriginKey
    target: bytes         # origin-form (or "*") to send upstream
    host_header: bytes    # Host field value from the URI authority (RFC 9112 §3.2.2)
    settings: OriginConfig | None  # configured origin, or None for a learned one


_USERINFO = re.compile(rb"^((?:[A-Za-z][A-Za-z0-9+.\-]*://)?)[^/?#]*@")


def redact_userinfo(target: bytes) -> bytes:
    """``target`` with any userinfo (``user:password@``) of its authority replaced by ``***``:
    a request refused for carrying one is still logged, and passwords never are."""
    if b"@" not in target or target[:1] == b"/":
        return target  # origin-form: an "@" in a path is data, not userinfo
    return _USERINFO.sub(rb"\1***@", target, count=1)


def split_authority(authority: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` into a validated, lower-cased host and an optional port."""
    if "@" in authority:
        # RFC 9110 §4.2.4: userinfo in http(s) URIs is deprecated and a phishing vector.
        raise ParseError("userinfo is not allowed in the request target")
    port: int | None = None
    if authority.startswith("["):
        end = authority.find("]")
        if end == -1:
            raise ParseError("invalid IPv6 literal in authority")
        host, rest = authority[1:end], authority[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ParseError("invalid IPv6 literal in authority") from None
    else:
        host, colon, rest = authority.partition(":")
        rest = colon + rest
        if not host or _REG_NAME.fullmatch(host) is None:
            raise ParseError("invalid host in authority")
        if _DNS_NAME.fullmatch(host) is None:
            # RFC 3986 §3.2.2 lets a reg-name hold percent-encoding and sub-delims, which no
            # resolver takes: a 400 that says so (as nginx and HAProxy answer), not a 502 that
            # blames DNS for the client's spelling.
            raise ParseError("host name must be letters, digits, '-', '_' and '.' "
                             "(percent-encoded and other characters are not resolved)")
    if rest and rest != ":":  # RFC 3986 §3.2.3, §6.2.3: an empty port is the default one
        digits = rest[1:]
        if (not rest.startswith(":") or not digits.isascii() or not digits.isdigit()
                or not 0 < int(digits) < 65536):
            raise ParseError("invalid port in authority")
        port = int(digits)
    return host.lower(), port


def valid_host_field(value: bytes) -> bool:
    """True when ``value`` has the syntax of a Host field value (RFC 9110 §7.2); RFC 9112
    §3.2: a request with an invalid one gets 400, even though a proxy replaces it."""
    return _HOST_FIELD.fullmatch(value) is not None


def _absolute_parts(method: bytes, target: bytes) -> tuple[bytes, bytes]:
    """Authority and origin-form target of any absolute-form target, or a clear error."""
    m = _ABSOLUTE.match(target)
    if m is None or m.group(1).lower() not in (b"http", b"https"):
        raise ParseError("request target must be an absolute http:// URI")
    _, authority, path = m.groups()
    if b"#" in path:
        raise ParseError("fragment in request target")
    if not path:
        path = b"*" if method == b"OPTIONS" else b"/"  # RFC 9112 §3.2.4
    elif path[:1] == b"?":
        path = b"/" + path
    return authority, path


class Router:
    """Maps request targets to origins, using the configured origins first."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._origins: dict[tuple[str, int], OriginConfig] = {
            (o.host.lower(), o.port): o for o in cfg.origin
        }
        self._default: tuple[str, int | None] | None = None
        # authority -> (origin, settings, Host value): a client talks to few origins, so the
        # parsing and lookups of an authority are done once (bounded; cleared when full).
        self._cache: dict[bytes, tuple[OriginKey, OriginConfig | None, bytes]] = {}
        if cfg.default_origin:
            self._default = split_authority(cfg.default_origin)

    @property
    def has_default(self) -> bool:
        """True when origin-form requests go to a configured ``default_origin``."""
        return self._default is not None

    def route(self, method: bytes, target: bytes) -> Route:
        """Route a non-CONNECT request; raises :class:`ProxyError` with a clear reason."""
        if target[:1] == b"/" or target == b"*":
            return self._route_origin_form(method, target)
        m = _HTTP_TARGET.fullmatch(target)
        if m is not None:
            authority, path = m.groups()
        else:
            authority, path = _absolute_parts(method, target)
        cached = self._cache.get(authority)
        if cached is None:
            cached = self._resolve(authority)
        return Route(cached[0], path, cached[2], cached[1])

    def _resolve(self, authority: bytes) -> tuple[OriginKey, OriginConfig | None, bytes]:
        try:
            host, port = split_authority(authority.decode("ascii"))
        except UnicodeDecodeError:
            raise ParseError("non-ASCII host in request target") from None
        route = self._make_route(host, port, b"", authority)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        # RFC 3986 §6.2.3: "host:" is "host" (an empty port is the default one)
        host_field = authority[:-1] if authority.endswith(b":") else authority
        entry = self._cache[authority] = (route.origin, route.settings, host_field)
        return entry

    def _route_origin_form(self, method: bytes, target: bytes) -> Route:
        if self._default is None:
            raise ProxyError(
                "proxyd is a forward proxy: send absolute-form requests "
                "(GET http://host/path) by setting HTTP_PROXY, or configure default_origin",
                status=400, error_type="http_request_error")
        if target == b"*" and method != b"OPTIONS":
            raise ParseError("the asterisk-form target is only for OPTIONS (RFC 9112 §3.2.4)")
        host, port = self._default
        authority = host if port is None else f"{host}:{port}"
        return self._make_route(host, port, target, authority.encode())

    def _make_route(self, host: str, port: int | None, path: bytes, authority: bytes) -> Route:
        settings: OriginConfig | None
        if port is None:
            # No explicit port: a configured TLS origin on 443 or a plain one on 80, else
            # the default upgrade to https on 443.
            settings = self._origins.get((host, 443)) or self._origins.get((host, 80))
            port = settings.port if settings else 443
        else:
            settings = self._origins.get((host, port))
        tls = settings.tls if settings else True
        return Route(OriginKey(host, port, tls), path, authority, settings)

    def route_connect(self, target: bytes) -> tuple[str, int]:
        """Validate a CONNECT authority-form target (RFC 9112 §3.2.3)."""
        try:
            host, port = split_authority(target.decode("ascii"))
        except UnicodeDecodeError:
            raise ParseError("invalid CONNECT target") from None
        if port is None:
            raise ParseError("CONNECT target needs host:port")
        if port not in self.cfg.connect_ports:
            raise ProxyError(f"CONNECT to port {port} is not allowed (connect_ports)",
                             status=403, error_type="destination_ip_prohibited")
        return host, port

