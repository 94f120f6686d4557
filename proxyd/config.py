"""Configuration: embedded defaults < TOML file < command-line flags, as frozen dataclasses.

Every key is checked: an unknown key or a value of the wrong type is a :class:`ConfigError`
whose message names the dotted key and the file, so a typo never silently keeps a default.
"""

from __future__ import annotations

import codecs
import dataclasses
import ipaddress
import math
import os
import re
import ssl
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints


class ConfigError(Exception):
    """An invalid configuration; the message names the key and the file."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds allowed for each wait (every wait has one)."""

    client_head: float = 10.0       # first byte to end of a request head (slowloris)
    client_idle: float = 60.0       # keep-alive client between requests
    connect: float = 5.0            # TCP connect to an origin
    tls_handshake: float = 5.0      # TLS handshake with an origin
    response_head: float = 60.0     # request sent to response head received
    body_idle: float = 60.0         # no body progress in either direction
    pool_wait: float = 5.0          # queued for a pooled connection, then 503
    tunnel_idle: float = 300.0      # CONNECT tunnel without traffic
    shutdown: float = 30.0          # graceful stop: in-flight requests may finish


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on buffers and counts (RFC 9110 §2.3: a recipient may limit sizes)."""

    request_line: int = 8192
    head_size: int = 65536
    header_count: int = 100
    chunk_line: int = 4096
    trailer_size: int = 16384
    client_connections: int = 16384  # per worker; more wait in the accept backlog
    pool_waiters: int = 1024         # requests queued per origin per worker
    body_buffer: int = 262144        # bytes buffered per direction before pausing the sender


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Trust for upstream connections; verification is on unless switched off."""

    verify: bool = True
    ca_file: str = ""                # "" = the system store
    min_version: str = "1.2"


@dataclass(frozen=True, slots=True)
class DestinationsConfig:
    """Networks upstream and tunnel connections may reach, checked on resolved addresses."""

    # Link-local (cloud metadata: 169.254.169.254, fd00:ec2::254) is denied by default.
    deny_networks: tuple[str, ...] = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")
    allow_networks: tuple[str, ...] = ()   # empty: every address not denied
    deny_hosts: tuple[str, ...] = ()       # shell patterns, e.g. "*.internal"
    allow_hosts: tuple[str, ...] = ()      # non-empty: only names matching one


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """Who may use the proxy."""

    allow_clients: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # client networks
    users_file: str = ""          # set: Basic proxy authentication with these users
    realm: str = "proxyd"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Pool settings, the defaults for every origin (configured or learned)."""

    warm: int = 0
    max_connections: int = 128
    idle_ttl: float = 30.0           # keep below the origin's idle timeout
    lifetime: float = 3600.0
    max_requests: int = 1000
    learned_warm: int = 1            # warm floor for origins first seen at run time
    learned_ttl: float = 300.0       # keep a learned origin warm this long after last use
    learned_max: int = 100           # learned origins kept per worker (least recently used go)


@dataclass(frozen=True, slots=True)
class OriginConfig:
    """One configured origin; unset pool fields fall back to [pool]."""

    host: str
    port: int = 443
    tls: bool = True
    warm: int = 0
    max_connections: int = 128
    idle_ttl: float = 30.0
    lifetime: float = 3600.0
    max_requests: int = 1000
    sni: str = ""
    cert_file: str = ""              # client certificate (PEM) for origins that require one
    key_file: str = ""               # its private key; "" = in cert_file

    @property
    def server_hostname(self) -> str:
        """Name sent in SNI and checked against the certificate."""
        # RFC 6066 §3: HostName is sent without a trailing dot (a configured one is dropped).
        return (self.sni or self.host).rstrip(".") or self.host


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective configuration."""

    listen: str = "127.0.0.1:3128"
    metrics_listen: str = "127.0.0.1:9128"
    workers: int = 0                 # 0 = one per CPU
    log_level: str = "info"
    access_log: bool = True
    metrics: bool = True             # count per-origin metrics in workers (off: cheaper)
    metrics_max_origins: int = 50    # learned origins with their own label; more -> "other"
    via: str = "proxyd"              # received-by pseudonym in Via; also loop detection
    default_origin: str = ""         # host[:port] for origin-form requests
    connect_ports: tuple[int, ...] = (443,)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    tls: TlsConfig = field(default_factory=TlsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    destinations: DestinationsConfig = field(default_factory=DestinationsConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    origin: tuple[OriginConfig, ...] = ()
    source: str = "<defaults>"

    @property
    def worker_count(self) -> int:
        """Workers to start: the configured count, or one per CPU."""
        return self.workers or (os.cpu_count() or 1)


_SECTIONS: dict[str, type] = {
    "timeouts": Timeouts, "limits": Limits, "tls": TlsConfig, "pool": PoolConfig,
    "destinations": DestinationsConfig, "access": AccessConfig,
}
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# RFC 9110 §7.6.3: received-by = pseudonym [ ":" port ], pseudonym = token.
_VIA_RECEIVED_BY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?::[0-9]+)?")
# RFC 9110 §11.2: the realm is sent as a quoted-string (Proxy-Authenticate: Basic
# realm="..."). Printable ASCII and space without '"' and '\' is qdtext as it stands,
# needing no quoted-pair, and can end neither the string nor the field (the simplest safe
# subset).
_REALM = re.compile(r'[^"\\\x00-\x1f\x7f]*')
# destinations.*_hosts: shell patterns over host names (fnmatch: * ? [seq] [!seq]).
_HOST_PATTERN = re.compile(r"[A-Za-z0-9\-._:%*?\[\]!]+")  # %: an IPv6 zone
# RFC 1123 §2.1 host name label: letters, digits and hyphens, not at either end, 1 to 63
# octets; "_" is accepted as resolvers accept it (common in internal names).
_DNS_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_POOL_KEYS = ("warm", "max_connections", "idle_ttl", "lifetime", "max_requests")
# TOML v1.0.0, String: a basic string escapes '"', '\\' and every control character.
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _check_type(key: str, value: Any, typ: Any, source: str) -> Any:
    """Return ``value`` converted to ``typ`` or raise an error naming ``key``."""
    if type(value) is int and not _INT64_MIN <= value <= _INT64_MAX:
        # TOML v1.0.0 integers are 64-bit; tomllib returns any size (10**400 too).
        raise ConfigError(f"{source}: {key}: integer out of range (TOML integers are 64-bit)")
    if typ is float and type(value) is int:
        return float(value)
    if typ is float and type(value) is float and not math.isfinite(value):
        # Every float here is a duration. NaN compares false with everything (so a "<= 0"
        # check lets it through and the wait then fails at once); inf would switch off a
        # bound, and every wait has one. A huge finite value is accepted.
        raise ConfigError(f"{source}: {key}: expected a finite number, got {value!r}")
    if typ in (int, float, str, bool):
        if type(value) is not typ:
            raise ConfigError(f"{source}: {key}: expected {typ.__name__}, "
                              f"got {type(value).__name__} {value!r}")
        return value
    if typ == tuple[str, ...]:
        if not isinstance(value, list) or not all(type(v) is str for v in value):
            raise ConfigError(f"{source}: {key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if typ == tuple[int, ...]:
        if not isinstance(value, list) or not all(type(v) is int for v in value):
            raise ConfigError(f"{source}: {key}: expected a list of integers, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{source}: {key}: unsupported value {value!r}")


def _build(cls: type, table: Any, prefix: str, source: str, base: Any = None) -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and bad types."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {prefix}: expected a table, got {table!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names or key == "source":
            raise ConfigError(f"{source}: unknown key {dotted!r}")
        values[key] = _check_type(dotted, value, hints[key], source)
    if base is not None:
        return dataclasses.replace(base, **values)
    try:
        return cls(**values)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{source}: {prefix}: {exc}") from None


def _origins(items: Any, pool: PoolConfig, source: str) -> tuple[OriginConfig, ...]:
    if not isinstance(items, list):
        raise ConfigError(f"{source}: origin: expected an array of tables ([[origin]])")
    out = []
    for i, table in enumerate(items):
        prefix = f"origin[{i}]"
        if not isinstance(table, dict) or "host" not in table:
            raise ConfigError(f"{source}: {prefix}.host: required")
        defaults = {k: table.get(k, getattr(pool, k)) for k in _POOL_KEYS}
        merged = {**table, **defaults}
        out.append(_build(OriginConfig, merged, prefix, source))
    return tuple(out)


def from_mapping(data: dict[str, Any], source: str) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML document."""
    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            sections[key] = _build(_SECTIONS[key], value, key, source)
        elif key != "origin":
            top[key] = value
    pool = sections.get("pool", PoolConfig())
    origins = _origins(data.get("origin", []), pool, source)
    cfg = _build(Config, top, "", source, base=Config(source=source))
    cfg = dataclasses.replace(cfg, origin=origins, **sections)
    validate(cfg)
    return cfg


def load(path: str | None) -> Config:
    """Load ``path`` (TOML) over the embedded defaults; None means defaults only."""
    if path is None:
        cfg = Config()
        validate(cfg)
        return cfg
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(_decode(raw, path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return from_mapping(data, path)


def _decode(raw: bytes, path: str) -> str:
    """The text of a TOML file: UTF-8 (TOML v1.0.0), after an optional byte order mark."""
    # Some editors start UTF-8 files with a BOM; TOML does not allow one, but it is harmless.
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        raise ConfigError(f"{path}: not valid UTF-8: byte 0x{raw[offset]:02x} at offset "
                          f"{offset} (line {line}); TOML files are UTF-8") from None


def parse_hostport(value: str, default_port: int, key: str, source: str,
                   allow_zero: bool = True) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 in brackets); errors name ``key``. Port 0 (any free port)
    is only for listeners: pass ``allow_zero=False`` for a destination."""
    host, port = value, default_port
    if "://" in value:
        raise ConfigError(f"{source}: {key}: expected HOST:PORT, not a URL: {value!r}")
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            raise ConfigError(f"{source}: {key}: unbalanced '[' in {value!r}")
        host, rest = value[1:end], value[end + 1:]
        if not _is_ip(host) or ":" not in host:
            raise ConfigError(f"{source}: {key}: not an IPv6 address in brackets: {value!r}")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{source}: {key}: expected HOST:PORT, got {value!r}")
            port = _port(rest[1:], key, source, allow_zero)
    elif value.count(":") == 1:
        host, port_s = value.split(":")
        port = _port(port_s, key, source, allow_zero)
    elif ":" in value:
        raise ConfigError(f"{source}: {key}: IPv6 addresses need brackets: {value!r}")
    if not host:
        raise ConfigError(f"{source}: {key}: missing host in {value!r}")
    return host, port


def _port(text: str, key: str, source: str, allow_zero: bool = True) -> int:
    if not text.isascii() or not text.isdigit() or not (0 if allow_zero else 1) <= int(text) <= 65535:
        raise ConfigError(f"{source}: {key}: invalid port {text!r}")
    return int(text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_host(host: str, key: str, src: str, *, sni: bool = False) -> None:
    """``host`` must be a DNS host name or an IP address as getaddrinfo takes it (IPv6
    without brackets); for ``sni``, a DNS host name only. Errors name ``key``."""
    problem = _host_problem(host, sni)
    if problem:
        raise ConfigError(f"{src}: {key}: {problem}, got {host!r}")


def _host_problem(host: str, sni: bool) -> str | None:
    """Why ``host`` is not a valid host (None when it is one)."""
    what = "a DNS host name" if sni else "a DNS host name or an IP address"
    if not host:
        return f"must be {what}, not empty"
    if "://" in host:
        return f"must be {what}, not a URL"
    if host.startswith("[") and host.endswith("]"):
        return "write an IPv6 address without brackets"
    if _is_ip(host):
        # RFC 6066 §3: literal IPv4 and IPv6 addresses are not permitted in HostName.
        return "SNI carries a DNS host name, never an IP address (RFC 6066 §3)" if sni else None
    if ":" in host:
        return f"must be {what} without a port (the port has its own key)"
    if not host.isascii():
        return "write an internationalised name in its ASCII form (xn--...)"
    name = host[:-1] if host.endswith(".") else host  # a trailing dot: fully qualified
    labels = name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return (f"must be {what}: letters, digits, '-' and '_' in dot-separated labels "
                "of 1 to 63 characters")
    if all(label.isdigit() for label in labels):
        # "1.2.3" or "010.0.0.1": getaddrinfo reads such names as (legacy forms of) IPv4.
        return "an all-numeric name that is not a valid IPv4 address"
    return None


def validate(cfg: Config) -> None:
    """Semantic checks that types alone cannot express."""
    src = cfg.source
    parse_hostport(cfg.listen, 3128, "listen", src)
    metrics_host, _ = parse_hostport(cfg.metrics_listen, 9128, "metrics_listen", src)
    _check_host(metrics_host, "metrics_listen", src)
    _check_listeners_differ(cfg)
    if cfg.default_origin:
        # The Host field of origin-form requests (and their destination): port 0 is no port.
        host, _ = parse_hostport(cfg.default_origin, 443, "default_origin", src, allow_zero=False)
        _check_host(host, "default_origin", src)
    if cfg.workers < 0 or cfg.workers > 256:
        raise ConfigError(f"{src}: workers: must be between 0 (one per CPU) and 256")
    if cfg.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"{src}: log_level: must be one of {', '.join(_LOG_LEVELS)}")
    if _VIA_RECEIVED_BY.fullmatch(cfg.via) is None:
        raise ConfigError(f"{src}: via: must be a token (optionally :PORT) for the Via field, "
                          f"got {cfg.via!r}")
    if cfg.tls.min_version not in ("1.2", "1.3"):
        raise ConfigError(f"{src}: tls.min_version: must be \"1.2\" or \"1.3\"")
    if cfg.tls.ca_file:
        check_ca_file(cfg.tls.ca_file, src)
    for p in cfg.connect_ports:
        if not 1 <= p <= 65535:
            raise ConfigError(f"{src}: connect_ports: invalid port {p}")
    for net in cfg.access.allow_clients:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"{src}: access.allow_clients: invalid network {net!r}") from None
    if cfg.access.users_file:
        _check_users_file(cfg.access.users_file, src)
    if _REALM.fullmatch(cfg.access.realm) is None:
        raise ConfigError(f"{src}: access.realm: no control characters, '\"' or '\\' (it is "
                          f"quoted in Proxy-Authenticate), got {cfg.access.realm!r}")
    _check_host_patterns(cfg.destinations, src)
    for key in ("deny_networks", "allow_networks"):
        for net in getattr(cfg.destinations, key):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"{src}: destinations.{key}: invalid network {net!r}") from None
    if cfg.metrics_max_origins < 0:
        raise ConfigError(f"{src}: metrics_max_origins: must be 0 or more")
    _validate_positive(cfg.timeouts, "timeouts", src)
    _validate_limits(cfg.limits, src)
    _validate_pool(cfg.pool, "pool", src)
    _validate_learned(cfg.pool, src)
    seen = set()
    for i, o in enumerate(cfg.origin):
        _check_host(o.host, f"origin[{i}].host", src)
        if o.sni:
            _check_host(o.sni, f"origin[{i}].sni", src, sni=True)
        check_client_cert(o, f"origin[{i}]", src)
        _validate_pool(o, f"origin[{i}]", src)
        if not 1 <= o.port <= 65535:
            raise ConfigError(f"{src}: origin[{i}].port: invalid port {o.port}")
        key = (o.host.lower(), o.port)
        if key in seen:
            raise ConfigError(f"{src}: origin[{i}]: duplicate origin {o.host}:{o.port}")
        seen.add(key)
    _validate_listen_address(cfg)


def _check_listeners_differ(cfg: Config) -> None:
    """``listen`` and ``metrics_listen`` on the same address: the second bind would fail at
    start, so say it at check time."""
    a = _bind_address(cfg.listen, 3128, "listen", cfg.source)
    b = _bind_address(cfg.metrics_listen, 9128, "metrics_listen", cfg.source)
    (ip_a, port_a), (ip_b, port_b) = a, b
    if port_a != port_b or port_a == 0 or ip_a is None or ip_b is None:
        return  # port 0: two different free ports; a name: only known when resolved
    # A wildcard address takes the port on every address of its family, and "::" (dual-stack
    # on Linux unless net.ipv6.bindv6only) on the IPv4 ones too.
    wildcard = any(ip.is_unspecified and (ip.version == other.version or ip.version == 6)
                   for ip, other in ((ip_a, ip_b), (ip_b, ip_a)))
    if ip_a == ip_b or wildcard:
        raise ConfigError(f"{cfg.source}: metrics_listen: {cfg.metrics_listen} overlaps listen "
                          f"{cfg.listen}; the two listeners need different ports")


def _bind_address(value: str, default_port: int, key: str,
                  src: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, int]:
    """The address and port a listener binds (address None for a name other than localhost)."""
    host, port = parse_hostport(value, default_port, key, src)
    if host == "localhost":
        host = "127.0.0.1"  # bind_listener binds "localhost" as IPv4
    try:
        return ipaddress.ip_address(host), port
    except ValueError:
        return None, port


def _check_host_patterns(dest: DestinationsConfig, src: str) -> None:
    """A pattern with a space, a control character or nothing at all never matches."""
    for key in ("deny_hosts", "allow_hosts"):
        for pattern in getattr(dest, key):
            if _HOST_PATTERN.fullmatch(pattern) is None:
                raise ConfigError(f"{src}: destinations.{key}: {pattern!r} can never match a "
                                  "host name (letters, digits, - . _ : and * ? [ ] ! only)")


def _check_users_file(path: str, src: str) -> None:
    """The users file must parse and name at least one user (else every request gets 407)."""
    from .access import AuthError, load_users
    try:
        users = load_users(path)
    except AuthError as exc:
        raise ConfigError(f"{src}: access.users_file: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{src}: access.users_file: {path}: not valid UTF-8") from None
    if not users:
        raise ConfigError(f"{src}: access.users_file: {path} holds no users, so nobody could "
                          "authenticate (add one with: proxyd hash-password)")


def check_ca_file(path: str, src: str) -> None:
    """The CA bundle must exist and hold certificates (else every handshake would fail)."""
    if os.path.isdir(path):
        raise ConfigError(f"{src}: tls.ca_file: {path!r} is a directory, not a PEM file")
    if not os.path.isfile(path):
        raise ConfigError(f"{src}: tls.ca_file: no such file {path!r}")
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{src}: tls.ca_file: cannot load {path!r}: {exc}") from None


def check_client_cert(o: OriginConfig, prefix: str, src: str) -> None:
    """A client certificate must load now, with its key, or every handshake would fail."""
    if o.key_file and not o.cert_file:
        raise ConfigError(f"{src}: {prefix}.key_file: set {prefix}.cert_file too")
    if not o.cert_file:
        return
    if not o.tls:
        raise ConfigError(f"{src}: {prefix}.cert_file: the origin is plain HTTP (tls = false)")
    for key, path in (("cert_file", o.cert_file), ("key_file", o.key_file)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{src}: {prefix}.{key}: no such file {path!r}")
    try:
        load_client_cert(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), o.cert_file, o.key_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        where = f"{prefix}.cert_file" + (f"/{prefix}.key_file" if o.key_file else "")
        raise ConfigError(f"{src}: {where}: cannot load {o.cert_file!r}"
                          + (f" with {o.key_file!r}" if o.key_file else "")
                          + f": {exc}") from None


def load_client_cert(ctx: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Load a client certificate chain and its key into ``ctx``; an encrypted key is refused
    (OpenSSL would otherwise prompt on the terminal, and a service has none)."""
    ctx.load_cert_chain(cert_file, key_file or None, password=_refuse_password)


def _refuse_password() -> bytes:
    raise ValueError("the private key is encrypted; give proxyd an unencrypted key and "
                     "protect the file's permissions instead")


def _validate_positive(section: Any, name: str, src: str) -> None:
    for f in fields(section):
        _check_positive(getattr(section, f.name), f"{name}.{f.name}", src)


def _check_positive(value: int | float, key: str, src: str) -> None:
    """A count or a duration: greater than 0, and finite (also for Configs built in code)."""
    if isinstance(value, float) and not (value > 0 and math.isfinite(value)):  # NaN fails
        raise ConfigError(f"{src}: {key}: must be a finite number greater than 0, got {value!r}")
    if not value > 0:
        raise ConfigError(f"{src}: {key}: must be greater than 0")


def _validate_limits(limits: Limits, src: str) -> None:
    _validate_positive(limits, "limits", src)
    if limits.head_size < limits.request_line:
        raise ConfigError(
            f"{src}: limits.head_size: {limits.head_size} is smaller than limits.request_line = "
            f"{limits.request_line}: a request line that long could never be read (the head "
            "holds it, a Host field and the rest)")


def _validate_learned(pool: PoolConfig, src: str) -> None:
    """Settings of the origins first seen at run time."""
    if pool.learned_warm < 0:
        raise ConfigError(f"{src}: pool.learned_warm: must be 0 or more")
    if pool.learned_warm > pool.max_connections:
        # A learned origin's pool takes pool.max_connections: the floor must fit under it.
        raise ConfigError(f"{src}: pool.learned_warm: larger than pool.max_connections")
    _check_positive(pool.learned_ttl, "pool.learned_ttl", src)
    if pool.learned_max < 1:
        raise ConfigError(f"{src}: pool.learned_max: must be at least 1")


def _validate_pool(section: Any, name: str, src: str) -> None:
    if section.warm < 0:
        raise ConfigError(f"{src}: {name}.warm: must be 0 or more")
    if section.max_connections < 1:
        raise ConfigError(f"{src}: {name}.max_connections: must be at least 1")
    if section.warm > section.max_connections:
        raise ConfigError(f"{src}: {name}.warm: larger than max_connections")
    for key in ("idle_ttl", "lifetime"):
        _check_positive(getattr(section, key), f"{name}.{key}", src)
    if section.max_requests < 1:
        raise ConfigError(f"{src}: {name}.max_requests: must be at least 1")


def _validate_listen_address(cfg: Config) -> None:
    """Refuse to become an open proxy by accident: a non-loopback listener needs a client
    allow-list or authentication."""
    host, _ = parse_hostport(cfg.listen, 3128, "listen", cfg.source)
    if host == "localhost":
        return
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{cfg.source}: listen: expected an IP address or localhost, "
                          f"got {host!r}") from None
    if addr.is_loopback:
        return
    default_clients = AccessConfig().allow_clients
    if cfg.access.users_file or cfg.access.allow_clients != default_clients:
        return
    raise ConfigError(
        f"{cfg.source}: listen: {host} is not a loopback address; proxyd refuses to run as an "
        "open proxy. Set access.allow_clients to the client networks that may use it, or "
        "access.users_file to require proxy authentication (proxyd hash-password), or "
        "listen on 127.0.0.1 / ::1")


def apply_flags(cfg: Config, *, listen: str | None = None, metrics_listen: str | None = None,
                workers: int | None = None, ca_file: str | None = None,
                origins: list[str] | None = None, warm: int | None = None,
                log_level: str | None = None) -> Config:
    """Command-line flags override the file; ``--origin`` adds (or updates) origins."""
    src = "command line"
    changes: dict[str, Any] = {}
    if listen is not None:
        changes["listen"] = listen
    if metrics_listen is not None:
        changes["metrics_listen"] = metrics_listen
    if workers is not None:
        changes["workers"] = workers
    if log_level is not None:
        changes["log_level"] = log_level
    if ca_file is not None:
        changes["tls"] = dataclasses.replace(cfg.tls, ca_file=ca_file)
    origin_list = list(cfg.origin)
    if warm is not None and not origins:
        origin_list = [dataclasses.replace(o, warm=warm) for o in origin_list]
    for text in origins or []:
        host, port = parse_hostport(text, 443, "--origin", src)
        origin_list = _add_origin(origin_list, host, port, cfg.pool, warm)
    changes["origin"] = tuple(origin_list)
    new = dataclasses.replace(cfg, **changes)
    try:
        validate(new)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(f"{cfg.source}:", f"{cfg.source} + {src}:", 1)) from None
    return new


def _add_origin(origins: list[OriginConfig], host: str, port: int, pool: PoolConfig,
                warm: int | None) -> list[OriginConfig]:
    for i, o in enumerate(origins):
        if o.host.lower() == host.lower() and o.port == port:
            if warm is not None:
                origins[i] = dataclasses.replace(o, warm=warm)
            return origins
    defaults = {k: getattr(pool, k) for k in _POOL_KEYS}
    if warm is not None:
        defaults["warm"] = warm
    origins.append(OriginConfig(host=host, port=port, **defaults))
    return origins


def to_toml(cfg: Config) -> str:
    """Render the effective configuration as TOML (what ``proxyd check`` prints)."""
    # Escaped like a string, so that a newline in the path cannot end the comment.
    lines = [f"# effective configuration (from {_toml_escape(cfg.source)})"]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in _SECTIONS or f.name in ("origin", "source"):
            continue
        lines.append(f"{f.name} = {_toml_value(value)}")
    for name in _SECTIONS:
        lines.append(f"\n[{name}]")
        section = getattr(cfg, name)
        lines.extend(f"{f.name} = {_toml_value(getattr(section, f.name))}" for f in fields(section))
    for o in cfg.origin:
        lines.append("\n[[origin]]")
        lines.extend(f"{f.name} = {_toml_value(getattr(o, f.name))}" for f in fields(o))
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return f'"{_toml_escape(str(value))}"'


def _toml_escape(text: str) -> str:
    """``text`` as the inside of a TOML basic string, in ASCII only (so that printing it
    cannot fail whatever the locale's encoding): the rest as \\uXXXX or \\UXXXXXXXX."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif 0xD800 <= code < 0xE000:
            # A lone surrogate: a byte that is not UTF-8 in a path given on the command
            # line. TOML cannot say it (escapes are Unicode scalar values): U+FFFD stands in.
            out.append("\\uFFFD")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04X}")
        else:
            out.append(f"\\U{code:08X}")
    return "".join(out)
