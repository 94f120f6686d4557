"""Sans-I/O HTTP/1.1 message parsing and serialising (RFC 9112).

No sockets here: a parser is fed bytes with :meth:`feed` (``feed(b"")`` means EOF) and
returns events from :meth:`next_event`, in the style of h11:

* a head (:class:`RequestHead` / :class:`ResponseHead`),
* ``bytes`` — a piece of body data, already de-chunked,
* :class:`EndOfMessage` — with the trailer fields of a chunked body, if any,
* :data:`NEED_DATA` — feed more bytes,
* :data:`PAUSED` — a message is complete; call :meth:`start_next` for the next one,
* :data:`CLOSED` — the peer closed cleanly between messages.

Parsing is strict, because a proxy that is lenient where the next hop is strict (or the
reverse) is the root of request smuggling: every rejection raises :class:`ParseError`
carrying the status to answer (400, 414, 431, 501, 505).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import ParseError

# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: field-value may hold VCHAR, obs-text, SP and HTAB; nothing else
# (no NUL, no bare CR or LF, no other CTL). A single linear scan finds offenders.
_BAD_VALUE_CHAR = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 §3.2: request-target holds no whitespace or CTL.
_BAD_TARGET_CHAR = re.compile(rb"[\x00-\x20\x7f-\xff]")
# A field line (RFC 9112 §5): token, ":", OWS, a value that starts with a visible char and
# holds no CTL but HTAB, CRLF. Each part has exactly one way to match, so a failing line
# costs no backtracking.
_FIELD_NAME = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD_VALUE = rb"(?:[^\x00-\x20\x7f][^\x00-\x08\x0a-\x1f\x7f]*)?"
# Anchored at line starts: a line either matches whole or not at all (values hold no CR or
# LF), so "as many matches as lines" proves every line valid in a single pass.
_FIELD_ITEM = re.compile(rb"(?m)^(" + _FIELD_NAME + rb"):[ \t]*(" + _FIELD_VALUE + rb")\r\n")
_FIELD_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([^\x00-\x08\x0a-\x1f\x7f]*)")
_HTTP_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# The usual request line in one match; anything else goes through _parse_request_line,
# which accepts exactly the same lines and names what is wrong with the others.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^\x00-\x20\x7f-\xff]+) HTTP/1\.([01])")
# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
# RFC 9112 §7.1.1: chunk-size [ chunk-ext ], chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] )
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_TOKEN_SRC = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHUNK_LINE = re.compile(
    rb"0*([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*" + _TOKEN_SRC
    + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN_SRC + rb"|" + _QUOTED + rb"))?)*)")
# 1*HEXDIG and 1*DIGIT (RFC 9112 §7.1, RFC 9110 §8.6): leading zeros, however many, are
# valid; the digits after them are bounded so that the value is.
_DIGITS = re.compile(rb"0*([0-9]{1,18})")
# Plain paths: the usual head matched whole in one pass — start line, valid field lines
# (the same classes as _FIELD_ITEM), the blank line — so that it can be forwarded from the
# bytes as received. Any head these do not take goes through the general parser, which
# reaches the same result or names the error.
# Canonical whitespace only (no tab, no double or trailing space: every next hop reads it
# the same way). A field line is a name, a colon and one character class up to its CRLF:
# the optional space after the colon, a value starting with a space and an empty value
# with a trailing space all match it, and are then told apart by two substring scans of
# the head (_plain_spaces: no double space, no space before CRLF), which leaves exactly
# ":" or ": " and a value that starts and ends with a visible character (or is empty).
# One class per line is the least matching work: a words-and-spaces loop is twice it, and
# a separate class for the first character of the value a quarter more.
_PLAIN_FIELDS = rb"((?:" + _FIELD_NAME + rb":[\x20-\x7e\x80-\xff]*\r\n)*)\r\n"
_PLAIN_REQUEST = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^\x00-\x20\x7f-\xff]+) HTTP/1\.([01])\r\n" + _PLAIN_FIELDS)
_PLAIN_RESPONSE = re.compile(
    rb"HTTP/1\.([01]) ([2-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n" + _PLAIN_FIELDS)
# The fields a proxy acts on (framing, hop-by-hop, routing, expectations, loops); a plain
# request holds one Host and at most Connection: keep-alive|close, Proxy-Connection and
# Keep-Alive (removed when forwarded). Searched from the CRLF that ends the line before
# (CRLF only ever ends a line of a matched head; a literal prefix is the regex engine's
# fastest scan), on canonical whitespace, so the value is exactly what follows ": ".
_REQUEST_SPECIAL = re.compile(
    rb"(?i)\r\n(content-length|transfer-encoding|connection|keep-alive|proxy-connection|te"
    rb"|upgrade|proxy-authorization|proxy-authenticate|host|expect|via|authorization)"
    rb":[ ]?([^\r]*)")
# A plain response holds one Content-Length, and may hold Connection: keep-alive or close
# and Keep-Alive (applied to the pooled connection, not forwarded). Searched in the
# lower-cased head: names and values come out lower-cased.
_RESPONSE_SPECIAL = re.compile(
    rb"\n(content-length|transfer-encoding|connection|keep-alive|proxy-connection|te"
    rb"|upgrade|proxy-authorization|proxy-authenticate|host):[ ]?([^\r]*)")
_MAX_CHUNK_SIZE = 1 << 62
# The schemes that authenticate a connection rather than a request: NTLM and Negotiate
# (RFC 4559 §4: "the connection ... is authenticated"). Scheme names are case-insensitive
# (RFC 9110 §11.1).
_CONNECTION_AUTH = re.compile(rb"(?i)(?:ntlm|negotiate)(?:[ \t]|$)")
# ... and in a WWW-Authenticate list, a challenge of theirs that carries a token (NTLM's
# type 2 message, a Negotiate continuation): the state the next request must find. The bare
# offer ("WWW-Authenticate: NTLM") starts nothing yet, so it pins no connection: a client
# that cannot answer it must not hold one upstream connection for its keep-alive's length.
_CONNECTION_CHALLENGE = re.compile(
    rb"(?i)(?:^|,)[ \t]*(?:ntlm|negotiate)[ \t]+[A-Za-z0-9+/=._~-]")


def authenticates_connection(req: RequestHead, resp: ResponseHead) -> bool:
    """True when this exchange ties the origin's connection to the client: the request
    carries NTLM or Negotiate credentials, or the 401 carries a challenge token for them (the
    next request of the handshake must come on the same connection). Such a connection must
    never serve another client: it is authenticated as this one (HAProxy marks it private
    too)."""
    if not req.plain and b"authorization" in req.lnames:
        for name, value in req.headers:
            if name.lower() == b"authorization" and _CONNECTION_AUTH.match(value):
                return True
    if resp.status == 401:
        for name, value in resp.headers:
            if name.lower() == b"www-authenticate" and _CONNECTION_CHALLENGE.search(value):
                return True
    return False
# RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request-line.
_MAX_LEADING_CRLF = 8
# The empty line that ends a head whose lines may end with LF alone (responses only), and
# those line ends.
_LF_HEAD_END = re.compile(rb"\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")

Headers = list[tuple[bytes, bytes]]
"""Field lines in order, names as received. Repeated fields stay repeated."""


class Constant:
    """A named constant, compared by identity (``is``).

    Used instead of :class:`enum.Enum` for the states and kinds the per-request path tests:
    on Python 3.11 an Enum member lookup (``Framing.LENGTH``) costs about 0.1 µs, a plain
    class attribute a fifth of that, and a request makes dozens of them.
    """

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.value.upper()}"


class Framing(Constant):
    """How the body of a message is delimited (RFC 9112 §6.3)."""

    __slots__ = ()
    NONE: ClassVar[Framing]
    LENGTH: ClassVar[Framing]
    CHUNKED: ClassVar[Framing]
    CLOSE: ClassVar[Framing]


Framing.NONE = Framing("none")
Framing.LENGTH = Framing("length")
Framing.CHUNKED = Framing("chunked")
Framing.CLOSE = Framing("close")


@dataclass(slots=True)
class ParserLimits:
    """Upper bounds on everything the parser buffers (each breach has its own status)."""

    request_line: int = 8192
    head_size: int = 65536
    header_count: int = 100
    chunk_line: int = 4096
    trailer_size: int = 16384


class _Head:
    """What request and response heads share.

    ``headers`` and ``lnames`` are built on first use from ``raw_block`` when the parser did
    not need them: a plain message (see :attr:`plain`) is forwarded from its field section
    as received, so splitting it into field tuples would be work thrown away.
    """

    __slots__ = ("version", "_headers", "_lnames", "framing", "content_length", "keep_alive",
                 "connection_tokens", "raw_block", "plain")
    # plain: True when the parser's plain path took the head: fields valid with canonical
    # whitespace, and none that a proxy must act on beyond what that path checked.

    @property
    def headers(self) -> Headers:
        """Field lines in order, names as received."""
        headers = self._headers
        if headers is None:
            headers = self._headers = _split_block(self.raw_block)
        return headers

    @headers.setter
    def headers(self, value: Headers) -> None:
        self._headers = value

    @property
    def lnames(self) -> list[bytes]:
        """Lower-cased field names, in the order of :attr:`headers`."""
        lnames = self._lnames
        headers = self.headers
        if lnames is None or len(lnames) != len(headers):
            lnames = self._lnames = [n.lower() for n, _ in headers]
        return lnames

    @lnames.setter
    def lnames(self, value: list[bytes]) -> None:
        self._lnames = value

    def get(self, lname: bytes) -> bytes | None:
        """First value of the field named ``lname`` (lower case), or None."""
        return _get(self, lname)

    def _start(self) -> tuple[object, object]:
        """The start line's own parts: (method, target) or (status, reason)."""
        raise NotImplementedError

    def _key(self) -> tuple[object, ...]:
        return (*self._start(), self.version, self.headers, self.framing, self.content_length,
                self.keep_alive, self.connection_tokens)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        first, second = self._start()
        return (f"{type(self).__name__}({first!r}, {second!r}, {self.version}, "
                f"{self.headers!r}, {self.framing!r}, {self.content_length}, "
                f"{self.keep_alive}, {set(self.connection_tokens)!r})")


class RequestHead(_Head):
    """A parsed request line and header section."""

    __slots__ = ("method", "target", "plain_host", "plain_hop_lines")

    def __init__(self, method: bytes, target: bytes, version: int, headers: Headers | None = None,
                 framing: Framing = Framing.NONE, content_length: int = 0,
                 keep_alive: bool = True, connection_tokens: frozenset[bytes] = frozenset(),
                 lnames: list[bytes] | None = None, raw_block: bytes = b"") -> None:
        self.method = method
        self.target = target
        self.plain_host = b""  # with plain: the one Host field's value
        self.plain_hop_lines = False  # with plain: Connection/Proxy-Connection/Keep-Alive lines
        # The shared fields, set here rather than in a _Head method: two heads per request.
        self.version = version  # 10 or 11
        self._headers = headers if headers is not None or raw_block else []
        self._lnames = lnames
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.connection_tokens = connection_tokens
        self.raw_block = raw_block  # the field section as received (validated)
        self.plain = False  # see _Head.plain

    @property
    def has_body(self) -> bool:
        """True when body bytes follow the head."""
        return self.framing is Framing.CHUNKED or self.content_length > 0

    def _start(self) -> tuple[bytes, bytes]:
        return self.method, self.target


class ResponseHead(_Head):
    """A parsed status line and header section."""

    __slots__ = ("status", "reason", "keep_alive_field", "plain_dated")

    def __init__(self, status: int, reason: bytes, version: int, headers: Headers | None = None,
                 framing: Framing = Framing.NONE, content_length: int = 0,
                 keep_alive: bool = True, connection_tokens: frozenset[bytes] = frozenset(),
                 lnames: list[bytes] | None = None, raw_block: bytes = b"") -> None:
        self.status = status
        self.reason = reason
        self.keep_alive_field: bytes | None = None  # with plain: the Keep-Alive value, if any
        self.plain_dated = True  # with plain: a Date field is there
        self.version = version
        self._headers = headers if headers is not None or raw_block else []
        self._lnames = lnames
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.connection_tokens = connection_tokens
        self.raw_block = raw_block
        self.plain = False

    def _start(self) -> tuple[int, bytes]:
        return self.status, self.reason


def _split_block(block: bytes) -> Headers:
    """Field tuples of a field section, one per valid line (a validated section: all)."""
    headers: Headers = _FIELD_ITEM.findall(block)
    if b" \r\n" in block or b"\t\r\n" in block:  # trailing OWS is not part of a value
        headers = [(n, v.rstrip(b" \t")) for n, v in headers]
    return headers


@dataclass(slots=True)
class EndOfMessage:
    """The message is complete; ``trailers`` holds a chunked body's trailer fields."""

    trailers: Headers = field(default_factory=list)


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")
CLOSED = _Sentinel("CLOSED")

Event = RequestHead | ResponseHead | bytes | EndOfMessage | _Sentinel


class IncompleteMessage(ParseError):
    """The peer closed the connection in the middle of a message."""


class BareLineFeed(ParseError):
    """A message head holds a line ended by LF alone (RFC 9112 §2.2)."""


def _get(head: RequestHead | ResponseHead, lname: bytes) -> bytes | None:
    if len(head.lnames) != len(head.headers):
        return get_field(head.headers, lname)
    try:
        return head.headers[head.lnames.index(lname)][1]
    except ValueError:
        return None


def get_field(headers: Headers, lname: bytes) -> bytes | None:
    """First value of field ``lname`` (lower-case name) in ``headers``, or None."""
    for name, value in headers:
        if name.lower() == lname:
            return value
    return None


def field_values(headers: Headers, lname: bytes) -> list[bytes]:
    """All values of field ``lname``, comma lists split and elements stripped (RFC 9110 §5.6.1)."""
    return [v for name, value in headers if name.lower() == lname
            for v in list_members(value)]


def list_members(value: bytes) -> list[bytes]:
    """The members of one list field value: split on commas, OWS stripped, empty members
    dropped (RFC 9110 §5.6.1)."""
    return [v for v in (m.strip(b" \t") for m in value.split(b",")) if v]


class _State(Constant):
    """Where a parser is in its message."""

    __slots__ = ()
    HEAD: ClassVar[_State]
    BODY_LENGTH: ClassVar[_State]
    BODY_CLOSE: ClassVar[_State]
    CHUNK_SIZE: ClassVar[_State]
    CHUNK_DATA: ClassVar[_State]
    CHUNK_CRLF: ClassVar[_State]
    TRAILERS: ClassVar[_State]
    DONE: ClassVar[_State]
    ERROR: ClassVar[_State]


for _name in ("HEAD", "BODY_LENGTH", "BODY_CLOSE", "CHUNK_SIZE", "CHUNK_DATA", "CHUNK_CRLF",
              "TRAILERS", "DONE", "ERROR"):
    setattr(_State, _name, _State(_name.lower()))
del _name


class _Parser:
    """Shared buffering, head splitting and body decoding for both directions."""

    __slots__ = ("limits", "_buf", "_eof", "_state", "_remaining", "_scan_from", "_trailers",
                 "_trailer_bytes", "bytes_in")

    # RFC 9112 §2.2: a recipient MAY take a lone LF as a line terminator. Only responses do
    # (see ResponseParser); a request must be framed the way every server behind reads it.
    LONE_LF_ENDS_LINES: ClassVar[bool] = False

    def __init__(self, limits: ParserLimits | None = None) -> None:
        self.limits = limits or ParserLimits()
        self._buf: bytes | bytearray = b""
        self._eof = False
        self._state = _State.HEAD
        self._remaining = 0  # bytes left in a Content-Length body or in a chunk
        self._scan_from = 0  # where to resume looking for the end of the head
        self._trailers: Headers = []
        self._trailer_bytes = 0
        self.bytes_in = 0  # total bytes fed, for accounting

    # -- buffering --------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer; ``b""`` signals EOF."""
        if not data:
            self._eof = True
            return
        self.bytes_in += len(data)
        if not self._buf:
            self._buf = data  # no copy in the common case of an empty buffer
        elif isinstance(self._buf, bytearray):
            self._buf += data
        else:
            self._buf = bytearray(self._buf) + data

    @property
    def buffered(self) -> int:
        """Number of bytes received but not yet turned into events."""
        return len(self._buf)

    @property
    def at_eof(self) -> bool:
        """True once ``feed(b"")`` was called."""
        return self._eof

    @property
    def done(self) -> bool:
        """True between the end of a message and :meth:`start_next`."""
        return self._state is _State.DONE

    @property
    def close_delimited(self) -> bool:
        """True while reading a body that ends when the connection closes."""
        return self._state is _State.BODY_CLOSE

    @property
    def in_head(self) -> bool:
        """True while waiting for (part of) a message head."""
        return self._state is _State.HEAD

    def take_buffered(self) -> bytes:
        """Remove and return every buffered byte (a CONNECT tunnel takes over the stream)."""
        return self._take(len(self._buf)) if self._buf else b""

    def _take(self, n: int) -> bytes:
        buf = self._buf
        if n >= len(buf):
            self._buf = b""
            return bytes(buf) if isinstance(buf, bytearray) else buf
        chunk = bytes(buf[:n])
        if isinstance(buf, bytearray):
            del buf[:n]
        else:
            self._buf = buf[n:]
        return chunk

    def _drop(self, n: int) -> None:
        if isinstance(self._buf, bytearray):
            del self._buf[:n]
        else:
            self._buf = self._buf[n:]

    def start_next(self) -> None:
        """Allow parsing of the next message on this connection (keep-alive, pipelining)."""
        if self._state is not _State.DONE:
            raise RuntimeError("start_next() before the current message is done")
        self._state = _State.HEAD
        self._scan_from = 0

    def next_message(self) -> bool:
        """After a message: start the next one and say whether bytes (or EOF) already wait.

        The one-call form of ``if done: start_next()`` then ``buffered or at_eof`` for the
        per-request hot path.
        """
        if self._state is _State.DONE:
            self._state = _State.HEAD
            self._scan_from = 0
        return bool(self._buf) or self._eof

    def skip_empty_body(self) -> bool:
        """If the message just parsed has no body, consume its :class:`EndOfMessage` and
        return True (the parser is then past the message end); False otherwise."""
        if self._state is _State.BODY_LENGTH and self._remaining == 0:
            self._state = _State.DONE
            return True
        return False

    def clean_end(self) -> bool:
        """True, and ready for the next message, if the current one ended with nothing
        buffered after it and no EOF; False (state unchanged) otherwise."""
        if self._state is not _State.DONE or self._buf or self._eof:
            return False
        self._state = _State.HEAD
        self._scan_from = 0
        return True

    # -- head -------------------------------------------------------------------------------
    def _find_head(self) -> bytes | None:
        """Return the head (without the blank line) once complete, else None.

        Bare LF is rejected as soon as it is seen rather than waited on (RFC 9112 §2.2 lets a
        recipient reject it; accepting it where a peer would not enables smuggling).
        """
        buf = self._buf
        scan = self._scan_from
        end = buf.find(b"\r\n\r\n", max(0, scan - 3))
        # Every LF seen since the last scan must end a CRLF pair; counting both in C is
        # cheaper than a Python loop, and only new bytes are scanned (no quadratic cost
        # for a head that arrives byte by byte).
        if scan and buf[scan - 1] == 13:
            scan -= 1
        # Only the first head_size bytes are judged for bare LF, so the verdict (400 or 431)
        # is the same however the bytes were segmented.
        limit = self.limits.head_size
        stop = min(end + 4 if end != -1 else len(buf), limit)
        if buf.count(b"\n", scan, stop) != buf.count(b"\r\n", scan, stop):
            raise BareLineFeed("bare LF in message head")
        if end == -1:
            self._scan_from = len(buf)
            self._check_partial_head()
            return None
        if end + 4 > limit:
            raise ParseError("message head too large", status=431)
        head = bytes(buf[:end])
        self._drop(end + 4)
        self._scan_from = 0
        return head

    def _check_partial_head(self) -> None:
        if len(self._buf) > self.limits.head_size:
            raise ParseError("message head too large", status=431)

    def _parse_block(self, block: bytes, lnames: list[bytes]) -> Headers:
        """Parse a field section (each line ending in CRLF) in one C-level regex pass."""
        if not block:
            return []
        lines = block.count(b"\n")
        if lines > self.limits.header_count:
            raise ParseError("too many header fields", status=431)
        headers = _split_block(block)
        if len(headers) != lines:
            # Slow path, only for invalid input: find the offending line and say why.
            return self._parse_fields(block[:-2].split(b"\r\n"), self.limits.header_count,
                                      lnames)
        lnames.extend([n.lower() for n, _ in headers])
        return headers

    def _parse_fields(self, lines: list[bytes], limit_count: int,
                      lnames: list[bytes] | None = None) -> Headers:
        """Validate field lines; lower-cased names are collected in ``lnames`` if given."""
        if len(lines) > limit_count:
            raise ParseError("too many header fields", status=431)
        headers: Headers = []
        match = _FIELD_LINE.fullmatch
        for line in lines:
            # One linear match per line: a token name directly followed by ":" (so obs-fold
            # and whitespace before the colon fail, RFC 9112 §5.1, §5.2 — both smuggling
            # vectors) and a value free of CTLs, bare CR and LF (RFC 9110 §5.5).
            m = match(line)
            if m is None:
                raise ParseError(_field_error(line))
            name, value = m.groups()
            headers.append((name, value.strip(b" \t")))
            if lnames is not None:
                lnames.append(name.lower())
        return headers

    # -- bodies -----------------------------------------------------------------------------
    def _body_event(self) -> Event:
        state = self._state
        if state is _State.BODY_LENGTH:
            return self._length_body()
        if state is _State.BODY_CLOSE:
            if self._buf:
                return self._take(len(self._buf))
            if self._eof:
                self._state = _State.DONE
                return EndOfMessage()
            return NEED_DATA
        return self._chunked_body()

    def _length_body(self) -> Event:
        if self._remaining == 0:
            self._state = _State.DONE
            return EndOfMessage()
        if not self._buf:
            if self._eof:
                raise IncompleteMessage("connection closed inside a Content-Length body")
            return NEED_DATA
        chunk = self._take(self._remaining)
        self._remaining -= len(chunk)
        return chunk

    def _read_line(self, limit: int, what: str, status: int = 400) -> bytes | None:
        buf = self._buf
        lf = buf.find(b"\n", 0, limit + 2)
        if lf == -1:
            # Decided on the bytes alone, never on how they were segmented: a line of
            # ``limit`` bytes plus CR LF is allowed however it arrives.
            if len(buf) > limit + 1:
                raise ParseError(f"{what} too long", status=status)
            if self._eof:
                raise IncompleteMessage(f"connection closed inside the {what}")
            return None
        if lf and buf[lf - 1] == 13:
            line = bytes(buf[:lf - 1])
        elif self.LONE_LF_ENDS_LINES:
            if lf > limit:  # the search allowed for a CR this line does not have
                raise ParseError(f"{what} too long", status=status)
            line = bytes(buf[:lf])  # a CR left inside fails the line's own check
        else:
            raise ParseError(f"bare LF in {what}")
        self._drop(lf + 1)
        return line

    def _chunked_body(self) -> Event:
        while True:
            state = self._state
            if state is _State.CHUNK_DATA:
                if not self._buf:
                    if self._eof:
                        raise IncompleteMessage("connection closed inside a chunk")
                    return NEED_DATA
                chunk = self._take(self._remaining)
                self._remaining -= len(chunk)
                if self._remaining == 0:
                    self._state = _State.CHUNK_CRLF
                return chunk
            if state is _State.CHUNK_SIZE:
                line = self._read_line(self.limits.chunk_line, "chunk-size line")
                if line is None:
                    return NEED_DATA
                self._remaining = _parse_chunk_size(line)
                self._state = _State.CHUNK_DATA if self._remaining else _State.TRAILERS
            elif state is _State.CHUNK_CRLF:
                if len(self._buf) < 2:
                    if self._eof:
                        raise IncompleteMessage("connection closed after chunk data")
                    return NEED_DATA
                if self._buf[:2] == b"\r\n":
                    self._drop(2)
                elif self.LONE_LF_ENDS_LINES and self._buf[:1] == b"\n":
                    self._drop(1)
                else:
                    raise ParseError("chunk data not followed by CRLF")
                self._state = _State.CHUNK_SIZE
            else:  # TRAILERS
                return self._trailer_event()

    def _trailer_event(self) -> Event:
        while True:
            line = self._read_line(self.limits.trailer_size - self._trailer_bytes,
                                   "trailer section", status=431)
            if line is None:
                return NEED_DATA
            if not line:
                trailers, self._trailers = self._trailers, []
                self._trailer_bytes = 0
                self._state = _State.DONE
                return EndOfMessage(trailers)
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > self.limits.trailer_size:
                raise ParseError("trailer section too large", status=431)
            self._trailers.extend(self._parse_fields([line], self.limits.header_count))
            if len(self._trailers) > self.limits.header_count:
                raise ParseError("too many trailer fields", status=431)

    def _enter_body(self, framing: Framing, length: int) -> None:
        if framing is Framing.LENGTH:
            self._state = _State.BODY_LENGTH
            self._remaining = length
        elif framing is Framing.CHUNKED:
            self._state = _State.CHUNK_SIZE
        elif framing is Framing.CLOSE:
            self._state = _State.BODY_CLOSE
        else:  # no body: the next event is EndOfMessage, as for every message
            self._state = _State.BODY_LENGTH
            self._remaining = 0


def _field_error(line: bytes) -> str:
    name, colon, _ = line.partition(b":")
    if not colon:
        return "header line without a colon"
    if _TOKEN.fullmatch(name) is None:
        return "invalid header field name"
    return "invalid character in header field value"


def _parse_chunk_size(line: bytes) -> int:
    m = _CHUNK_LINE.fullmatch(line)
    if m is None:
        raise ParseError("invalid chunk-size line")
    size = int(m.group(1), 16)
    if size > _MAX_CHUNK_SIZE:
        raise ParseError("chunk size too large")
    return size


def parse_content_length(values: list[bytes]) -> int | None:
    """The single Content-Length of a message, or None when absent.

    RFC 9110 §8.6 lets a recipient accept a list of identical values (``42, 42``); anything
    else — differing values, signs, spaces, non-digits — is invalid framing (RFC 9112 §6.3).
    """
    if not values:
        return None
    first = values[0]
    for v in values:
        if v != first:
            raise ParseError("conflicting Content-Length values")
    m = _DIGITS.fullmatch(first)
    if m is None:
        raise ParseError("invalid Content-Length")
    return int(m.group(1))  # the significant digits: int() refuses over 4,300 digits


def content_length_field(value: bytes) -> bytes | None:
    """A received Content-Length value as one plain number (``0005`` or ``5, 5`` -> ``5``),
    or None when it is not a valid one."""
    try:
        length = parse_content_length(list_members(value))
    except ParseError:
        return None
    return None if length is None else b"%d" % length


def lower_names(head: RequestHead | ResponseHead) -> list[bytes]:
    """Lower-cased field names of ``head`` (computed once by the parser)."""
    if len(head.lnames) != len(head.headers):
        head.lnames = [n.lower() for n, _ in head.headers]
    return head.lnames


_NO_TOKENS: frozenset[bytes] = frozenset()
# The Connection values a plain head may carry, and their token sets.
_PLAIN_CONNECTION = {b"keep-alive": frozenset({b"keep-alive"}), b"close": frozenset({b"close"})}


# A double space, or a space before a CRLF: what the plain patterns leave to check.
_NOT_CANONICAL = re.compile(rb"  | \r\n")


def _plain_spaces(buf: bytes, start: int, end: int) -> bool:
    """No double space and no space before a CRLF in the field lines ``buf[start:end + 2]``
    (start: the first field line; end: where the head's CRLF CRLF starts) — what the plain
    patterns leave to check. The start line is not scanned: an empty reason phrase is
    "200 " CRLF (RFC 9112 §4). One regex search: two ``bytes.find`` scans cost 2.5 times it."""
    return _NOT_CANONICAL.search(buf, start, end + 2) is None


def _too_many_lines(block: bytes, limit: int) -> bool:
    """More than ``limit`` lines in a matched field section; a field line is at least four
    bytes (``n:`` CRLF), so a short section is not counted at all."""
    return len(block) > 4 * limit and block.count(b"\n") > limit


def plain_ows(block: bytes) -> bool:
    """No tab, no double space, no trailing space in a field section: whitespace any next
    hop reads the same way, so the section can be forwarded as received."""
    return b"\t" not in block and b"  " not in block and b" \r\n" not in block


def _split_list(head: RequestHead | ResponseHead) -> tuple[list[bytes], list[bytes], frozenset[bytes]]:
    """Content-Length values, Transfer-Encoding codings and Connection tokens, in one pass.

    Hot path: each name is looked up in the lower-cased name list (a C-level scan); only
    fields that are present are split (RFC 9110 §5.6.1 lists, empty members dropped).
    """
    lnames = head.lnames
    headers = head.headers
    if len(lnames) != len(headers):
        lnames = lower_names(head)
    cl: list[bytes] = []
    te: list[bytes] = []
    conn = _NO_TOKENS
    if b"content-length" in lnames:
        cl = _members(headers, lnames, b"content-length", lower=False)
    if b"transfer-encoding" in lnames:
        te = _members(headers, lnames, b"transfer-encoding")
    if b"connection" in lnames:
        conn = frozenset(_members(headers, lnames, b"connection"))
    return cl, te, conn


def _members(headers: Headers, lnames: list[bytes], lname: bytes, lower: bool = True) -> list[bytes]:
    """List members of every line of field ``lname`` (RFC 9110 §5.6.1), stripped.

    With ``lower`` (codings, tokens) members are lower-cased and empty ones dropped; without
    it (Content-Length) empty members stay, so that ``42,`` or an empty value is refused.
    """
    if lnames.count(lname) == 1:
        value = headers[lnames.index(lname)][1]  # already stripped by the parser
        if b"," not in value:
            if lower:
                return [value.lower()] if value else []
            return [value]
        values = [value]
    else:
        values = [v for n, (_, v) in zip(lnames, headers) if n == lname]
    out: list[bytes] = []
    for value in values:
        if b"," in value:
            out.extend(v.strip(b" \t") for v in value.split(b","))
        else:
            out.append(value)
    return [v.lower() for v in out if v] if lower else out


def _keep_alive(version: int, tokens: frozenset[bytes]) -> bool:
    # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive".
    if not tokens:
        return version >= 11
    if b"close" in tokens:
        return False
    return version >= 11 or b"keep-alive" in tokens


class RequestParser(_Parser):
    """Parses the requests a client sends on one connection."""

    __slots__ = ("_leading_crlf",)

    def __init__(self, limits: ParserLimits | None = None) -> None:
        super().__init__(limits)
        self._leading_crlf = 0

    def next_event(self) -> Event:
        """Return the next event; raises :class:`ParseError` on invalid input."""
        state = self._state
        if state is _State.HEAD:
            return self._head_event()
        if state is _State.DONE:
            return PAUSED
        if state is _State.ERROR:
            raise ParseError("parser is in an error state")
        try:
            return self._body_event()
        except ParseError:
            self._state = _State.ERROR
            raise

    def _head_event(self) -> Event:
        try:
            buf = self._buf
            if buf[:2] == b"\r\n":
                self._skip_leading_crlf()
                buf = self._buf
            if not buf:
                if self._eof:
                    return CLOSED
                return NEED_DATA
            # A line of exactly ``limit`` bytes ends with CR LF at limit, limit + 1.
            limit = self.limits.request_line
            if len(buf) > limit + 1 and buf.find(b"\n", 0, limit + 2) == -1:
                raise ParseError("request line too long", status=414)
            if type(buf) is bytes:
                plain = self._plain_head(buf)
                if plain is not None:
                    return plain
            head = self._find_head()
            if head is None:
                if self._eof:
                    raise IncompleteMessage("connection closed inside the request head")
                return NEED_DATA
            req = self._parse_head(head)
        except ParseError:
            self._state = _State.ERROR
            raise
        self._enter_body(req.framing, req.content_length)
        return req

    def take_plain(self, data: bytes) -> RequestHead | None:
        """Feed ``data`` and return its request at once when it starts with a complete plain
        head and nothing is buffered before it (the usual keep-alive request); otherwise
        return None with nothing fed (use :meth:`feed` and :meth:`next_event`)."""
        if self._state is not _State.HEAD or self._buf or self._eof or data[:2] == b"\r\n":
            return None
        req = self._plain_head(data)
        if req is not None:
            self.bytes_in += len(data)
        return req

    def _plain_head(self, buf: bytes) -> RequestHead | None:
        """A complete, plain, body-less request head at the start of ``buf``, taken in a
        few C-level steps; None (nothing consumed) for any other."""
        end = buf.find(b"\r\n\r\n")
        if end == -1 or end + 4 > self.limits.head_size:
            return None
        m = _PLAIN_REQUEST.match(buf, 0, end + 4)
        if m is None or m.end() != end + 4 or not _plain_spaces(buf, m.start(4), end):
            return None
        method, target, minor, block = m.groups()
        limits = self.limits
        if m.start(4) - 2 > limits.request_line or _too_many_lines(block, limits.header_count):
            return None
        host = None
        tokens = _NO_TOKENS
        hop_lines = False
        for name, value in _REQUEST_SPECIAL.findall(buf, m.start(4) - 2, end + 2):
            name = name.lower()
            if name == b"host" and host is None:
                host = value
            elif name == b"connection" and not tokens:
                # What requests (keep-alive) and scripts (close) send; anything else may
                # name fields to remove: general path.
                tokens = _PLAIN_CONNECTION.get(value.lower())  # type: ignore[assignment]
                if tokens is None:
                    return None
                hop_lines = True
            elif name == b"proxy-connection" or name == b"keep-alive":
                hop_lines = True  # hop-by-hop (curl sends Proxy-Connection to proxies)
            elif name == b"authorization":
                if _CONNECTION_AUTH.match(value):
                    return None  # NTLM/Negotiate pin the upstream connection: general path
            else:
                return None  # framing, TE, Upgrade, Expect, Via, auth, a second Host
        if host is None:
            return None
        version = 11 if minor == b"1" else 10
        # RFC 9112 §6.3: no Content-Length or Transfer-Encoding, no body.
        req = RequestHead(method, target, version, None, Framing.NONE, 0,
                          _keep_alive(version, tokens), tokens, None, block)
        req.plain = True
        req.plain_host = host
        req.plain_hop_lines = hop_lines
        self._buf = buf[end + 4:] if len(buf) > end + 4 else b""
        self._scan_from = 0
        self._leading_crlf = 0
        self._state = _State.BODY_LENGTH
        self._remaining = 0
        return req

    def _skip_leading_crlf(self) -> None:
        while self._buf[:2] == b"\r\n" and self._leading_crlf < _MAX_LEADING_CRLF:
            self._drop(2)
            self._leading_crlf += 1
            self._scan_from = 0  # positions moved: scan the rest from the start

    def _parse_head(self, head: bytes) -> RequestHead:
        first, sep, block = head.partition(b"\r\n")
        m = _REQUEST_LINE.fullmatch(first) if len(first) <= self.limits.request_line else None
        if m is not None:
            method, target, minor = m.groups()
            version = 11 if minor == b"1" else 10
        else:
            method, target, version = _parse_request_line(first, self.limits.request_line)
        lnames: list[bytes] = []
        raw = block + b"\r\n" if sep else b""
        headers = self._parse_block(raw, lnames) if raw else []
        req = RequestHead(method, target, version, headers, lnames=lnames, raw_block=raw)
        if (b"content-length" in lnames or b"transfer-encoding" in lnames
                or b"connection" in lnames):
            _request_framing(req)
        else:
            req.keep_alive = version >= 11  # no body, no Connection (RFC 9112 §6.3, §9.3)
        self._leading_crlf = 0
        return req


def _parse_request_line(line: bytes, limit: int) -> tuple[bytes, bytes, int]:
    if len(line) > limit:
        raise ParseError("request line too long", status=414)
    parts = line.split(b" ")
    if len(parts) != 3:
        raise ParseError("malformed request line")
    method, target, version_b = parts
    if _TOKEN.fullmatch(method) is None:
        raise ParseError("invalid method")
    if not target or _BAD_TARGET_CHAR.search(target) is not None:
        raise ParseError("invalid request-target")
    m = _HTTP_VERSION.fullmatch(version_b)
    if m is None:
        raise ParseError("malformed HTTP version")
    if m.group(1) != b"1":
        raise ParseError("HTTP version not supported", status=505)
    return method, target, 10 if m.group(2) == b"0" else 11


def _request_framing(req: RequestHead) -> None:
    """Decide the request body length (RFC 9112 §6.3) or refuse ambiguous framing."""
    cl_values, te, conn = _split_list(req)
    req.connection_tokens = conn
    req.keep_alive = _keep_alive(req.version, req.connection_tokens)
    if te or b"transfer-encoding" in req.lnames:
        if req.version < 11:
            # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
            raise ParseError("Transfer-Encoding in an HTTP/1.0 request")
        if cl_values:
            # RFC 9112 §6.3 (3): both present is a smuggling attempt; refuse it.
            raise ParseError("both Content-Length and Transfer-Encoding")
        _check_request_codings(te)
        req.framing = Framing.CHUNKED
        return
    length = parse_content_length(cl_values)
    if length is not None:
        # Even "Content-Length: 0" is framing to keep: origins may answer 411 without it.
        req.framing = Framing.LENGTH
        req.content_length = length


def _check_request_codings(codings: list[bytes]) -> None:
    for c in codings:
        if _TOKEN.fullmatch(c) is None:
            raise ParseError("invalid Transfer-Encoding")
    if not codings or codings[-1] != b"chunked":
        # RFC 9112 §6.3 (4): a request whose final coding is not chunked cannot be framed.
        raise ParseError("Transfer-Encoding must end with chunked")
    if codings.count(b"chunked") > 1:
        raise ParseError("chunked applied more than once")
    if len(codings) > 1:
        raise ParseError("unsupported transfer coding", status=501)


class ResponseParser(_Parser):
    """Parses the responses an origin sends on one connection.

    Call :meth:`expect` with the request method before each response: a response to HEAD
    has no body whatever its fields say (RFC 9112 §6.3 (1)).
    """

    __slots__ = ("_method", "seen_bytes", "_lf_scan")

    # Origins that end lines with LF alone exist (embedded servers, CGI scripts, test
    # doubles); nginx, HAProxy and Squid accept their responses, and RFC 9112 §2.2 allows it.
    # Safe here as it is not for requests: what the client receives is re-serialised with
    # CRLF by proxyd, so no other parser ever sees the lone LF.
    LONE_LF_ENDS_LINES = True

    def __init__(self, limits: ParserLimits | None = None) -> None:
        super().__init__(limits)
        self._method = b"GET"
        self.seen_bytes = False  # any byte of the current response received
        self._lf_scan = -1  # >= 0: this head has a lone LF; where to resume looking for its end

    def expect(self, method: bytes) -> None:
        """Set the method of the request whose response comes next."""
        self._method = method
        self.seen_bytes = False

    def next_event(self) -> Event:
        """Return the next event; raises :class:`ParseError` on invalid input."""
        state = self._state
        if state is _State.HEAD:
            return self._head_event()
        if state is _State.DONE:
            return PAUSED
        if state is _State.ERROR:
            raise ParseError("parser is in an error state")
        try:
            return self._body_event()
        except ParseError:
            self._state = _State.ERROR
            raise

    def whole_response(self) -> tuple[ResponseHead, bytes | None] | None:
        """The common case in one step: the next final response, if its head is buffered.

        Returns ``(head, body)`` when the head and its whole body (Content-Length, or no
        body) are buffered with nothing after them: the parser is then past the message's
        end, as after its :class:`EndOfMessage`. Returns ``(head, None)`` when only the head
        could be taken (continue with :meth:`next_event`), and None when nothing was taken
        (no complete head, an informational status, or not at a message start). A malformed
        head raises :class:`ParseError` exactly as :meth:`next_event` would.
        """
        buf = self._buf
        if self._state is not _State.HEAD or self._eof or buf[9:10] == b"1":
            return None
        end = buf.find(b"\r\n\r\n")
        if end == -1:
            return None
        if type(buf) is bytes:
            plain = self._plain_head(buf, end)
            if plain is not None:
                self.seen_bytes = True
                self._scan_from = 0
                body_start = end + 4
                if len(buf) == body_start + plain.content_length:
                    self._buf = b""
                    self._state = _State.DONE
                    return plain, buf[body_start:]
                self._buf = buf[body_start:]
                self._enter_body(plain.framing, plain.content_length)
                return plain, None
        head = self._head_event()
        if type(head) is not ResponseHead:
            return None  # cannot happen for a complete head; next_event will tell
        if self._state is _State.BODY_LENGTH and len(self._buf) == self._remaining:
            body = self._take(self._remaining) if self._remaining else b""
            self._remaining = 0
            self._state = _State.DONE
            return head, body
        return head, None

    def _plain_head(self, buf: bytes, end: int) -> ResponseHead | None:
        """The final response head ending at ``end``, if plain: one valid Content-Length, no
        hop-by-hop field but Connection (keep-alive or close) and Keep-Alive, canonical
        whitespace, not a response to HEAD, not 204 or 304. Nothing is consumed."""
        if end + 4 > self.limits.head_size or self._method == b"HEAD":
            return None
        m = _PLAIN_RESPONSE.match(buf, 0, end + 4)
        if m is None or m.end() != end + 4 or not _plain_spaces(buf, m.start(4), end):
            return None
        minor, code, reason, block = m.groups()
        if _too_many_lines(block, self.limits.header_count):
            return None
        status = int(code)
        if status == 204 or status == 304:
            return None
        length = -1
        tokens = _NO_TOKENS
        keep_alive_field = None
        lowered = buf[:end + 2].lower()
        for name, value in _RESPONSE_SPECIAL.findall(lowered, m.start(4) - 1):
            if name == b"content-length":
                # bytes.isdigit() is ASCII 0-9 only: the same test as _DIGITS, no regex.
                if (length != -1 or not value.isdigit() or len(value) > 18
                        or (value[0] == 48 and len(value) > 1)):
                    return None  # repeated, invalid, or with leading zeros
                length = int(value)
            elif name == b"connection":
                if tokens:
                    return None  # several Connection lines: general path
                tokens = _PLAIN_CONNECTION.get(value)  # type: ignore[assignment]
                if tokens is None:
                    return None  # it names other fields to remove
            elif name == b"keep-alive" and keep_alive_field is None:
                keep_alive_field = value
            else:
                return None
        if length == -1:
            return None  # no Content-Length: close-delimited (general path)
        version = 11 if minor == b"1" else 10
        head = ResponseHead(status, reason or b"", version, None,
                            Framing.LENGTH if length else Framing.NONE, length,
                            _keep_alive(version, tokens), tokens, None, block)
        head.plain = True
        head.keep_alive_field = keep_alive_field
        head.plain_dated = b"\ndate:" in lowered  # a field line starts after a LF
        return head

    def _head_event(self) -> Event:
        if self._buf:
            self.seen_bytes = True
        try:
            head = self._find_head()
            if head is None:
                if self._eof:
                    if not self._buf:
                        return CLOSED
                    raise IncompleteMessage("connection closed inside the response head")
                return NEED_DATA
            resp = self._parse_head(head)
        except ParseError:
            self._state = _State.ERROR
            raise
        if resp.status >= 200:
            self._enter_body(resp.framing, resp.content_length)
        return resp

    def _find_head(self) -> bytes | None:
        """The head, lines ended by CRLF, once complete (see :meth:`_Parser._find_head`); a
        head with lines ended by LF alone is found by :meth:`_find_lf_head`."""
        if self._lf_scan < 0:
            try:
                return super()._find_head()
            except BareLineFeed:
                self._lf_scan = 0
        return self._find_lf_head()

    def _find_lf_head(self) -> bytes | None:
        """The head ended by an empty line after LF or CRLF line ends, with every line end
        rewritten as CRLF; None until it is complete. A CR anywhere else stays, and fails
        the status-line or field check (RFC 9112 §2.2: a bare CR is invalid)."""
        buf = self._buf
        limit = self.limits.head_size
        m = _LF_HEAD_END.search(buf, max(0, self._lf_scan - 2), limit + 2)
        if m is None:
            self._lf_scan = len(buf)
            self._check_partial_head()
            return None
        if m.end() > limit:
            raise ParseError("message head too large", status=431)
        head = bytes(buf[:m.start()])
        self._drop(m.end())
        self._scan_from = 0
        self._lf_scan = -1
        return b"\r\n".join(_LINE_END.split(head[:-1] if head[-1:] == b"\r" else head))

    def _parse_head(self, head: bytes) -> ResponseHead:
        first, sep, block = head.partition(b"\r\n")
        m = _STATUS_LINE.fullmatch(first)
        if m is None:
            raise ParseError("malformed status line")
        if m.group(1) != b"1":
            raise ParseError("unsupported HTTP version in response")
        lnames: list[bytes] = []
        raw = block + b"\r\n" if sep else b""
        headers = self._parse_block(raw, lnames) if raw else []
        _, minor, code, reason = m.groups()
        version = 10 if minor == b"0" else 11
        status = int(code)
        if not 100 <= status <= 599:
            raise ParseError("status code out of range")  # RFC 9110 §15
        resp = ResponseHead(status, reason or b"", version, headers, lnames=lnames,
                            raw_block=raw)
        _response_framing(resp, self._method)
        return resp


def _response_framing(resp: ResponseHead, method: bytes) -> None:
    """Decide the response body length (RFC 9112 §6.3)."""
    cl_values, te, conn = _split_list(resp)
    resp.connection_tokens = conn
    resp.keep_alive = _keep_alive(resp.version, resp.connection_tokens)
    status = resp.status
    if status < 200 or status in (204, 304) or method == b"HEAD":
        resp.framing = Framing.NONE
        if cl_values and method == b"HEAD":
            parse_content_length(cl_values)  # still reject garbage
        return
    if te:
        if cl_values:
            raise ParseError("response has both Content-Length and Transfer-Encoding")
        if resp.version < 11:
            resp.keep_alive = False  # RFC 9112 §6.1: faulty framing; close after it
        if te != [b"chunked"]:
            raise ParseError("unsupported Transfer-Encoding in response")
        resp.framing = Framing.CHUNKED
        return
    length = parse_content_length(cl_values)
    if length is None:
        resp.framing = Framing.CLOSE
        resp.keep_alive = False
    else:
        resp.framing = Framing.LENGTH if length else Framing.NONE
        resp.content_length = length


# -- serialising -----------------------------------------------------------------------------

def serialize_head(first_line: bytes, headers: Headers) -> bytes:
    """Serialise a start line and fields into a head ending with the blank line."""
    parts = [first_line]
    for name, value in headers:
        parts.append(name + b": " + value)
    parts.append(b"\r\n")
    return b"\r\n".join(parts)


def chunk_frame(data: bytes) -> list[bytes]:
    """Frame ``data`` as one chunk with a canonical size line (RFC 9112 §7.1)."""
    return [b"%x\r\n" % len(data), data, b"\r\n"]


def last_chunk(trailers: Headers) -> bytes:
    """The last-chunk, trailer section and final CRLF of a chunked body."""
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
