"""Who may use the proxy: client allow-list, Basic proxy authentication, no open proxy."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from conftest import run_proxyd
from origin import pattern_bytes
from proxyd import config
from proxyd.access import Access, hash_password, load_users
from test_blackbox import Raw, get, proxy_status


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def users_file(tmp_path):
    line = subprocess.run([sys.executable, "-m", "proxyd", "hash-password"], input="s3cret\n",
                          capture_output=True, text=True, check=True).stdout.strip()
    path = tmp_path / "users"
    path.write_text(f"# proxyd users\nalice:{line}\n")
    return path


def test_basic_auth_required_and_credentials_never_forwarded(proxyd, tls_origin, users_file):
    p = proxyd(config={"access": {"users_file": str(users_file)}})
    url = tls_origin.url("/bytes/7")
    r, body = get(p.port, url)
    assert r.status == 407 and "error=proxy_authentication_required" in proxy_status(r.headers)
    assert r.getheader("Proxy-Authenticate", "").startswith('Basic realm="proxyd"')
    r, _ = get(p.port, url, headers={"Proxy-Authorization": _basic("alice", "wrong")})
    assert r.status == 407
    r, _ = get(p.port, url, headers={"Proxy-Authorization": _basic("mallory", "s3cret")})
    assert r.status == 407
    r, body = get(p.port, url, headers={"Proxy-Authorization": _basic("alice", "s3cret")})
    assert (r.status, body) == (200, pattern_bytes(7))
    assert tls_origin.requests and all(
        "proxy-authorization" not in rq.header_names() for rq in tls_origin.requests)
    assert "s3cret" not in p.stderr_text() and _basic("alice", "s3cret") not in p.stderr_text()


def test_connect_needs_credentials_too(proxyd, echo_server, users_file):
    p = proxyd(config={"access": {"users_file": str(users_file)},
                       "connect_ports": [echo_server.port]})
    with Raw(p.port) as c:
        c.send(f"CONNECT 127.0.0.1:{echo_server.port} HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{echo_server.port}\r\n\r\n")
        assert c.response().status == 407
    assert echo_server.accepted == 0


def test_client_outside_the_allow_list_is_closed(proxyd, tls_origin):
    p = proxyd(config={"access": {"allow_clients": ["10.99.0.0/16"]}})
    with Raw(p.port) as c:
        c.send(f"GET {tls_origin.url('/bytes/1')} HTTP/1.1\r\nHost: {tls_origin.authority}\r\n\r\n")
        try:
            assert c.sock.recv(100) == b""  # closed without a word ...
        except ConnectionResetError:
            pass  # ... or reset: either way nothing is served
    assert not tls_origin.requests


def test_non_loopback_listener_refused_without_allow_list_or_auth(tmp_path, users_file):
    cfg = tmp_path / "open.toml"
    cfg.write_text('listen = "0.0.0.0:3128"\n')
    r = run_proxyd("check", "--config", str(cfg))
    assert r.returncode == 2
    assert "access.allow_clients" in r.stderr and "access.users_file" in r.stderr
    cfg.write_text(f'listen = "0.0.0.0:3128"\n[access]\nusers_file = "{users_file}"\n')
    assert run_proxyd("check", "--config", str(cfg)).returncode == 0
    cfg.write_text('listen = "0.0.0.0:3128"\n[access]\nallow_clients = ["192.0.2.0/24"]\n')
    assert run_proxyd("check", "--config", str(cfg)).returncode == 0


def test_bad_users_file_is_a_config_error(tmp_path):
    bad = tmp_path / "users"
    bad.write_text("alice:plaintext-password\n")
    with pytest.raises(config.ConfigError, match=r"access.users_file: .*users:1"):
        config.from_mapping({"access": {"users_file": str(bad)}}, "t.toml")


@pytest.mark.parametrize("iterations, digest", [(0, "AAAA"), (10 ** 9, "AAAA"), (1000, "")])
def test_users_file_iterations_are_bounded(tmp_path, iterations, digest):
    """0 iterations made hashlib raise at the first login; a huge count would hold the event
    loop for minutes per attempt: both refused when the file is read."""
    bad = tmp_path / "users"
    bad.write_text(f"alice:pbkdf2_sha256${iterations}$AAAAAAAAAAAAAAAAAAAAAA==${digest}\n")
    with pytest.raises(config.ConfigError, match=r"access.users_file: .*users:1: iterations"):
        config.from_mapping({"access": {"users_file": str(bad)}}, "t.toml")


def test_verification_is_cached_and_constant_time_compare(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"bob:{hash_password('pw', iterations=1000)}\n")
    access = Access(("127.0.0.0/8",), load_users(str(path)), "r")
    header = _basic("bob", "pw").encode()
    assert access.authenticate(header) == "bob"
    assert access.authenticate(header) == "bob"  # from the cache
    with pytest.raises(Exception) as exc:
        access.authenticate(_basic("bob", "nope").encode())
    assert getattr(exc.value, "status", None) == 407
    assert access.client_allowed("127.0.0.5") and access.client_allowed("::ffff:127.0.0.1")
    assert not access.client_allowed("192.0.2.1")


def test_host_patterns_allow_and_deny(proxyd, tls_origin, echo_server):
    p = proxyd(config={"destinations": {"deny_hosts": ["*.invalid", "evil.example"],
                                        "allow_hosts": ["localhost", "*.invalid", "127.0.0.1"]},
                       "connect_ports": [echo_server.port]})
    r, body = get(p.port, "http://nonexistent.invalid/")  # denied before any DNS lookup
    assert r.status == 403 and "error=http_request_denied" in proxy_status(r.headers)
    assert b"deny_hosts" in body
    r, body = get(p.port, "http://other.example/")
    assert r.status == 403 and b"allow_hosts" in body
    r, body = get(p.port, tls_origin.url("/bytes/3"))
    assert (r.status, body) == (200, pattern_bytes(3))
    with Raw(p.port) as c:
        c.send(f"CONNECT evil.example:{echo_server.port} HTTP/1.1\r\n"
               f"Host: evil.example:{echo_server.port}\r\n\r\n")
        r = c.response()
        assert r.status == 403 and "error=http_request_denied" in proxy_status(r)
    assert echo_server.accepted == 0


def test_a_flood_of_wrong_passwords_is_not_hashed_beyond_a_budget(tmp_path, monkeypatch):
    """Each distinct wrong credential costs a PBKDF2 on the event loop: past 20 failures a
    second, new ones are refused unverified (407) so the worker keeps serving; a credential
    verified before stays cached and passes; the next second hashing resumes."""
    import proxyd.access as access_mod

    path = tmp_path / "users"
    path.write_text(f"bob:{hash_password('pw', iterations=1000)}\n")
    access = Access(("127.0.0.0/8",), load_users(str(path)), "r")
    clock = [100.0]
    monkeypatch.setattr(access_mod.time, "monotonic", lambda: clock[0])
    good = _basic("bob", "pw").encode()
    assert access.authenticate(good) == "bob"
    hashed = []
    real_check = access._check
    monkeypatch.setattr(access, "_check", lambda h: hashed.append(h) or real_check(h))
    reasons = []
    for i in range(30):
        with pytest.raises(Exception) as exc:
            access.authenticate(_basic("bob", f"wrong{i}").encode())
        assert getattr(exc.value, "status", None) == 407
        reasons.append(exc.value.reason)
    assert len(hashed) == 20 and reasons[20:] == ["too many failed proxy authentications: "
                                                  "try again shortly"] * 10
    assert access.authenticate(good) == "bob"  # cached: unaffected
    clock[0] += 1.0
    with pytest.raises(Exception):
        access.authenticate(_basic("bob", "wrong-again").encode())
    assert len(hashed) == 21
