"""Who may use the proxy: client networks and optional Basic proxy authentication.

Passwords are stored as salted PBKDF2-SHA256 hashes (``proxyd hash-password`` makes a line
for the users file); verification uses a constant-time comparison, and credentials are
never forwarded (``Proxy-Authorization`` is hop-by-hop) nor logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time

from .errors import ProxyError
from .policy import address, parse_networks

_SCHEME = "pbkdf2_sha256"
# Verification runs on the event loop, so its cost is bounded: ~6 ms here at 20,000
# iterations, a verified (or refused) header is remembered, so each distinct credential is
# hashed once, and failed ones are hashed at most _FAILURES_PER_SECOND times a second.
_ITERATIONS = 20_000
# ... and at most this many (~60 ms here): verification holds the event loop, and a failed
# one may run up to _FAILURES_PER_SECOND times a second.
_MAX_ITERATIONS = 200_000
_CACHE_SIZE = 1024
# Credentials that fail are hashed at most this many times a second per worker (~0.1 s of
# CPU): beyond it a new credential is refused unverified, so a flood of random passwords
# cannot stall the event loop that serves everyone (verified ones stay cached and pass).
_FAILURES_PER_SECOND = 20


class AuthError(ValueError):
    """A users file that cannot be used; the message names the file and line."""


def hash_password(password: str, iterations: int = _ITERATIONS) -> str:
    """A users-file hash: ``pbkdf2_sha256$ITERATIONS$SALT$HASH`` (base64)."""
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return (f"{_SCHEME}${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def load_users(path: str) -> dict[str, tuple[int, bytes, bytes]]:
    """Parse ``user:hash`` lines (``#`` comments and blank lines allowed)."""
    users: dict[str, tuple[int, bytes, bytes]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise AuthError(f"{path}: cannot read: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, _, hashed = line.partition(":")
        parts = hashed.split("$")
        try:
            if not user or len(parts) != 4 or parts[0] != _SCHEME:
                raise ValueError
            iterations = int(parts[1])
            salt = base64.b64decode(parts[2], validate=True)
            digest = base64.b64decode(parts[3], validate=True)
        except (ValueError, binascii.Error):
            raise AuthError(f"{path}:{number}: expected user:{_SCHEME}$ITERATIONS$SALT$HASH "
                            "(make one with: proxyd hash-password)") from None
        if not 1 <= iterations <= _MAX_ITERATIONS or not digest:
            # 0 makes hashlib raise at the first login; a huge count would hold the event
            # loop for minutes on every failed attempt.
            raise AuthError(f"{path}:{number}: iterations must be 1 to {_MAX_ITERATIONS:,} and "
                            "the hash not empty (make one with: proxyd hash-password)")
        users[user] = (iterations, salt, digest)
    return users


class Access:
    """Client-network and credential checks of one worker."""

    def __init__(self, allow_clients: tuple[str, ...], users: dict[str, tuple[int, bytes, bytes]],
                 realm: str) -> None:
        self.networks = parse_networks(allow_clients)
        self.users = users
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'.encode()
        self._verified: dict[bytes, str | None] = {}  # sha256(header) -> user or None
        self._failure_window = 0.0  # start of the current second of failure counting
        self._failures = 0
        # Client address -> verdict: parsing an address with ipaddress costs more than the
        # rest of accepting a connection, and clients come back (bounded; cleared when full).
        self._client_verdicts: dict[str, bool] = {}

    def client_allowed(self, ip: str) -> bool:
        """True when the client's address is in an allowed network."""
        verdict = self._client_verdicts.get(ip)
        if verdict is None:
            addr = address(ip)
            verdict = any(addr in net for net in self.networks)
            if len(self._client_verdicts) >= _CACHE_SIZE:
                self._client_verdicts.clear()
            self._client_verdicts[ip] = verdict
        return verdict

    def authenticate(self, header: bytes | None) -> str:
        """The user named by a valid ``Proxy-Authorization``, else a 407 ProxyError."""
        if not self.users:
            return ""
        if header is None:
            raise _challenge("proxy authentication required")
        key = hashlib.sha256(header).digest()
        if key in self._verified:
            user = self._verified[key]
        else:
            now = time.monotonic()
            if now - self._failure_window >= 1.0:
                self._failure_window = now
                self._failures = 0
            if self._failures >= _FAILURES_PER_SECOND:
                raise _challenge("too many failed proxy authentications: try again shortly")
            try:
                user = self._check(header)
            except ProxyError:
                user = None
            if user is None:
                self._failures += 1
            if len(self._verified) >= _CACHE_SIZE:
                self._verified.clear()
            self._verified[key] = user
        if user is None:
            raise _challenge("invalid proxy credentials")
        return user

    def _check(self, header: bytes) -> str:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"basic":
            raise _challenge("only Basic proxy authentication is supported")
        try:
            user_b, _, password = base64.b64decode(token.strip(), validate=True).partition(b":")
            user = user_b.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _challenge("malformed Proxy-Authorization") from None
        entry = self.users.get(user)
        # Compare even for unknown users, so timing does not tell which names exist.
        iterations, salt, expected = entry or (_ITERATIONS, b"\0" * 16, b"\0" * 32)
        digest = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        if not hmac.compare_digest(digest, expected) or entry is None:
            raise _challenge("invalid proxy credentials")
        return user


def _challenge(reason: str) -> ProxyError:
    return ProxyError(reason, status=407, error_type="proxy_authentication_required")
