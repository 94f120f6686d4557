"""Configuration: embedded defaults, the annotated example, flags over file over defaults."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from conftest import run_proxyd
from proxyd import config

ROOT = Path(__file__).resolve().parent.parent


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_example_file_is_valid_and_equals_the_defaults():
    """proxyd.example.toml documents every key with its default value: its keys are
    compared with the dataclasses' fields, so a key added to one but not the other fails."""
    path = ROOT / "proxyd.example.toml"
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    assert config.from_mapping(data, str(path)) == config.Config(source=str(path))
    sections = {name for name, value in data.items() if isinstance(value, dict)}
    assert sections == set(config._SECTIONS)
    top = set(data) - sections
    assert top == _names(config.Config) - sections - {"origin", "source"}
    for name, cls in config._SECTIONS.items():
        assert set(data[name]) == _names(cls), f"[{name}]"
    # [[origin]] is shown commented out: every one of its keys, as a valid table.
    text = path.read_text()
    block = text[text.index("\n# [[origin]]\n"):]
    origin = tomllib.loads("\n".join(line[2:] for line in block.strip().splitlines()
                                     if line.startswith("# ") and " = " in line))
    assert set(origin) == _names(config.OriginConfig)
    config.from_mapping({"origin": [origin]}, str(path))


def test_flags_override_file_which_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "p.toml"
    cfg_file.write_text('workers = 3\nlisten = "127.0.0.1:4000"\n[pool]\nwarm = 2\n'
                        '[[origin]]\nhost = "a.test"\nport = 8443\n')
    cfg = config.load(str(cfg_file))
    assert (cfg.workers, cfg.listen, cfg.origin[0].warm) == (3, "127.0.0.1:4000", 2)
    cfg = config.apply_flags(cfg, workers=1, origins=["b.test"], warm=5)
    assert cfg.workers == 1 and cfg.listen == "127.0.0.1:4000"
    assert [(o.host, o.port, o.warm) for o in cfg.origin] == [("a.test", 8443, 2), ("b.test", 443, 5)]


@pytest.mark.parametrize("text, key", [
    ("[timeouts]\nconnect = -1\n", "timeouts.connect"),
    ("[[origin]]\nport = 443\n", "origin[0].host"),
    ("[[origin]]\nhost = \"a\"\nwarm = 200\nmax_connections = 10\n", "origin[0].warm"),
    ("listen = \"0.0.0.0:3128\"\n", "listen"),
    ("connect_ports = [443, \"x\"]\n", "connect_ports"),
    ("[tls]\nmin_version = \"1.1\"\n", "tls.min_version"),
    ("workers = true\n", "workers"),
    ("timeouts = 5\n", "timeouts"),
    # RFC 9110 §7.6.3: the Via pseudonym is a token; CR LF would inject fields
    ("via = \"proxyd\\r\\nX-Injected: yes\"\n", "via"),
    ("via = \"\"\n", "via"),
    ("via = \"two words\"\n", "via"),
    ("via = \"a,b\"\n", "via"),
    # NaN compares false with everything, so "<= 0" let it through (then every request 504s)
    ("[timeouts]\nconnect = nan\n", "timeouts.connect"),
    ("[timeouts]\nshutdown = -nan\n", "timeouts.shutdown"),
    ("[timeouts]\nresponse_head = inf\n", "timeouts.response_head"),  # every wait has one
    ("[pool]\nidle_ttl = nan\n", "pool.idle_ttl"),
    ("[pool]\nlifetime = inf\n", "pool.lifetime"),
    ("[pool]\nlearned_ttl = nan\n", "pool.learned_ttl"),
    ("[[origin]]\nhost = \"a\"\nidle_ttl = nan\n", "origin[0].idle_ttl"),
    # TOML integers are 64-bit; tomllib returns any size (float() of 10**400 overflowed)
    ("[timeouts]\nconnect = 99999999999999999999\n", "timeouts.connect"),
    ("[limits]\nhead_size = 9223372036854775808\n", "limits.head_size"),
    # a host is a DNS name or an IP address: no scheme, no port (it has its own key)
    ("[[origin]]\nhost = \"\"\n", "origin[0].host"),
    ("[[origin]]\nhost = \"a b\"\n", "origin[0].host"),
    ("[[origin]]\nhost = \"https://api.example.com\"\n", "origin[0].host"),
    ("[[origin]]\nhost = \"api.example.com:8443\"\n", "origin[0].host"),
    ("[[origin]]\nhost = \"[::1]\"\n", "origin[0].host"),  # as getaddrinfo takes it: "::1"
    ("[[origin]]\nhost = \"caf\u00e9.example\"\n", "origin[0].host"),  # A-label: xn--caf-dma
    ("[[origin]]\nhost = \"1.2.3\"\n", "origin[0].host"),  # getaddrinfo: 1.2.0.3
    ("[[origin]]\nhost = \"a..b\"\n", "origin[0].host"),
    ("[[origin]]\nhost = \"-a.example\"\n", "origin[0].host"),
    ("[[origin]]\nhost = \"" + "a" * 64 + ".example\"\n", "origin[0].host"),
    ("[[origin]]\nhost = \"a\"\n[[origin]]\nhost = \"b\\r\\nX: y\"\n", "origin[1].host"),
    # RFC 6066 §3: SNI carries a DNS host name, never an IP literal
    ("[[origin]]\nhost = \"a\"\nsni = \"a\\nb\"\n", "origin[0].sni"),
    ("[[origin]]\nhost = \"a\"\nsni = \"a b\"\n", "origin[0].sni"),
    ("[[origin]]\nhost = \"a\"\nsni = \"192.0.2.1\"\n", "origin[0].sni"),
    ("[[origin]]\nhost = \"a\"\nsni = \"::1\"\n", "origin[0].sni"),
    # default_origin becomes the Host field of origin-form requests
    ("default_origin = \"host with space\"\n", "default_origin"),
    ("default_origin = \"a:0\"\n", "default_origin"),
    ("default_origin = \"https://a.example\"\n", "default_origin"),
    ("default_origin = \"[a.example]:443\"\n", "default_origin"),
    ("metrics_listen = \"bad host:9128\"\n", "metrics_listen"),
    # the second listener would fail to bind at start
    ("metrics_listen = \"127.0.0.1:3128\"\n", "metrics_listen"),
    ("listen = \"localhost:3128\"\nmetrics_listen = \"127.0.0.1:3128\"\n", "metrics_listen"),
    ("listen = \"127.0.0.1:4000\"\nmetrics_listen = \"0.0.0.0:4000\"\n", "metrics_listen"),
    ("listen = \"[::1]:4000\"\nmetrics_listen = \"[::]:4000\"\n", "metrics_listen"),
    ("[pool]\nlearned_warm = -5\n", "pool.learned_warm"),
    ("[pool]\nlearned_ttl = -1\n", "pool.learned_ttl"),
    ("[pool]\nlearned_ttl = 0\n", "pool.learned_ttl"),
    ("[pool]\nlearned_warm = 9\nmax_connections = 8\n", "pool.learned_warm"),
    ("metrics_max_origins = -1\n", "metrics_max_origins"),
    # a head must hold a request line of the longest allowed length and a Host field
    ("[limits]\nhead_size = 1000\nrequest_line = 8192\n", "limits.head_size"),
    ("[limits]\nhead_size = 8191\n", "limits.head_size"),
    # RFC 9110 §11.2: the realm is a quoted-string in Proxy-Authenticate; CR LF would inject
    ("[access]\nrealm = \"a\\\"b\"\n", "access.realm"),
    ("[access]\nrealm = \"proxyd\\r\\nX-Injected: yes\"\n", "access.realm"),
    ("[access]\nrealm = \"back\\\\slash\"\n", "access.realm"),
    ("[access]\nrealm = \"tab\\there\"\n", "access.realm"),
    # host patterns: a space or an empty pattern can never match a host name
    ("[destinations]\ndeny_hosts = [\"*.internal\", \"bad host\"]\n", "destinations.deny_hosts"),
    ("[destinations]\nallow_hosts = [\"\"]\n", "destinations.allow_hosts"),
    ("[destinations]\nallow_hosts = [\"a\\nb\"]\n", "destinations.allow_hosts"),
])
def test_errors_name_the_key_and_the_file(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(path))
    assert key in str(exc.value) and str(path) in str(exc.value)


def test_non_loopback_listen_is_refused_with_a_reason():
    with pytest.raises(config.ConfigError, match="open proxy"):
        config.apply_flags(config.Config(), listen="0.0.0.0:3128")


def test_ca_file_that_is_a_directory_says_so(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(f'[tls]\nca_file = "{tmp_path}"\n')
    with pytest.raises(config.ConfigError, match="tls.ca_file: .* is a directory"):
        config.load(str(path))


def test_a_file_that_is_not_utf8_is_a_config_error_with_the_offset(tmp_path):
    """TOML v1.0.0 files are UTF-8: a Latin-1 byte is a clear error (exit 2), no traceback."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'# ok\nvia = "caf\xe9"\n')
    with pytest.raises(config.ConfigError, match=r"latin1\.toml: not valid UTF-8: byte 0xe9 "
                                                 r"at offset 15 \(line 2\)"):
        config.load(str(path))
    r = run_proxyd("check", "--config", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"proxyd: configuration error: {path}: not valid UTF-8"), r.stderr


def test_a_leading_utf8_bom_is_skipped(tmp_path):
    """Some editors start UTF-8 files with a BOM; it is not TOML, but harmless."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbfworkers = 3\n')
    assert config.load(str(path)).workers == 3
    path.write_bytes(b'\xef\xbb\xbfvia = "\xff"\n')  # offsets still count the BOM
    with pytest.raises(config.ConfigError, match=r"byte 0xff at offset 10 \(line 1\)"):
        config.load(str(path))


def test_empty_config_path_is_an_error_not_the_defaults(capsys):
    """``--config ""`` (an unset variable in a unit file) must not quietly mean no file."""
    from proxyd.__main__ import main
    assert main(["check", "--config", ""]) == 2
    assert capsys.readouterr().err == "proxyd: configuration error: --config: empty path\n"


def test_a_huge_but_finite_timeout_is_accepted(tmp_path):
    """inf is refused (every wait has a bound); a value that is finite is not capped."""
    path = tmp_path / "p.toml"
    path.write_text("[timeouts]\ntunnel_idle = 1e9\n[pool]\nlifetime = 1e12\n")
    cfg = config.load(str(path))
    assert (cfg.timeouts.tunnel_idle, cfg.pool.lifetime) == (1e9, 1e12)


def test_nan_and_inf_are_refused_in_configs_built_in_code():
    """validate() itself refuses them too, not only the TOML reader."""
    for value in (float("nan"), float("inf")):
        cfg = config.Config(timeouts=config.Timeouts(connect=value))
        with pytest.raises(config.ConfigError, match="timeouts.connect: must be a finite number"):
            config.validate(cfg)
        cfg = config.Config(pool=dataclasses.replace(config.PoolConfig(), idle_ttl=value))
        with pytest.raises(config.ConfigError, match="pool.idle_ttl: must be a finite number"):
            config.validate(cfg)


@pytest.mark.parametrize("host", [
    "localhost", "api.example.com", "API.Example.COM", "a-b.example", "_svc.internal",
    "xn--caf-dma.example", "api.example.com.", "127.0.0.1", "::1", "2001:db8::1",
    "fe80::1%eth0", "a" * 63 + ".example", "host.123", "10.0.0.5.example",
])
def test_valid_origin_hosts_are_accepted(host):
    """DNS names and IP literals as getaddrinfo takes them (IPv6 without brackets)."""
    cfg = config.from_mapping({"origin": [{"host": host}]}, "t.toml")
    assert cfg.origin[0].host == host


def test_valid_sni_default_origin_and_listeners_are_accepted():
    cfg = config.from_mapping({
        "default_origin": "[::1]:8443", "metrics_listen": "localhost:0", "listen": "127.0.0.1:0",
        "origin": [{"host": "10.0.0.5", "sni": "api.example.com"}]}, "t.toml")
    assert cfg.origin[0].server_hostname == "api.example.com"
    for default in ("plain.test:8080", "a.test", "192.0.2.1:80"):
        config.from_mapping({"default_origin": default}, "t.toml")
    # two listeners on port 0 get different ports; different addresses may share a port
    config.from_mapping({"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}, "t.toml")
    config.from_mapping({"listen": "127.0.0.1:4000", "metrics_listen": "127.0.0.2:4000"}, "t.toml")


def test_origin_flag_hosts_are_checked_too():
    cfg = config.apply_flags(config.Config(), origins=["[::1]:8443"])
    assert (cfg.origin[0].host, cfg.origin[0].port) == ("::1", 8443)
    with pytest.raises(config.ConfigError, match=r"command line: origin\[0\]\.host: "):
        config.apply_flags(config.Config(), origins=["a b:443"])
    with pytest.raises(config.ConfigError, match=r"--origin: expected HOST:PORT, not a URL"):
        config.apply_flags(config.Config(), origins=["https://a.example"])


def test_limits_at_the_head_size_floor_are_accepted():
    """head_size = request_line loaded before the checks came, and is a coherent (if tight)
    choice: only a head_size below request_line is refused."""
    cfg = config.from_mapping({"limits": {"request_line": 16384, "head_size": 16384}}, "t.toml")
    assert cfg.limits.head_size == 16384
    with pytest.raises(config.ConfigError, match=r"limits.head_size: .*smaller than"):
        config.from_mapping({"limits": {"request_line": 100, "head_size": 99}}, "t.toml")


def test_users_file_without_users_is_a_config_error(tmp_path):
    """Nobody could ever authenticate: every request would get 407."""
    users = tmp_path / "users"
    users.write_text("# no users yet\n\n")
    with pytest.raises(config.ConfigError, match=r"t.toml: access.users_file: .*no users"):
        config.from_mapping({"access": {"users_file": str(users)}}, "t.toml")


def test_users_file_that_is_not_utf8_is_a_config_error(tmp_path):
    users = tmp_path / "users"
    users.write_bytes(b"j\xf6rg:x\n")
    with pytest.raises(config.ConfigError, match=r"t.toml: access.users_file: .*UTF-8"):
        config.from_mapping({"access": {"users_file": str(users)}}, "t.toml")


def test_printable_realms_and_host_patterns_are_accepted():
    """Values that loaded before the checks came (review of the upgrade path): a non-ASCII
    realm (sent as UTF-8, RFC 7617 charset), an IPv6 zone in a pattern, an SNI with a
    trailing dot (sent without it, RFC 6066 §3)."""
    cfg = config.from_mapping({
        "access": {"realm": "Corp proxy (staff only): use your SSO name"},
        "destinations": {"deny_hosts": ["*.internal", "metadata.google.internal", "10.*",
                                        "fe80::1%eth0"],
                         "allow_hosts": ["[a-c]?.Example.COM", "*", "fd00::*"]}}, "t.toml")
    assert cfg.access.realm.startswith("Corp proxy")
    assert config.from_mapping({"access": {"realm": "Zürich proxy"}}, "t.toml")
    cfg = config.from_mapping({"origin": [{"host": "a.example", "sni": "api.example.com."}]},
                              "t.toml")
    assert cfg.origin[0].server_hostname == "api.example.com"


def test_a_dual_stack_wildcard_overlaps_ipv4_listeners():
    with pytest.raises(config.ConfigError, match=r"metrics_listen: .*overlaps listen"):
        config.from_mapping({"listen": "127.0.0.1:9128", "metrics_listen": "[::]:9128"},
                            "t.toml")


def _round_trip(cfg: config.Config) -> config.Config:
    """What ``proxyd check`` prints, read back as a config file."""
    text = config.to_toml(cfg)
    back = config.from_mapping(tomllib.loads(text), cfg.source)
    assert text.isascii(), "printed as ASCII, whatever the locale's encoding"
    return back


def test_effective_config_of_the_example_round_trips():
    cfg = config.load(str(ROOT / "proxyd.example.toml"))
    assert _round_trip(cfg) == cfg


def test_effective_config_with_awkward_strings_round_trips(tmp_path, ca_pem):
    """TOML basic strings (TOML v1.0.0 §String) escape '"', '\\' and every control
    character: a valid value with any of them must print as TOML that reads back equal."""
    from proxyd.access import hash_password
    odd = 'odd "q" \\ back\tslash\x01\x7f é ☃ 😀 \u2028'
    (tmp_path / odd).mkdir()
    ca_file = tmp_path / odd / "ca\n.pem"
    ca_file.write_bytes(ca_pem.read_bytes())
    users_file = tmp_path / odd / "users\r"
    users_file.write_text(f"alice:{hash_password('pw', iterations=1000)}\n")
    cfg = config.from_mapping({
        "listen": "[::1]:0", "metrics_listen": "localhost:0", "log_level": "WARNING",
        "via": "a'b`|~^#$%&*+-.:8080", "default_origin": "[2001:db8::1]:8443",
        "tls": {"ca_file": str(ca_file), "min_version": "1.3"},
        "access": {"users_file": str(users_file), "realm": "it's [a] {realm} #1 ~ 'x'",
                   "allow_clients": ["10.0.0.0/8", "fd00::/8"]},
        "destinations": {"deny_hosts": ["*.internal", "[!a]?.example"], "allow_hosts": ["*"],
                         "deny_networks": [], "allow_networks": ["0.0.0.0/0"]},
        "timeouts": {"connect": 0.1, "tunnel_idle": 1e16, "shutdown": 5e-324},
        "origin": [{"host": "fe80::1%eth0", "port": 1, "sni": "x-y_z.example", "tls": False},
                   {"host": "api.example.com."}],
    }, f"{tmp_path}/{odd}\n[[origin]]\nhost = 'x'.toml")
    assert _round_trip(cfg) == cfg
    assert config.to_toml(cfg).startswith("# effective configuration (from ")
    assert config.to_toml(cfg).count("\n[[origin]]") == 2  # the source is one comment line


def test_a_path_that_is_not_unicode_still_prints_as_valid_toml(tmp_path, ca_pem):
    """A path from a flag may hold bytes that are not UTF-8 (surrogate escapes): TOML cannot
    say them, so U+FFFD stands in, and the output stays valid TOML."""
    ca_file = tmp_path / "ca-\udcff.pem"
    ca_file.write_bytes(ca_pem.read_bytes())
    cfg = config.apply_flags(config.Config(), ca_file=str(ca_file))
    assert tomllib.loads(config.to_toml(cfg))["tls"]["ca_file"] == f"{tmp_path}/ca-\ufffd.pem"


@pytest.mark.parametrize("flag", ["--quiet", "-q"])
def test_check_quiet_prints_nothing_on_success_and_the_error_on_failure(tmp_path, capsys, flag):
    """For ExecStartPre/ExecReload: validate without dumping the config into the journal."""
    from proxyd.__main__ import main
    path = tmp_path / "p.toml"
    path.write_text("workers = 2\n")
    assert main(["check", flag, "--config", str(path)]) == 0
    assert capsys.readouterr() == ("", "")
    path.write_text("workers = -1\n")
    assert main(["check", flag, "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"proxyd: configuration error: {path}: workers: ")


def test_quiet_is_only_for_check(capsys):
    from proxyd.__main__ import main
    with pytest.raises(SystemExit) as exc:
        main(["--quiet"])
    assert exc.value.code == 2 and "--quiet" in capsys.readouterr().err


def test_the_unit_checks_the_config_quietly_before_start_and_reload():
    """ExecStartPre and ExecReload validate without dumping the whole effective config into
    the journal at every start and reload."""
    text = (ROOT / "systemd" / "proxyd.service").read_text()
    checks = [line for line in text.splitlines()
              if line.startswith(("ExecStartPre=", "ExecReload=")) and " check" in line]
    assert [line.split("=", 1)[0] for line in checks] == ["ExecStartPre", "ExecReload"]
    assert all(" check --quiet " in line for line in checks), checks
    # pip installs no README or man page: a Documentation= link would point at nothing
    assert "Documentation=" not in text


# -- an origin's client certificate (origin[i].cert_file / key_file) ---------------------------

@pytest.fixture
def client_cert_files(ca, tmp_path) -> tuple[Path, Path, Path]:
    """(certificate, its key, both in one file) for a client identity of the test CA."""
    leaf = ca.issue_cert("proxyd-client.test")
    cert, key, both = tmp_path / "client.crt", tmp_path / "client.key", tmp_path / "client.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(both))
    return cert, key, both


def test_a_key_file_gone_when_a_worker_starts_is_named(tmp_path, client_cert_files):
    """Found by review: a worker starting after the key file went away blamed cert_file."""
    from proxyd.worker import _tls_contexts

    cert, key, _ = client_cert_files
    cfg = _load_origin(tmp_path, f'cert_file = "{cert}"\nkey_file = "{key}"\n')
    assert set(_tls_contexts(cfg)[1]) == {cfg.origin[0]}
    key.rename(tmp_path / "moved.key")
    with pytest.raises(config.ConfigError, match=r"origin\[0\]\.key_file: no such file .*client\.key"):
        _tls_contexts(cfg)


def _load_origin(tmp_path: Path, keys: str) -> config.Config:
    path = tmp_path / "p.toml"
    path.write_text(f'[[origin]]\nhost = "mtls.example"\n{keys}')
    return config.load(str(path))


def test_client_certificate_with_its_key_in_a_file_of_its_own_or_the_same(tmp_path,
                                                                          client_cert_files):
    cert, key, both = client_cert_files
    cfg = _load_origin(tmp_path, f'cert_file = "{cert}"\nkey_file = "{key}"\n')
    assert (cfg.origin[0].cert_file, cfg.origin[0].key_file) == (str(cert), str(key))
    assert _load_origin(tmp_path, f'cert_file = "{both}"\n').origin[0].cert_file == str(both)


@pytest.mark.parametrize("keys, message", [
    ('key_file = "{key}"\n', r"origin\[0\]\.key_file: set origin\[0\]\.cert_file too"),
    ('cert_file = "{cert}"\nkey_file = "{key}"\ntls = false\n',
     r"origin\[0\]\.cert_file: the origin is plain HTTP"),
    ('cert_file = "{missing}"\n', r"origin\[0\]\.cert_file: no such file"),
    ('cert_file = "{cert}"\nkey_file = "{missing}"\n', r"origin\[0\]\.key_file: no such file"),
    # the certificate alone, without a key: OpenSSL cannot use it
    ('cert_file = "{cert}"\n', r"origin\[0\]\.cert_file: cannot load"),
    # a key that is not the certificate's
    ('cert_file = "{cert}"\nkey_file = "{other_key}"\n',
     r"origin\[0\]\.cert_file/origin\[0\]\.key_file: cannot load .* with "),
    # OpenSSL would prompt for the passphrase on a terminal a service does not have
    ('cert_file = "{cert}"\nkey_file = "{encrypted}"\n', r"private key is encrypted"),
])
def test_client_certificate_errors_name_the_key_and_the_file(tmp_path, ca, client_cert_files,
                                                             keys, message):
    from cryptography.hazmat.primitives import serialization

    cert, key, _ = client_cert_files
    other_key = tmp_path / "other.key"
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(other_key))
    encrypted = tmp_path / "encrypted.key"
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    text = keys.format(cert=cert, key=key, missing=tmp_path / "nope.pem",
                       other_key=other_key, encrypted=encrypted)
    with pytest.raises(config.ConfigError, match=message) as exc:
        _load_origin(tmp_path, text)
    assert str(tmp_path / "p.toml") in str(exc.value)
