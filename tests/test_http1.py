"""Sans-I/O unit tests for the HTTP/1.1 parser and serialiser in :mod:`proxyd.http1`.

Every case is driven through the parser in several feeding modes which must agree
(see :func:`check_parses` / :func:`check_rejects`):

(a) the whole input in one ``feed``;
(b) one byte per ``feed``, draining ``next_event`` until ``NEED_DATA`` after every byte;
(c) the input followed by a pipelined second message in one ``feed``: the first message's
    events must be identical, exactly the trailing bytes must remain buffered when the
    parser pauses, and they must parse as the next message after ``start_next()``;
(d) for short inputs, every split of the input into two ``feed`` calls.

A parser whose result depends on how TCP happened to segment the stream is a request
smuggling vector (RFC 9112 §11.2), which is why agreement between modes is checked for
every case, valid or not.

Cases marked ``# Regression (was a bug):`` once failed; they keep the fixes in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from proxyd.errors import ParseError
from proxyd.http1 import (
    authenticates_connection,
    CLOSED,
    NEED_DATA,
    PAUSED,
    EndOfMessage,
    Framing,
    IncompleteMessage,
    ParserLimits,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    chunk_frame,
    field_values,
    last_chunk,
    parse_content_length,
    serialize_head,
)

# ============================================================================================
# Driving helper
# ============================================================================================

SPLIT_ALL_MAX = 400  # inputs up to this size are also fed split at every position (mode d)


@dataclass
class Trace:
    """What one feeding of an input produced."""

    events: list = field(default_factory=list)   # normalised: heads, joined bytes, EndOfMessage
    paused_buffered: list[int] = field(default_factory=list)  # parser.buffered at each PAUSED
    idle_before_eof: bool = False   # all data consumed and waiting for a new message pre-EOF
    closed: bool = False            # CLOSED was returned after EOF
    error: ParseError | None = None
    error_at_eof: bool = False      # the error surfaced only after feed(b"")
    error_offset: int = 0           # bytes fed when the error surfaced


def _append(events: list, ev) -> None:
    if type(ev) is bytes:
        # An empty data event would be framed as a last-chunk by chunk_frame(): never allowed.
        assert ev, "parser emitted an empty bytes event"
        if events and type(events[-1]) is bytes:
            events[-1] += ev
            return
    events.append(ev)


def run(make_parser, pieces: list[bytes], methods: tuple[bytes, ...] = (),
        eof: bool = True) -> Trace:
    """Feed ``pieces`` one by one, draining events after each; then EOF if ``eof``.

    For a ResponseParser, ``methods`` are passed to ``expect()`` before each response
    (``GET`` once they run out).
    """
    parser = make_parser()
    trace = Trace()
    pending = list(methods)
    is_response = isinstance(parser, ResponseParser)

    def expect_next() -> None:
        if is_response:
            parser.expect(pending.pop(0) if pending else b"GET")

    def drain() -> None:
        while True:
            ev = parser.next_event()
            if ev is NEED_DATA:
                # NEED_DATA is stable: asking again without feeding changes nothing.
                assert parser.next_event() is NEED_DATA
                return
            if ev is CLOSED:
                trace.closed = True
                return
            if ev is PAUSED:
                assert parser.done
                trace.paused_buffered.append(parser.buffered)
                parser.start_next()
                expect_next()
                continue
            assert not trace.closed, "event after CLOSED"
            _append(trace.events, ev)

    expect_next()
    fed = 0
    try:
        for piece in pieces:
            if not piece:
                continue  # feed(b"") means EOF
            parser.feed(piece)
            fed += len(piece)
            drain()
            assert not trace.closed, "CLOSED before EOF"
    except ParseError as exc:
        trace.error, trace.error_offset = exc, fed
        return trace
    trace.idle_before_eof = parser.in_head and parser.buffered == 0
    if eof:
        try:
            parser.feed(b"")
            drain()
        except ParseError as exc:
            trace.error, trace.error_at_eof, trace.error_offset = exc, True, fed
    return trace


def _modes(data: bytes) -> dict[str, list[bytes]]:
    modes = {"one-shot": [data], "byte-by-byte": [data[i:i + 1] for i in range(len(data))]}
    if len(data) <= SPLIT_ALL_MAX:
        for i in range(1, len(data)):
            modes[f"split@{i}"] = [data[:i], data[i:]]
    return modes


def check_parses(make_parser, data: bytes, expected: list, *, methods=(),
                 pipelined: bytes | None = None, pipelined_events: list | None = None) -> Trace:
    """Assert ``data`` parses to ``expected`` (then a clean EOF) in every feeding mode."""
    ref = None
    for mode, pieces in _modes(data).items():
        trace = run(make_parser, pieces, methods)
        assert trace.error is None, f"{mode}: unexpected {trace.error!r}"
        assert trace.events == expected, f"{mode}: events differ"
        assert trace.closed, f"{mode}: EOF after the last message must give CLOSED"
        if ref is None:
            ref = trace  # the one-shot trace
    assert ref is not None
    # (c) pipelined data after the message(s): same events, trailing bytes left in place.
    if pipelined is not None:
        assert ref.idle_before_eof, "message not complete before EOF: cannot pipeline after it"
        trace = run(make_parser, [data + pipelined], methods)
        assert trace.error is None, f"pipelined: unexpected {trace.error!r}"
        n = len(ref.paused_buffered)
        assert trace.events[:len(expected)] == expected, "pipelined: first message differs"
        assert trace.paused_buffered[:n] == [b + len(pipelined) for b in ref.paused_buffered], \
            "pipelined: the parser consumed bytes of the next message"
        assert trace.events[len(expected):] == pipelined_events
        assert trace.closed
    return ref


def check_rejects(make_parser, data: bytes, status: int, *, when: str = "data",
                  exc_type: type[ParseError] = ParseError, upto: bytes | None = None,
                  methods=(), pipelined: bytes | None = None) -> None:
    """Assert ``data`` raises ``exc_type`` with ``status`` in every feeding mode.

    ``when="data"``: the error must surface while the data is fed (before EOF), in the
    byte-by-byte mode at the latest once ``upto`` (a prefix of ``data``) has been fed.
    ``when="eof"``: the data is an incomplete message; the error may surface only at EOF.
    """
    assert when in ("data", "eof")
    for mode, pieces in _modes(data).items():
        trace = run(make_parser, pieces, methods)
        err = trace.error
        assert err is not None, f"{mode}: parsed successfully: {trace.events!r}"
        assert isinstance(err, exc_type), f"{mode}: {err!r} is not a {exc_type.__name__}"
        assert err.status == status, f"{mode}: status {err.status} ({err.reason})"
        assert trace.error_at_eof == (when == "eof"), \
            f"{mode}: error surfaced {'at EOF' if trace.error_at_eof else 'before EOF'}"
        if upto is not None and mode == "byte-by-byte":
            assert data.startswith(upto)
            assert trace.error_offset <= len(upto), \
                f"error surfaced only after {trace.error_offset} bytes, not by {len(upto)}"
    if when == "data" and pipelined is not None:
        trace = run(make_parser, [data + pipelined], methods)
        assert trace.error is not None and trace.error.status == status, \
            f"pipelined: {trace.error!r}, events {trace.events!r}"


# ============================================================================================
# Builders
# ============================================================================================

EOM = EndOfMessage()
T = b"http://example.test/"
HOST = (b"Host", b"example.test")
NEXT_REQUEST = b"GET http://next.test/n HTTP/1.1\r\nHost: next.test\r\n\r\n"
NEXT_REQUEST_EVENTS = [RequestHead(b"GET", b"http://next.test/n", 11, [(b"Host", b"next.test")]),
                       EOM]
NEXT_RESPONSE = b"HTTP/1.1 204 No Content\r\nX-Next: 1\r\n\r\n"
NEXT_RESPONSE_EVENTS = [ResponseHead(204, b"No Content", 11, [(b"X-Next", b"1")]), EOM]


def rq(*headers, method=b"GET", target=T, version=11, framing=Framing.NONE, length=0,
       keep_alive=True, tokens=()) -> RequestHead:
    """Expected request head."""
    return RequestHead(method, target, version, list(headers), framing, length, keep_alive,
                       frozenset(tokens))


def rs(status, reason, *headers, version=11, framing=Framing.NONE, length=0,
       keep_alive=True, tokens=()) -> ResponseHead:
    """Expected response head."""
    return ResponseHead(status, reason, version, list(headers), framing, length, keep_alive,
                        frozenset(tokens))


def head(*lines: bytes, start: bytes = b"GET " + T + b" HTTP/1.1") -> bytes:
    """A request head from a start line and field lines (CRLF-terminated)."""
    return b"".join(line + b"\r\n" for line in (start, *lines)) + b"\r\n"


def post(*lines: bytes) -> bytes:
    return head(b"Host: example.test", *lines, start=b"POST " + T + b" HTTP/1.1")


def chunked_post(body: bytes) -> bytes:
    return post(b"Transfer-Encoding: chunked") + body


def limited(**kw):
    return lambda: RequestParser(ParserLimits(**kw))


CHUNKED_HEAD = rq(HOST, (b"Transfer-Encoding", b"chunked"), method=b"POST",
                  framing=Framing.CHUNKED)


def chunked_head(te: bytes = b"chunked") -> RequestHead:
    return rq(HOST, (b"Transfer-Encoding", te), method=b"POST", framing=Framing.CHUNKED)


# ============================================================================================
# Requests: valid messages
# ============================================================================================

VALID_REQUESTS = [
    # -- start line (RFC 9112 §3) -----------------------------------------------------------
    pytest.param(
        b"GET http://example.test/a/b?c=d&e HTTP/1.1\r\nHost: example.test\r\n"
        b"Accept: */*\r\n\r\n",
        [rq(HOST, (b"Accept", b"*/*"), target=b"http://example.test/a/b?c=d&e"), EOM],
        id="get-absolute-form"),
    pytest.param(
        b"GET http://example.test/ HTTP/1.0\r\n\r\n",
        [rq(version=10, keep_alive=False), EOM],
        id="http10-closes-by-default"),
    pytest.param(
        b"GET http://example.test/ HTTP/1.2\r\nHost: example.test\r\n\r\n",
        [rq(HOST), EOM],
        id="http12-treated-as-11"),  # RFC 9110 §2.5: higher minor → highest supported
    pytest.param(
        b"OPTIONS * HTTP/1.1\r\nHost: example.test\r\n\r\n",
        [rq(HOST, method=b"OPTIONS", target=b"*"), EOM],
        id="asterisk-form"),
    pytest.param(
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
        [rq((b"Host", b"example.test:443"), method=b"CONNECT", target=b"example.test:443"),
         EOM],
        id="authority-form"),
    pytest.param(
        b"GET /origin/form HTTP/1.1\r\nHost: example.test\r\n\r\n",
        [rq(HOST, target=b"/origin/form"), EOM],
        id="origin-form"),
    pytest.param(
        b"M-SEARCH! " + T + b" HTTP/1.1\r\n\r\n",
        [rq(method=b"M-SEARCH!"), EOM],
        id="extension-method-token"),
    pytest.param(
        b"\r\nGET " + T + b" HTTP/1.1\r\n\r\n",
        [rq(), EOM],
        id="one-leading-crlf"),  # RFC 9112 §2.2: SHOULD ignore at least one empty line
    pytest.param(
        b"\r\n" * 8 + b"GET " + T + b" HTTP/1.1\r\n\r\n",
        [rq(), EOM],
        id="eight-leading-crlf"),
    # -- persistence (RFC 9112 §9.3) --------------------------------------------------------
    pytest.param(
        head(b"Host: example.test"),
        [rq(HOST), EOM],
        id="http11-keep-alive-by-default"),
    pytest.param(
        head(b"Host: example.test", b"Connection: close"),
        [rq(HOST, (b"Connection", b"close"), keep_alive=False, tokens=[b"close"]), EOM],
        id="http11-connection-close"),
    pytest.param(
        head(b"Connection: Keep-Alive", start=b"GET " + T + b" HTTP/1.0"),
        [rq((b"Connection", b"Keep-Alive"), version=10, tokens=[b"keep-alive"]), EOM],
        id="http10-connection-keep-alive"),
    pytest.param(
        head(b"Connection: keep-alive, close", start=b"GET " + T + b" HTTP/1.0"),
        [rq((b"Connection", b"keep-alive, close"), version=10, keep_alive=False,
            tokens=[b"keep-alive", b"close"]), EOM],
        id="http10-close-wins-over-keep-alive"),
    pytest.param(
        head(b"Connection: X-Custom ,\tUPGRADE", b"connection: TE,, close"),
        [rq((b"Connection", b"X-Custom ,\tUPGRADE"), (b"connection", b"TE,, close"),
            keep_alive=False, tokens=[b"x-custom", b"upgrade", b"te", b"close"]), EOM],
        id="connection-tokens-lowercased-and-merged"),
    # -- fields (RFC 9112 §5, RFC 9110 §5) --------------------------------------------------
    pytest.param(
        head(b"hOsT: example.test", b"X-A: 1", b"x-a: 2", b"X-A: 3"),
        [rq((b"hOsT", b"example.test"), (b"X-A", b"1"), (b"x-a", b"2"), (b"X-A", b"3")), EOM],
        id="names-keep-case-repeats-keep-order"),
    pytest.param(
        head(b"X-Ows: \t  padded value \t ", b"X-Empty:", b"X-Empty-Ows: \t "),
        [rq((b"X-Ows", b"padded value"), (b"X-Empty", b""), (b"X-Empty-Ows", b"")), EOM],
        id="ows-stripped-empty-values-allowed"),
    pytest.param(
        head(b"X-Text: caf\xc3\xa9 \x80\xff\tinner tab", b"X-Colon: a:b::c"),
        [rq((b"X-Text", b"caf\xc3\xa9 \x80\xff\tinner tab"), (b"X-Colon", b"a:b::c")), EOM],
        id="obs-text-tab-and-colons-in-value"),
    pytest.param(
        head(b"!#$%&'*+-.^_`|~09azAZ: tchar"),
        [rq((b"!#$%&'*+-.^_`|~09azAZ", b"tchar")), EOM],
        id="every-tchar-in-name"),
    # -- Content-Length (RFC 9112 §6.2, RFC 9110 §8.6) -------------------------------------
    pytest.param(
        post(b"Content-Length: 5") + b"hello",
        [rq(HOST, (b"Content-Length", b"5"), method=b"POST", framing=Framing.LENGTH,
            length=5), b"hello", EOM],
        id="content-length-body"),
    pytest.param(
        post(b"Content-Length: 0"),
        [rq(HOST, (b"Content-Length", b"0"), method=b"POST", framing=Framing.LENGTH,
            length=0), EOM],
        id="content-length-zero-no-body"),
    pytest.param(
        post(b"Content-Length: 3, 3", b"content-length: 3") + b"abc",
        [rq(HOST, (b"Content-Length", b"3, 3"), (b"content-length", b"3"), method=b"POST",
            framing=Framing.LENGTH, length=3), b"abc", EOM],
        id="identical-content-length-list"),  # RFC 9110 §8.6 MAY accept
    pytest.param(
        post(b"Content-Length: 007") + b"1234567",
        [rq(HOST, (b"Content-Length", b"007"), method=b"POST", framing=Framing.LENGTH,
            length=7), b"1234567", EOM],
        id="content-length-leading-zeros"),
    pytest.param(
        post(b"Content-Length: 4") + b"a\r\nb",
        [rq(HOST, (b"Content-Length", b"4"), method=b"POST", framing=Framing.LENGTH,
            length=4), b"a\r\nb", EOM],
        id="crlf-inside-body-is-data"),
    pytest.param(
        head(b"Transfer_Encoding: chunked", b"Content_Length: 5"),
        [rq((b"Transfer_Encoding", b"chunked"), (b"Content_Length", b"5")), EOM],
        id="underscore-names-are-other-fields"),
    # -- chunked (RFC 9112 §7.1) ------------------------------------------------------------
    pytest.param(
        chunked_post(b"5;ext=1\r\nhello\r\n6;a=\"q;\\\"x\";b\r\n world\r\n"
                     b"0;last\r\nX-Trailer: yes\r\nx-other:  two \r\n\r\n"),
        [CHUNKED_HEAD, b"hello world",
         EndOfMessage([(b"X-Trailer", b"yes"), (b"x-other", b"two")])],
        id="chunked-extensions-and-trailers"),
    pytest.param(
        chunked_post(b"A\r\n0123456789\r\n1F\r\n" + b"x" * 31 + b"\r\nb\r\n" + b"y" * 11
                     + b"\r\n0\r\n\r\n"),
        [CHUNKED_HEAD, b"0123456789" + b"x" * 31 + b"y" * 11, EOM],
        id="chunked-upper-and-lower-hex"),
    pytest.param(
        chunked_post(b"0000000000000003\r\nabc\r\n000\r\n\r\n"),
        [CHUNKED_HEAD, b"abc", EOM],
        id="chunk-size-16-digits-leading-zeros"),
    # RFC 9112 §7.1: chunk-size = 1*HEXDIG, last-chunk = 1*("0"): any number of leading
    # zeros (nginx and HAProxy take them; a sweep found these refused)
    pytest.param(
        chunked_post(b"00000000000000005\r\nhello\r\n" + b"0" * 40 + b"\r\n\r\n"),
        [CHUNKED_HEAD, b"hello", EOM],
        id="chunk-size-17-digits-leading-zeros"),
    pytest.param(
        chunked_post(b"3 ;\ta = b ;c\t=\"d e\"\r\nabc\r\n0\r\n\r\n"),
        [CHUNKED_HEAD, b"abc", EOM],
        id="chunk-ext-bws"),  # RFC 9112 §7.1.1: BWS around ';' and '='
    pytest.param(
        chunked_post(b"1\r\n\n\r\n2\r\n\r\n\r\n0\r\n\r\n"),
        [CHUNKED_HEAD, b"\n\r\n", EOM],
        id="crlf-bytes-inside-chunk-data"),
    pytest.param(
        chunked_post(b"0\r\n\r\n"),
        [CHUNKED_HEAD, EOM],
        id="chunked-empty-body"),
    pytest.param(
        post(b"Transfer-Encoding: CHUNKED") + b"1\r\na\r\n0\r\n\r\n",
        [chunked_head(b"CHUNKED"), b"a", EOM],
        id="te-case-insensitive"),  # RFC 9112 §7: coding names are case-insensitive
    pytest.param(
        post(b"Transfer-Encoding: chunked \t") + b"1\r\na\r\n0\r\n\r\n",
        [chunked_head(), b"a", EOM],
        id="te-trailing-ows-stripped"),
    pytest.param(
        post(b"Transfer-Encoding:\tchunked") + b"1\r\na\r\n0\r\n\r\n",
        [chunked_head(), b"a", EOM],
        id="te-leading-tab-ows"),
    pytest.param(
        post(b"Transfer-Encoding: ,chunked, ") + b"1\r\na\r\n0\r\n\r\n",
        [chunked_head(b",chunked,"), b"a", EOM],
        id="te-empty-list-elements-ignored"),  # RFC 9110 §5.6.1
    # -- pipelining (RFC 9112 §9.3.2) -------------------------------------------------------
    pytest.param(
        head(b"Host: example.test")
        + post(b"Content-Length: 3") + b"abc"
        + b"\r\n"  # stray CRLF after a body: skipped as a leading empty line
        + chunked_post(b"2\r\nxy\r\n0\r\n\r\n")
        + head(start=b"GET " + T + b" HTTP/1.0"),
        [rq(HOST), EOM,
         rq(HOST, (b"Content-Length", b"3"), method=b"POST", framing=Framing.LENGTH, length=3),
         b"abc", EOM,
         CHUNKED_HEAD, b"xy", EOM,
         rq(version=10, keep_alive=False), EOM],
        id="pipelined-four-requests"),
    pytest.param(
        b"\r\n" * 8 + head(b"Host: example.test") + b"\r\n" * 8 + head(b"Host: example.test"),
        [rq(HOST), EOM, rq(HOST), EOM],
        id="leading-crlf-budget-per-message"),
]


@pytest.mark.parametrize("data, expected", VALID_REQUESTS)
def test_request_parses(data, expected):
    """Valid requests (RFC 9112 §2-§7) parse identically however the bytes arrive."""
    check_parses(RequestParser, data, expected, pipelined=NEXT_REQUEST,
                 pipelined_events=NEXT_REQUEST_EVENTS)


# ============================================================================================
# Requests: rejections
# ============================================================================================

G = b"GET " + T + b" HTTP/1.1\r\n"

INVALID_REQUESTS = [
    # -- whitespace and line endings (RFC 9112 §2.2, §5.1, §5.2) ---------------------------
    pytest.param(G + b"Host: a\r\n folded\r\n\r\n", 400, None, id="obs-fold-space"),
    pytest.param(G + b"Host: a\r\n\tfolded\r\n\r\n", 400, None, id="obs-fold-tab"),
    pytest.param(G + b" Host: a\r\n\r\n", 400, None, id="ws-before-first-field"),
    pytest.param(G + b"Transfer-Encoding:\r\n chunked\r\n\r\n", 400, None,
                 id="obs-fold-te-value"),
    pytest.param(G + b"Host : a\r\n\r\n", 400, None, id="space-before-colon"),
    pytest.param(G + b"Host\t: a\r\n\r\n", 400, None, id="tab-before-colon"),
    pytest.param(b"GET " + T + b" HTTP/1.1\nHost: a\r\n\r\n", 400,
                 b"GET " + T + b" HTTP/1.1\n", id="bare-lf-after-request-line"),
    pytest.param(G + b"Host: a\nX: b\r\n\r\n", 400, G + b"Host: a\n",
                 id="bare-lf-ends-field"),
    pytest.param(G + b"Host: a\r\n\n", 400, G + b"Host: a\r\n\n",
                 id="bare-lf-ends-head"),
    pytest.param(b"GET " + T + b" HTTP/1.1\n\n", 400, None, id="bare-lf-only"),
    pytest.param(b"\nGET " + T + b" HTTP/1.1\r\n\r\n", 400, b"\n", id="leading-bare-lf"),
    pytest.param(b"\r\n" * 9 + G + b"\r\n", 400, None, id="nine-leading-crlf"),
    pytest.param(G + b"X: a\rb\r\n\r\n", 400, None, id="bare-cr-in-value"),
    pytest.param(G + b"X: a\r\r\n\r\n", 400, None, id="bare-cr-before-crlf"),
    pytest.param(G + b"X\r: a\r\n\r\n", 400, None, id="bare-cr-in-name"),
    pytest.param(b"GET " + T + b"\r HTTP/1.1\r\n\r\n", 400, None, id="bare-cr-in-target"),
    # -- field values (RFC 9110 §5.5) -------------------------------------------------------
    pytest.param(G + b"X: a\x00b\r\n\r\n", 400, None, id="nul-in-value"),
    pytest.param(G + b"X: \x01\r\n\r\n", 400, None, id="soh-in-value"),
    pytest.param(G + b"X: a\x0bb\r\n\r\n", 400, None, id="vt-in-value"),
    pytest.param(G + b"X: a\x0cb\r\n\r\n", 400, None, id="ff-in-value"),
    pytest.param(G + b"X: a\x1bb\r\n\r\n", 400, None, id="esc-in-value"),
    pytest.param(G + b"X: a\x7fb\r\n\r\n", 400, None, id="del-in-value"),
    # -- field names (RFC 9110 §5.1, §5.6.2: field-name = token) ----------------------------
    pytest.param(G + b"X(Y): z\r\n\r\n", 400, None, id="name-parens"),
    pytest.param(G + b"X Y: z\r\n\r\n", 400, None, id="name-space"),
    pytest.param(G + b": z\r\n\r\n", 400, None, id="name-empty"),
    pytest.param(G + b"X@Y: z\r\n\r\n", 400, None, id="name-at"),
    pytest.param(G + b"X/Y: z\r\n\r\n", 400, None, id="name-slash"),
    pytest.param(G + b"\"X\": z\r\n\r\n", 400, None, id="name-dquote"),
    pytest.param(G + b"X\x00: z\r\n\r\n", 400, None, id="name-nul"),
    pytest.param(G + b"caf\xc3\xa9: z\r\n\r\n", 400, None, id="name-non-ascii"),
    pytest.param(G + b"NoColonHere\r\n\r\n", 400, None, id="line-without-colon"),
    # -- Content-Length (RFC 9110 §8.6, RFC 9112 §6.3 (5)) ----------------------------------
    pytest.param(post(b"Content-Length: 3", b"Transfer-Encoding: chunked") + b"0\r\n\r\n",
                 400, None, id="cl-then-te"),
    pytest.param(post(b"Transfer-Encoding: chunked", b"Content-Length: 3") + b"0\r\n\r\n",
                 400, None, id="te-then-cl"),
    pytest.param(post(b"Transfer-Encoding: chunked", b"Content-Length: 0") + b"0\r\n\r\n",
                 400, None, id="te-with-cl-zero"),
    pytest.param(post(b"Content-Length: 1", b"Content-Length: 2") + b"ab", 400, None,
                 id="cl-two-differing-fields"),
    pytest.param(post(b"Content-Length: 1, 2") + b"ab", 400, None, id="cl-differing-list"),
    pytest.param(post(b"Content-Length: 5", b"Content-Length: 05") + b"hello", 400, None,
                 id="cl-differing-spelling"),
    pytest.param(post(b"Content-Length: +5") + b"hello", 400, None, id="cl-plus-sign"),
    pytest.param(post(b"Content-Length: -1"), 400, None, id="cl-negative"),
    pytest.param(post(b"Content-Length: 0x5") + b"hello", 400, None, id="cl-hex"),
    pytest.param(post(b"Content-Length: 5 5") + b"hello", 400, None, id="cl-inner-space"),
    pytest.param(post(b"Content-Length: 5.0") + b"hello", 400, None, id="cl-decimal-point"),
    pytest.param(post(b"Content-Length: 5e0") + b"hello", 400, None, id="cl-exponent"),
    pytest.param(post(b"Content-Length:") + b"hello", 400, None, id="cl-empty"),
    pytest.param(post(b"Content-Length: \xd9\xa5") + b"hello", 400, None,
                 id="cl-non-ascii-digit"),
    pytest.param(post(b"Content-Length: 1234567890123456789"), 400, None,
                 id="cl-19-digits-overflow-guard"),
    # -- Transfer-Encoding (RFC 9112 §6.1, §6.3 (4)) ----------------------------------------
    pytest.param(post(b"Transfer-Encoding: chunked, gzip") + b"0\r\n\r\n", 400, None,
                 id="te-chunked-not-last"),
    pytest.param(post(b"Transfer-Encoding: chunked, chunked") + b"0\r\n\r\n", 400, None,
                 id="te-chunked-twice-list"),
    pytest.param(post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")
                 + b"0\r\n\r\n", 400, None, id="te-chunked-twice-fields"),
    pytest.param(post(b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n", 501, None,
                 id="te-unknown-coding-before-chunked"),
    pytest.param(post(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked")
                 + b"0\r\n\r\n", 501, None, id="te-unknown-coding-separate-field"),
    pytest.param(post(b"Transfer-Encoding: gzip") + b"0\r\n\r\n", 400, None,
                 id="te-gzip-only"),
    pytest.param(post(b"Transfer-Encoding: identity") + b"0\r\n\r\n", 400, None,
                 id="te-identity"),
    pytest.param(post(b"Transfer-Encoding: xchunked") + b"0\r\n\r\n", 400, None,
                 id="te-xchunked"),
    pytest.param(post(b"Transfer-Encoding: chunkedx") + b"0\r\n\r\n", 400, None,
                 id="te-chunkedx"),
    pytest.param(post(b"Transfer-Encoding: \"chunked\"") + b"0\r\n\r\n", 400, None,
                 id="te-quoted"),
    pytest.param(post(b"Transfer-Encoding: ch unked") + b"0\r\n\r\n", 400, None,
                 id="te-inner-space"),
    pytest.param(post(b"Transfer-Encoding: chunked\x0b") + b"0\r\n\r\n", 400, None,
                 id="te-trailing-vt"),
    pytest.param(post(b"Transfer-Encoding: \x0cchunked") + b"0\r\n\r\n", 400, None,
                 id="te-leading-ff"),
    pytest.param(post(b"Transfer-Encoding:") + b"0\r\n\r\n", 400, None, id="te-empty"),
    pytest.param(post(b"Transfer-Encoding : chunked") + b"0\r\n\r\n", 400, None,
                 id="te-space-before-colon"),
    pytest.param(head(b"Transfer-Encoding: chunked", start=b"POST " + T + b" HTTP/1.0")
                 + b"0\r\n\r\n", 400, None, id="te-in-http10"),
    # -- chunk-size line (RFC 9112 §7.1, §7.1.1) --------------------------------------------
    pytest.param(chunked_post(b"0x5\r\nhello\r\n0\r\n\r\n"), 400, None, id="chunk-0x-prefix"),
    pytest.param(chunked_post(b"+5\r\nhello\r\n0\r\n\r\n"), 400, None, id="chunk-plus"),
    pytest.param(chunked_post(b"-1\r\nx\r\n0\r\n\r\n"), 400, None, id="chunk-negative"),
    pytest.param(chunked_post(b"5 \r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-trailing-space"),
    pytest.param(chunked_post(b"5\t\r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-trailing-tab"),
    pytest.param(chunked_post(b" 5\r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-leading-space"),
    pytest.param(chunked_post(b"\r\nhello\r\n0\r\n\r\n"), 400, None, id="chunk-empty-size"),
    pytest.param(chunked_post(b"10000000000000005\r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-17-significant-hex-digits"),
    pytest.param(chunked_post(b"ffffffffffffffff\r\nx\r\n0\r\n\r\n"), 400, None,
                 id="chunk-size-too-large"),
    pytest.param(chunked_post(b"g\r\nx\r\n0\r\n\r\n"), 400, None, id="chunk-non-hex"),
    pytest.param(chunked_post(b"5;\r\nhello\r\n0\r\n\r\n"), 400, None, id="chunk-ext-empty"),
    pytest.param(chunked_post(b"5;a=\r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-ext-empty-value"),
    pytest.param(chunked_post(b"5;a b\r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-ext-space-in-name"),
    pytest.param(chunked_post(b"5;a=b c\r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-ext-space-in-value"),
    pytest.param(chunked_post(b"5;\"a\"\r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-ext-quoted-name"),
    pytest.param(chunked_post(b"5;a=\"b\r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-ext-unterminated-quote"),
    pytest.param(chunked_post(b"5;a=\x01\r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-ext-ctl"),
    pytest.param(chunked_post(b"5\x00\r\nhello\r\n0\r\n\r\n"), 400, None, id="chunk-size-nul"),
    pytest.param(chunked_post(b"5\nhello\r\n0\r\n\r\n"), 400,
                 chunked_post(b"5\n"), id="chunk-size-bare-lf"),
    pytest.param(chunked_post(b"5\r\r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-size-bare-cr"),
    pytest.param(chunked_post(b"5\r\nhelloXX0\r\n\r\n"), 400, None,
                 id="chunk-data-not-followed-by-crlf"),
    pytest.param(chunked_post(b"5\r\nhello\n0\r\n\r\n"), 400, None,
                 id="chunk-data-followed-by-bare-lf"),
    pytest.param(chunked_post(b"3\r\nhello\r\n0\r\n\r\n"), 400, None,
                 id="chunk-data-longer-than-size"),
    # -- trailer section (RFC 9112 §7.1.2) --------------------------------------------------
    pytest.param(chunked_post(b"0\r\nX: a\n\r\n"), 400, None, id="trailer-bare-lf"),
    pytest.param(chunked_post(b"0\r\nX: a\r\n b\r\n\r\n"), 400, None, id="trailer-obs-fold"),
    pytest.param(chunked_post(b"0\r\nX : a\r\n\r\n"), 400, None,
                 id="trailer-space-before-colon"),
    pytest.param(chunked_post(b"0\r\nNoColon\r\n\r\n"), 400, None, id="trailer-no-colon"),
    pytest.param(chunked_post(b"0\r\nX: a\x00\r\n\r\n"), 400, None, id="trailer-nul"),
    # -- request line (RFC 9112 §3, §2.3) ---------------------------------------------------
    pytest.param(b"GET " + T + b" HTTP/2.0\r\n\r\n", 505, None, id="http2-0"),
    pytest.param(b"GET " + T + b" HTTP/3.0\r\n\r\n", 505, None, id="http3-0"),
    pytest.param(b"GET " + T + b" HTTP/0.9\r\n\r\n", 505, None, id="http0-9"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, None, id="h2-preface"),
    pytest.param(b"GET " + T + b" http/1.1\r\n\r\n", 400, None, id="lowercase-http-name"),
    pytest.param(b"GET " + T + b" HTTP/1\r\n\r\n", 400, None, id="version-no-minor"),
    pytest.param(b"GET " + T + b" HTTP/1.10\r\n\r\n", 400, None, id="version-two-digit-minor"),
    pytest.param(b"GET " + T + b" HTTP/01.1\r\n\r\n", 400, None, id="version-two-digit-major"),
    pytest.param(b"GET " + T + b"\r\n\r\n", 400, None, id="http09-style-no-version"),
    pytest.param(b"GET  " + T + b" HTTP/1.1\r\n\r\n", 400, None, id="double-space-after-method"),
    pytest.param(b"GET " + T + b"  HTTP/1.1\r\n\r\n", 400, None, id="double-space-after-target"),
    pytest.param(b"GET " + T + b" HTTP/1.1 \r\n\r\n", 400, None, id="trailing-space"),
    pytest.param(b" GET " + T + b" HTTP/1.1\r\n\r\n", 400, None, id="leading-space"),
    pytest.param(b"GET\t" + T + b"\tHTTP/1.1\r\n\r\n", 400, None, id="tab-separators"),
    pytest.param(b"GET http://example.test/a b HTTP/1.1\r\n\r\n", 400, None,
                 id="space-in-target"),
    pytest.param(b"GET http://example.test/a\x01b HTTP/1.1\r\n\r\n", 400, None,
                 id="ctl-in-target"),
    pytest.param(b"GET http://example.test/a\x7fb HTTP/1.1\r\n\r\n", 400, None,
                 id="del-in-target"),
    pytest.param(b"GET http://example.test/\xc3\xa9 HTTP/1.1\r\n\r\n", 400, None,
                 id="non-ascii-in-target"),
    pytest.param(b"G(T " + T + b" HTTP/1.1\r\n\r\n", 400, None, id="method-not-token"),
]


@pytest.mark.parametrize("data, status, upto", INVALID_REQUESTS)
def test_request_rejected(data, status, upto):
    """Invalid requests raise ParseError with the status to answer, however fed."""
    check_rejects(RequestParser, data, status, upto=upto, pipelined=NEXT_REQUEST)


def test_error_state_is_sticky():
    """After a ParseError the connection is unusable: every later call raises too."""
    p = RequestParser()
    p.feed(G + b"Host : x\r\n\r\n" + NEXT_REQUEST)
    with pytest.raises(ParseError):
        p.next_event()
    with pytest.raises(ParseError):
        p.next_event()
    with pytest.raises(ParseError):
        p.next_event()


def test_body_error_state_is_sticky():
    p = RequestParser()
    p.feed(chunked_post(b"zz\r\n"))
    assert type(p.next_event()) is RequestHead
    with pytest.raises(ParseError):
        p.next_event()
    with pytest.raises(ParseError):
        p.next_event()


# ============================================================================================
# Requests: EOF handling (RFC 9112 §8, §9.6)
# ============================================================================================

INCOMPLETE_REQUESTS = [
    pytest.param(b"GET http://example.test/ HT", id="in-request-line"),
    pytest.param(G + b"Host: exa", id="in-field"),
    pytest.param(G + b"Host: example.test\r\n", id="before-blank-line"),
    pytest.param(G + b"Host: example.test\r\n\r", id="after-final-cr"),
    pytest.param(b"\r\n\r\nGET", id="after-leading-crlf"),
    pytest.param(post(b"Content-Length: 10") + b"hello", id="in-content-length-body"),
    pytest.param(post(b"Content-Length: 10"), id="before-content-length-body"),
    pytest.param(chunked_post(b""), id="before-first-chunk"),
    pytest.param(chunked_post(b"5"), id="in-chunk-size"),
    pytest.param(chunked_post(b"5;ext"), id="in-chunk-ext"),
    pytest.param(chunked_post(b"5\r\nhel"), id="in-chunk-data"),
    pytest.param(chunked_post(b"5\r\nhello"), id="before-chunk-crlf"),
    pytest.param(chunked_post(b"5\r\nhello\r"), id="in-chunk-crlf"),
    pytest.param(chunked_post(b"5\r\nhello\r\n"), id="after-chunk"),
    pytest.param(chunked_post(b"0\r\n"), id="after-last-chunk"),
    pytest.param(chunked_post(b"0\r\nX-T: 1\r\n"), id="in-trailers"),
    pytest.param(chunked_post(b"0\r\n\r"), id="in-final-crlf"),
    pytest.param(head(b"Host: example.test") + b"GET http://x/", id="second-request-partial"),
]


@pytest.mark.parametrize("data", INCOMPLETE_REQUESTS)
def test_request_eof_mid_message(data):
    """EOF inside a message is IncompleteMessage (RFC 9112 §8), never a short success."""
    check_rejects(RequestParser, data, 400, when="eof", exc_type=IncompleteMessage)


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="no-bytes"),
    pytest.param(b"\r\n", id="only-crlf"),
    pytest.param(head(b"Host: example.test"), id="after-one-request"),
    pytest.param(head(b"Host: example.test") + b"\r\n", id="after-request-and-crlf"),
])
def test_request_eof_between_messages_is_closed(data):
    """A clean close between messages gives CLOSED in every feeding mode (RFC 9112 §9.6)."""
    for mode, pieces in _modes(data).items():
        trace = run(RequestParser, pieces)
        assert trace.error is None, mode
        assert trace.closed, mode


def test_paused_until_start_next():
    """After EndOfMessage the parser pauses; the next request waits for start_next()."""
    p = RequestParser()
    p.feed(head(b"Host: example.test") + NEXT_REQUEST)
    assert type(p.next_event()) is RequestHead
    assert p.next_event() == EOM
    assert p.next_event() is PAUSED
    assert p.next_event() is PAUSED
    assert p.done and p.buffered == len(NEXT_REQUEST)
    p.start_next()
    assert p.next_event().target == b"http://next.test/n"
    with pytest.raises(RuntimeError):
        p.start_next()  # not done yet


def test_paused_survives_eof():
    """EOF right after a complete message: PAUSED first, then CLOSED after start_next."""
    p = RequestParser()
    p.feed(head(b"Host: example.test"))
    p.feed(b"")
    assert type(p.next_event()) is RequestHead
    assert p.next_event() == EOM
    assert p.next_event() is PAUSED
    p.start_next()
    assert p.next_event() is CLOSED


def test_take_buffered_after_connect():
    """CONNECT: bytes after the head belong to the tunnel and are handed over untouched."""
    p = RequestParser()
    p.feed(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n\x16\x03\x01")
    assert p.next_event().method == b"CONNECT"
    assert p.take_buffered() == b"\x16\x03\x01"
    assert p.take_buffered() == b""


def test_large_body_is_streamed_not_buffered():
    """Body bytes come out as they arrive; nothing waits for the whole body."""
    p = RequestParser()
    p.feed(post(b"Content-Length: 1000000") + b"x" * 10)
    assert p.next_event().content_length == 1_000_000
    assert p.next_event() == b"x" * 10
    assert p.next_event() is NEED_DATA
    assert p.buffered == 0


def test_bytes_in_counts_everything():
    p = RequestParser()
    data = head(b"Host: example.test") + NEXT_REQUEST
    p.feed(data[:7])
    p.feed(data[7:])
    p.feed(b"")
    assert p.bytes_in == len(data)


# ============================================================================================
# Limits: 414 / 431 (RFC 9112 §3 and RFC 9110 §15.5.15; RFC 6585 §5)
# ============================================================================================

def _fields(n: int) -> list[bytes]:
    return [b"X-F%d: v" % i for i in range(n)]


LIMIT_REJECTIONS = [
    pytest.param(limited(request_line=32),
                 b"GET http://example.test/" + b"a" * 20 + b" HTTP/1.1\r\n\r\n", 414,
                 id="request-line-too-long"),
    pytest.param(limited(request_line=32),
                 b"GET http://example.test/" + b"a" * 100, 414,
                 id="request-line-too-long-unterminated"),
    pytest.param(limited(head_size=128),
                 head(b"Host: example.test", b"X-Big: " + b"v" * 120), 431,
                 id="head-too-large"),
    pytest.param(limited(head_size=128),
                 G + b"X-Big: " + b"v" * 200, 431,
                 id="head-too-large-unterminated"),
    pytest.param(limited(header_count=3), head(*_fields(4)), 431, id="too-many-fields"),
    pytest.param(limited(trailer_size=32),
                 chunked_post(b"0\r\n" + b"".join(b"T%d: 0123456789\r\n" % i for i in range(4))
                              + b"\r\n"), 431,
                 id="trailer-section-too-large"),
    pytest.param(limited(header_count=3),
                 chunked_post(b"0\r\n" + b"".join(b"T%d: v\r\n" % i for i in range(4))
                              + b"\r\n"), 431,
                 id="too-many-trailer-fields"),
    pytest.param(limited(chunk_line=16),
                 chunked_post(b"1;" + b"e" * 40 + b"\r\nx\r\n0\r\n\r\n"), 400,
                 id="chunk-line-too-long"),
]


@pytest.mark.parametrize("make, data, status", LIMIT_REJECTIONS)
def test_limit_rejected(make, data, status):
    """Each bound has its status; unterminated input is refused before EOF (slowloris)."""
    check_rejects(make, data, status, pipelined=NEXT_REQUEST)


def test_limits_at_the_boundary_accepted():
    """Exactly at each limit is still fine (the limits are inclusive)."""
    # Head of exactly head_size bytes, blank line included.
    base = head(b"Host: example.test", b"X-Pad: ")
    data = head(b"Host: example.test", b"X-Pad: " + b"p" * (128 - len(base)))
    assert len(data) == 128
    check_parses(limited(head_size=128), data,
                 [rq(HOST, (b"X-Pad", b"p" * (128 - len(base)))), EOM])
    check_rejects(limited(head_size=127), data, 431)
    # Exactly header_count fields.
    check_parses(limited(header_count=3), head(*_fields(3)),
                 [rq(*[(b"X-F%d" % i, b"v") for i in range(3)]), EOM])
    # A trailer section of exactly trailer_size bytes (field lines with their CRLF).
    trailer = b"T1: 0123456789\r\nT2: 0123456789\r\n"
    assert len(trailer) == 32
    check_parses(limited(trailer_size=32), chunked_post(b"0\r\n" + trailer + b"\r\n"),
                 [CHUNKED_HEAD, EndOfMessage([(b"T1", b"0123456789"), (b"T2", b"0123456789")])])


def test_request_line_one_below_limit_accepted():
    target = b"http://example.test/" + b"a" * 7
    line = b"GET " + target + b" HTTP/1.1"
    assert len(line) == 40
    check_parses(limited(request_line=41), line + b"\r\n\r\n", [rq(target=target), EOM])


def test_request_line_exactly_at_limit_accepted():
    """A request line of exactly ``limits.request_line`` bytes is within the limit.

    # Regression (was a bug): _check_request_line_length() searches for the LF in buf[:limit + 1], but the LF of
    # a line of exactly ``limit`` bytes sits at index limit + 1, so it answers 414 although
    # _parse_request_line() itself allows len(line) <= limit. Effective limit is limit - 1.
    """
    target = b"http://example.test/" + b"a" * 7
    line = b"GET " + target + b" HTTP/1.1"
    assert len(line) == 40
    # Regression (was a bug): raises ParseError(status=414) in every feeding mode.
    check_parses(limited(request_line=40), line + b"\r\n\r\n", [rq(target=target), EOM])


def test_chunk_line_exactly_at_limit_same_in_every_mode():
    """A chunk-size line of exactly ``limits.chunk_line`` bytes.

    # Regression (was a bug): _read_line() looks for the LF within limit + 2 bytes (so a ``limit``-byte line is
    # accepted when the whole line is buffered) but raises "too long" as soon as limit + 1
    # bytes without LF are buffered, i.e. when the line plus its CR arrive before the LF.
    # The same bytes are accepted or rejected depending on TCP segmentation (RFC 9112 §11.2:
    # parsing differences are how smuggling starts).
    """
    line = b"1;" + b"e" * 14
    assert len(line) == 16
    # Regression (was a bug): one-shot parses it; byte-by-byte raises ParseError(400, "chunk-size line too long").
    check_parses(limited(chunk_line=16), chunked_post(line + b"\r\nx\r\n0\r\n\r\n"),
                 [CHUNKED_HEAD, b"x", EOM])


@pytest.mark.parametrize("value_len", [
    pytest.param(60, id="line-longer-than-limit"),
    pytest.param(29, id="line-exactly-at-limit"),
])
def test_single_oversized_trailer_line_is_431(value_len):
    """A trailer section over ``limits.trailer_size`` is 431 however it is split into lines.

    # Regression (was a bug): a single trailer line longer than trailer_size trips _read_line()'s "trailer
    # section too long" (status 400) instead of the 431 that several smaller lines of the
    # same total size get; for a line of exactly trailer_size bytes the status even depends
    # on segmentation (431 one-shot, 400 byte-by-byte). ParserLimits' contract is "each breach
    # has its own status", and 431 is what RFC 6585 §5 defines for oversized fields.
    """
    data = chunked_post(b"0\r\nT: " + b"v" * value_len + b"\r\n\r\n")
    # Regression (was a bug): 400 (line-longer-than-limit), or 400 only byte-by-byte (line-exactly-at-limit).
    check_rejects(limited(trailer_size=32), data, 431)


# ============================================================================================
# Responses
# ============================================================================================

R = b"HTTP/1.1 200 OK\r\n"

VALID_RESPONSES = [
    # -- status line (RFC 9112 §4) ----------------------------------------------------------
    pytest.param(
        (), R + b"Content-Length: 5\r\n\r\nhello",
        [rs(200, b"OK", (b"Content-Length", b"5"), framing=Framing.LENGTH, length=5),
         b"hello", EOM],
        id="200-content-length"),
    pytest.param(
        (), b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
        [rs(200, b"", (b"Content-Length", b"0")), EOM],
        id="no-reason-no-space"),
    pytest.param(
        (), b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",
        [rs(200, b"", (b"Content-Length", b"0")), EOM],
        id="empty-reason"),
    pytest.param(
        (), b"HTTP/1.1 404 Not  Found\t\xe9 \r\nContent-Length: 0\r\n\r\n",
        [rs(404, b"Not  Found\t\xe9 ", (b"Content-Length", b"0")), EOM],
        id="reason-with-spaces-tab-obs-text"),
    pytest.param(
        (), b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
        [rs(200, b"OK", (b"Content-Length", b"0")), EOM],
        id="http12-treated-as-11"),
    pytest.param(
        (), b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",
        [rs(200, b"OK", (b"Content-Length", b"2"), version=10, framing=Framing.LENGTH,
            length=2, keep_alive=False), b"hi", EOM],
        id="http10-closes-by-default"),
    pytest.param(
        (), b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi",
        [rs(200, b"OK", (b"Connection", b"keep-alive"), (b"Content-Length", b"2"), version=10,
            framing=Framing.LENGTH, length=2, tokens=[b"keep-alive"]), b"hi", EOM],
        id="http10-keep-alive"),
    pytest.param(
        (), R + b"Connection: Close\r\nContent-Length: 0\r\n\r\n",
        [rs(200, b"OK", (b"Connection", b"Close"), (b"Content-Length", b"0"),
            keep_alive=False, tokens=[b"close"]), EOM],
        id="connection-close"),
    # -- bodies that are absent whatever the fields say (RFC 9112 §6.3 (1)) -----------------
    pytest.param(
        (b"HEAD",), R + b"Content-Length: 100\r\n\r\n",
        [rs(200, b"OK", (b"Content-Length", b"100")), EOM],
        id="head-response-content-length"),
    pytest.param(
        (b"HEAD",), R + b"Transfer-Encoding: chunked\r\n\r\n",
        [rs(200, b"OK", (b"Transfer-Encoding", b"chunked")), EOM],
        id="head-response-chunked"),
    pytest.param(
        (), b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
        [rs(204, b"No Content", (b"Content-Length", b"10")), EOM],
        id="204-ignores-content-length"),
    pytest.param(
        (), b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
        [rs(204, b"No Content", (b"Transfer-Encoding", b"chunked")), EOM],
        id="204-ignores-transfer-encoding"),
    pytest.param(
        (), b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        [rs(304, b"Not Modified", (b"Content-Length", b"10")), EOM],
        id="304-ignores-content-length"),
    pytest.param(
        (), R + b"Content-Length: 0\r\n\r\n",
        [rs(200, b"OK", (b"Content-Length", b"0")), EOM],
        id="content-length-zero"),
    # -- 1xx (RFC 9110 §15.2): interim heads, no EndOfMessage, then the final response -----
    pytest.param(
        (), b"HTTP/1.1 100 Continue\r\n\r\n" + R + b"Content-Length: 2\r\n\r\nhi",
        [rs(100, b"Continue"),
         rs(200, b"OK", (b"Content-Length", b"2"), framing=Framing.LENGTH, length=2),
         b"hi", EOM],
        id="100-then-200"),
    pytest.param(
        (), b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 100 Continue\r\n\r\n" + R + b"Content-Length: 0\r\n\r\n",
        [rs(103, b"Early Hints", (b"Link", b"</a.css>; rel=preload")),
         rs(100, b"Continue"),
         rs(200, b"OK", (b"Content-Length", b"0")), EOM],
        id="103-100-then-200"),
    # -- chunked (RFC 9112 §7.1) ------------------------------------------------------------
    pytest.param(
        (), R + b"Transfer-Encoding: chunked\r\n\r\n"
            b"4;x=y\r\nWiki\r\nA\r\npedia in\r\n\r\n0\r\nServer-Timing: db;dur=5\r\n\r\n",
        [rs(200, b"OK", (b"Transfer-Encoding", b"chunked"), framing=Framing.CHUNKED),
         b"Wikipedia in\r\n", EndOfMessage([(b"Server-Timing", b"db;dur=5")])],
        id="chunked-with-trailers"),
    pytest.param(
        (), R + b"Transfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
        [rs(200, b"OK", (b"Transfer-Encoding", b"Chunked"), framing=Framing.CHUNKED), EOM],
        id="chunked-case-insensitive"),
    # -- pipelined responses with different methods -----------------------------------------
    pytest.param(
        (b"GET", b"HEAD", b"GET"),
        R + b"Content-Length: 1\r\n\r\na"
        + R + b"Content-Length: 7\r\n\r\n"
        + R + b"Transfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n",
        [rs(200, b"OK", (b"Content-Length", b"1"), framing=Framing.LENGTH, length=1), b"a",
         EOM,
         rs(200, b"OK", (b"Content-Length", b"7")), EOM,
         rs(200, b"OK", (b"Transfer-Encoding", b"chunked"), framing=Framing.CHUNKED), b"b",
         EOM],
        id="pipelined-get-head-get"),
]


LONE_LF_RESPONSES = [
    pytest.param(
        (), b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello",
        [rs(200, b"OK", (b"Content-Length", b"5"), framing=Framing.LENGTH, length=5),
         b"hello", EOM],
        id="every-line"),
    pytest.param(
        (), b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
        [rs(200, b"OK", (b"Content-Length", b"0")), EOM],
        id="status-line-only"),
    pytest.param(
        (), R + b"X: a\nContent-Length: 2\r\n\nhi",
        [rs(200, b"OK", (b"X", b"a"), (b"Content-Length", b"2"), framing=Framing.LENGTH,
            length=2), b"hi", EOM],
        id="mixed-then-lf-blank-line"),
    pytest.param(
        (), R + b"Content-Length: 9\n\r\n\r\n\r\nabcde",
        [rs(200, b"OK", (b"Content-Length", b"9"), framing=Framing.LENGTH, length=9),
         b"\r\n\r\nabcde", EOM],
        id="body-holding-crlfcrlf"),
    pytest.param(
        (), b"HTTP/1.0 404\nServer: x\nContent-Length: 0\n\n",
        [rs(404, b"", (b"Server", b"x"), (b"Content-Length", b"0"), version=10,
            keep_alive=False), EOM],
        id="http10-no-reason"),
    pytest.param(
        (b"HEAD",), b"HTTP/1.1 200 OK\nContent-Length: 7\n\n",
        [rs(200, b"OK", (b"Content-Length", b"7")), EOM],
        id="head-response"),
    pytest.param(
        (), R + b"Transfer-Encoding: chunked\n\n5;x=y\nhello\n0\nT: 1\n\n",
        [rs(200, b"OK", (b"Transfer-Encoding", b"chunked"), framing=Framing.CHUNKED),
         b"hello", EndOfMessage([(b"T", b"1")])],
        id="chunked-lines"),
]


@pytest.mark.parametrize("methods, data, expected", LONE_LF_RESPONSES)
def test_response_lines_may_end_in_lone_lf(methods, data, expected):
    """RFC 9112 §2.2: a recipient MAY take a lone LF as a line end; nginx, HAProxy and Squid
    do for responses, so proxyd does too (requests stay strict: tests/corpus_requests.py).
    The head is rewritten with CRLF, so what the client receives is canonical."""
    check_parses(ResponseParser, data, expected, methods=methods, pipelined=NEXT_RESPONSE,
                 pipelined_events=NEXT_RESPONSE_EVENTS)
    p = ResponseParser()
    p.expect(methods[0] if methods else b"GET")
    p.feed(data)
    assert b"\n" not in p.next_event().raw_block.replace(b"\r\n", b"")


def test_lone_lf_chunk_line_has_the_same_limit_as_one_ending_in_crlf():
    """The search for a line end allows for its CR; a line without one must not get that
    byte as content (a 4097-byte chunk-size line passed with a lone LF)."""
    limits = ParserLimits(chunk_line=16)
    head = R + b"Transfer-Encoding: chunked\r\n\r\n"
    for ending in (b"\n", b"\r\n"):
        for ext, ok in ((b";" + b"a" * 14, True), (b";" + b"a" * 15, False)):
            p = ResponseParser(limits)
            p.expect(b"GET")
            p.feed(head + b"5" + ext + ending + b"hello\r\n")
            assert isinstance(p.next_event(), ResponseHead)
            if ok:
                assert p.next_event() == b"hello", (ending, ext)
            else:
                with pytest.raises(ParseError, match="chunk-size line too long"):
                    p.next_event()


def test_lone_lf_head_over_the_limit_is_431():
    """The head-size limit holds for a head found by its lone-LF line ends."""
    limits = ParserLimits(head_size=64)
    data = b"HTTP/1.1 200 OK\nX: " + b"a" * 80 + b"\n\n"
    for pieces in ([data], [data[i:i + 1] for i in range(len(data))]):
        p = ResponseParser(limits)
        p.expect(b"GET")
        with pytest.raises(ParseError) as info:
            for piece in pieces:
                p.feed(piece)
                p.next_event()
        assert info.value.status == 431


@pytest.mark.parametrize("methods, data, expected", VALID_RESPONSES)
def test_response_parses(methods, data, expected):
    """Valid responses (RFC 9112 §4, §6.3) parse identically however the bytes arrive."""
    check_parses(ResponseParser, data, expected, methods=methods, pipelined=NEXT_RESPONSE,
                 pipelined_events=NEXT_RESPONSE_EVENTS)


@pytest.mark.parametrize("data, expected", [
    pytest.param(
        R + b"Server: x\r\n\r\nsome\r\nbody\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        [rs(200, b"OK", (b"Server", b"x"), framing=Framing.CLOSE, keep_alive=False),
         b"some\r\nbody\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", EOM],
        id="body-until-eof"),
    pytest.param(
        R + b"\r\n",
        [rs(200, b"OK", framing=Framing.CLOSE, keep_alive=False), EOM],
        id="empty-body-until-eof"),
    pytest.param(
        R + b"Connection: keep-alive\r\n\r\nx",
        [rs(200, b"OK", (b"Connection", b"keep-alive"), framing=Framing.CLOSE,
            keep_alive=False, tokens=[b"keep-alive"]), b"x", EOM],
        id="keep-alive-token-cannot-save-close-delimited"),
])
def test_response_close_delimited(data, expected):
    """No Content-Length or Transfer-Encoding: the body runs to EOF (RFC 9112 §6.3 (8))."""
    check_parses(ResponseParser, data, expected)
    # Before EOF the message is not complete.
    p = ResponseParser()
    p.expect(b"GET")
    p.feed(data)
    events = []
    while (ev := p.next_event()) is not NEED_DATA:
        events.append(ev)
    assert EOM not in events and not p.done


INVALID_RESPONSES = [
    pytest.param(R + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 id="cl-and-te"),
    pytest.param(R + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
                 id="te-and-cl"),
    pytest.param(R + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", id="cl-conflict"),
    pytest.param(R + b"Content-Length: 3, 4\r\n\r\nabcd", id="cl-conflict-list"),
    pytest.param(R + b"Content-Length: -1\r\n\r\n", id="cl-negative"),
    pytest.param(R + b"Content-Length: 0x10\r\n\r\n", id="cl-hex"),
    # proxyd re-frames bodies for the client, so a transfer coding it cannot remove is refused
    pytest.param(R + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", id="te-gzip-chunked"),
    pytest.param(R + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
                 id="te-chunked-twice"),
    pytest.param(R + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\n",
                 id="chunk-not-followed-by-crlf"),
    pytest.param(R + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
                 id="bad-chunk-size"),
    pytest.param(b"HTTP/1.1 20 OK\r\n\r\n", id="two-digit-status"),
    pytest.param(b"HTTP/1.1 2000 OK\r\n\r\n", id="four-digit-status"),
    pytest.param(b"HTTP/1.1  200 OK\r\n\r\n", id="double-space"),
    pytest.param(b"HTTP/1.1 200OK\r\n\r\n", id="no-space-before-reason"),
    pytest.param(b"HTTP/1.1 200 O\x01K\r\n\r\n", id="ctl-in-reason"),
    pytest.param(b"HTTP/1.1 200 O\rK\r\n\r\n", id="bare-cr-in-reason"),
    pytest.param(b"http/1.1 200 OK\r\n\r\n", id="lowercase-http-name"),
    pytest.param(b"HTTP/2.0 200 OK\r\n\r\n", id="http2"),
    # A lone LF ends a line in a response (below), but a bare CR is never a line end.
    pytest.param(b"HTTP/1.1 200 OK\nX: a\rb\nContent-Length: 0\n\n", id="lf-head-bare-cr"),
    pytest.param(b"HTTP/1.1 200 OK\rContent-Length: 0\r\n\r\n", id="bare-cr-line-end"),
    pytest.param(b"HTTP/1.1 200 OK\nX: a\n b\nContent-Length: 0\n\n", id="lf-head-obs-fold"),
    pytest.param(R + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r0\r\n\r\n",
                 id="chunk-data-then-bare-cr"),
    pytest.param(R + b"X: a\r\n b\r\nContent-Length: 0\r\n\r\n", id="obs-fold"),
    pytest.param(R + b"X : a\r\nContent-Length: 0\r\n\r\n", id="space-before-colon"),
    pytest.param(b"ICY 200 OK\r\n\r\n", id="not-http"),
]


@pytest.mark.parametrize("data", INVALID_RESPONSES)
def test_response_rejected(data):
    """Invalid responses raise ParseError (the client answers 502, RFC 9209 §2.3.x)."""
    check_rejects(ResponseParser, data, 400, pipelined=NEXT_RESPONSE)


def test_head_response_still_rejects_garbage_content_length():
    """A response to HEAD has no body, but an invalid Content-Length is still invalid."""
    check_rejects(ResponseParser, R + b"Content-Length: abc\r\n\r\n", 400, methods=(b"HEAD",))


@pytest.mark.parametrize("data", [
    pytest.param(b"HTTP/1.1 20", id="in-status-line"),
    pytest.param(R + b"Content-Length: 5\r\n", id="in-head"),
    pytest.param(R + b"Content-Length: 5\r\n\r\nhel", id="in-content-length-body"),
    pytest.param(R + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel", id="in-chunk"),
    pytest.param(R + b"Transfer-Encoding: chunked\r\n\r\n0\r\n", id="before-final-crlf"),
])
def test_response_eof_mid_message(data):
    """EOF inside a response is IncompleteMessage (RFC 9112 §8)."""
    check_rejects(ResponseParser, data, 400, when="eof", exc_type=IncompleteMessage)


def test_response_clean_eof_is_closed():
    """EOF before any byte of a response: CLOSED (the origin closed an idle connection)."""
    p = ResponseParser()
    p.expect(b"GET")
    p.feed(b"")
    assert p.next_event() is CLOSED
    assert not p.seen_bytes


def test_response_seen_bytes():
    """seen_bytes tells whether a retry is safe (no byte of the response arrived)."""
    p = ResponseParser()
    p.expect(b"GET")
    assert p.next_event() is NEED_DATA and not p.seen_bytes
    p.feed(b"H")
    assert p.next_event() is NEED_DATA and p.seen_bytes
    p.expect(b"GET")
    assert not p.seen_bytes


def test_http10_response_with_transfer_encoding_closes():
    """RFC 9112 §6.1: "A server or client that receives an HTTP/1.0 message containing a
    Transfer-Encoding header field MUST treat the message as if the framing is faulty, even if
    a Content-Length is present, and close the connection after processing the message."

    # Regression (was a bug): ResponseParser decodes the chunked body and reports keep_alive=True when the 1.0
    # response says ``Connection: keep-alive``, so the upstream connection may be reused.
    """
    data = (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1\r\na\r\n0\r\n\r\n")
    p = ResponseParser()
    p.expect(b"GET")
    p.feed(data)
    try:
        resp = p.next_event()
    except ParseError:
        return  # rejecting the faulty framing outright is also acceptable
    # Regression (was a bug): keep_alive is True here.
    assert resp.keep_alive is False


def test_status_below_100_is_not_interim():
    """RFC 9110 §15: status codes outside 100..599 are invalid, and a client "SHOULD process
    the response as if it had a 5xx (Server Error) status code".

    # Regression (was a bug): ResponseParser treats any status < 200 as a 1xx interim response, so
    # ``HTTP/1.1 099 Odd`` is skipped and its body bytes are parsed as the next response head.
    """
    p = ResponseParser()
    p.expect(b"GET")
    p.feed(b"HTTP/1.1 099 Odd\r\nContent-Length: 3\r\n\r\nabc")
    try:
        first = p.next_event()
    except ParseError:
        return  # rejecting the status line (502 to the client) is acceptable
    assert first.status == 99
    events = []
    while (ev := p.next_event()) is not NEED_DATA and ev is not PAUSED:
        events.append(ev)
    # Regression (was a bug): events == [] — "abc" waits to become a response head.
    assert events == [b"abc", EOM]


def test_response_eof_after_interim_response():
    """EOF after a 1xx but before the final response is not a complete exchange.

    The parser reports CLOSED (not IncompleteMessage) here; the client code maps CLOSED to
    ResponseIncomplete, and ``seen_bytes`` is True so the request is not retried.
    """
    for mode, pieces in _modes(b"HTTP/1.1 100 Continue\r\n\r\n").items():
        p = ResponseParser()
        p.expect(b"GET")
        events = []
        for piece in pieces:
            p.feed(piece)
            while (ev := p.next_event()) is not NEED_DATA:
                events.append(ev)
        assert events == [rs(100, b"Continue")], mode
        p.feed(b"")
        try:
            assert p.next_event() is CLOSED, mode
        except IncompleteMessage:
            pass
        assert p.seen_bytes, mode


# ============================================================================================
# Helpers: parse_content_length, field_values, serialisation
# ============================================================================================

@pytest.mark.parametrize("values, expected", [
    pytest.param([], None, id="absent"),
    pytest.param([b"0"], 0, id="zero"),
    pytest.param([b"42"], 42, id="one"),
    pytest.param([b"42", b"42", b"42"], 42, id="repeated-identical"),
    pytest.param([b"9" * 18], int(b"9" * 18), id="18-digits"),
    pytest.param([b"0" * 30 + b"5"], 5, id="leading-zeros"),  # 1*DIGIT (RFC 9110 §8.6)
])
def test_parse_content_length(values, expected):
    """RFC 9110 §8.6: Content-Length = 1*DIGIT; identical repeated values MAY be accepted."""
    assert parse_content_length(values) == expected


def test_thousands_of_leading_zeros_in_content_length_are_still_a_number():
    """Found by review: int() refuses strings over 4,300 digits (a ValueError, not a 400)."""
    assert parse_content_length([b"0" * 5000 + b"5"]) == 5
    with pytest.raises(ParseError):
        parse_content_length([b"0" * 5000 + b"1" * 19])


@pytest.mark.parametrize("values", [
    pytest.param([b"1", b"2"], id="differing"),
    pytest.param([b""], id="empty"),
    pytest.param([b"+1"], id="plus"),
    pytest.param([b" 1"], id="space"),
    pytest.param([b"1" * 19], id="19-digits"),
    pytest.param([b"\xef\xbc\x91"], id="fullwidth-digit"),
])
def test_parse_content_length_rejects(values):
    with pytest.raises(ParseError) as info:
        parse_content_length(values)
    assert info.value.status == 400


def test_field_values():
    """RFC 9110 §5.6.1: list fields split on commas, OWS trimmed, empty elements dropped;
    names match case-insensitively and repeated field lines concatenate in order."""
    headers = [(b"Accept", b"a, b ,,\tc"), (b"X", b"no"), (b"accept", b" d "), (b"ACCEPT", b"")]
    assert field_values(headers, b"accept") == [b"a", b"b", b"c", b"d"]
    assert field_values(headers, b"missing") == []


def test_serialize_head():
    """RFC 9112 §2.1: start-line CRLF *( field-line CRLF ) CRLF."""
    assert serialize_head(b"GET / HTTP/1.1", []) == b"GET / HTTP/1.1\r\n\r\n"
    assert serialize_head(b"HTTP/1.1 200 OK", [(b"A", b"1"), (b"a", b"2")]) == \
        b"HTTP/1.1 200 OK\r\nA: 1\r\na: 2\r\n\r\n"


def test_serialize_parse_roundtrip():
    fields = [(b"Host", b"example.test"), (b"X-A", b"1"), (b"x-a", b"two words")]
    data = serialize_head(b"GET " + T + b" HTTP/1.1", fields)
    check_parses(RequestParser, data, [rq(*fields), EOM])


@pytest.mark.parametrize("data, size_line", [
    pytest.param(b"x", b"1\r\n", id="1"),
    pytest.param(b"x" * 10, b"a\r\n", id="10-lowercase-hex"),
    pytest.param(b"x" * 255, b"ff\r\n", id="255"),
    pytest.param(b"x" * 4096, b"1000\r\n", id="4096"),
])
def test_chunk_frame(data, size_line):
    """RFC 9112 §7.1: chunk = chunk-size CRLF chunk-data CRLF."""
    assert chunk_frame(data) == [size_line, data, b"\r\n"]


def test_last_chunk():
    """RFC 9112 §7.1: last-chunk trailer-section CRLF."""
    assert last_chunk([]) == b"0\r\n\r\n"
    assert last_chunk([(b"A", b"1"), (b"B", b"2")]) == b"0\r\nA: 1\r\nB: 2\r\n\r\n"


def test_chunk_framing_roundtrip():
    """What proxyd writes with chunk_frame/last_chunk is what its parser reads back."""
    body = b"".join(b"".join(chunk_frame(p)) for p in (b"abc", b"\r\n", b"z" * 300))
    data = chunked_post(body + last_chunk([(b"X-T", b"v")]))
    check_parses(RequestParser, data,
                 [CHUNKED_HEAD, b"abc\r\n" + b"z" * 300, EndOfMessage([(b"X-T", b"v")])])


# -- whole_response(): the one-step path must agree with next_event() ------------------------
def _first_response_events(data: bytes, method: bytes,
                           one_step: bool) -> tuple[list, str | None]:
    """Events of the first response in ``data``: with ``one_step`` taken the way
    UpstreamConnection does (whole_response() first, then next_event() for whatever it
    left), otherwise by next_event() alone."""
    p = ResponseParser()
    p.expect(method)
    p.feed(data)
    events: list = []
    try:
        whole = p.whole_response() if one_step else None
        if whole is not None:
            head, body = whole
            events.append(head)
            if body is not None:
                if body:
                    events.append(body)
                events.append(EOM)
                assert p.done
                return events, None
        while True:
            ev = p.next_event()
            if ev is NEED_DATA or ev is PAUSED or ev is CLOSED:
                return events, None
            _append(events, ev)
            if type(ev) is EndOfMessage:
                return events, None
    except ParseError as exc:
        return events, f"{exc.status} {exc.reason}"


def _merge_bytes(events: list) -> list:
    out: list = []
    for ev in events:
        if type(ev) is bytes and out and type(out[-1]) is bytes:
            out[-1] += ev
        else:
            out.append(ev)
    return out


@pytest.mark.parametrize("data", [p.values[1] for p in VALID_RESPONSES]
                         + [p.values[0] for p in INVALID_RESPONSES])
@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize("tail", [b"", NEXT_RESPONSE])
def test_whole_response_agrees_with_next_event(data, method, tail):
    one = _first_response_events(data + tail, method, one_step=True)
    ref = _first_response_events(data + tail, method, one_step=False)
    assert (_merge_bytes(one[0]), one[1]) == (_merge_bytes(ref[0]), ref[1])


def test_whole_response_takes_a_complete_small_response_at_once():
    p = ResponseParser()
    p.feed(R + b"Content-Length: 5\r\n\r\nhello")
    head, body = p.whole_response()
    assert head.status == 200 and body == b"hello" and p.done and not p.buffered
    p.start_next()
    p.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert p.whole_response() is None  # informational: left to next_event
    assert type(p.next_event()) is ResponseHead


# ============================================================================================
# Plain paths: the usual head taken in one match must give exactly what the general parser
# gives (same events, same error), for every case in the corpus above.
# ============================================================================================

def _all_request_events(data: bytes, limits: ParserLimits | None) -> tuple[list, str | None]:
    p = RequestParser(limits)
    p.feed(data)
    p.feed(b"")
    events: list = []
    try:
        while True:
            ev = p.next_event()
            if ev is PAUSED:
                p.start_next()
                continue
            if ev is NEED_DATA or ev is CLOSED:
                return events, None
            _append(events, ev)
    except ParseError as exc:
        return events, f"{exc.status} {exc.reason}"


def _no_plain(self, buf):
    return None


@pytest.mark.parametrize("data, limits", [(p.values[0], None) for p in VALID_REQUESTS]
                         + [(p.values[0], None) for p in INVALID_REQUESTS]
                         + [(p.values[1], p.values[0]().limits) for p in LIMIT_REJECTIONS])
@pytest.mark.parametrize("tail", [b"", NEXT_REQUEST])
def test_plain_request_path_agrees_with_general_parser(data, limits, tail, monkeypatch):
    plain = _all_request_events(data + tail, limits)
    monkeypatch.setattr(RequestParser, "_plain_head", _no_plain)
    general = _all_request_events(data + tail, limits)
    assert plain == general


@pytest.mark.parametrize("data, plain", [
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n", True),
    (b"GET http://a.test/ HTTP/1.0\r\nHOST: a.test\r\n\r\n", True),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n", True),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: Keep-Alive\r\n"
     b"Proxy-Connection: keep-alive\r\nKeep-Alive: 300\r\n\r\n", True),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, Upgrade\r\n"
     b"\r\n", False),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: x-secret\r\n\r\n", False),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n"
     b"Connection: close\r\n\r\n", False),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", False),
    (b"GET http://a.test/ HTTP/1.1\r\nAccept: */*\r\n\r\n", False),
    (b"GET http://a.test/ HTTP/1.1\r\nHost:  a.test\r\n\r\n", False),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nVia: 1.1 x\r\n\r\n", False),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\n\r\n", False),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nTE: trailers\r\n\r\n", False),
    (b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n", False),
])
def test_plain_request_path_takes_only_heads_without_special_fields(data, plain):
    p = RequestParser()
    p.feed(data)
    head = p.next_event()
    assert type(head) is RequestHead and head.plain is plain


@pytest.mark.parametrize("data, plain", [
    (R + b"Content-Length: 2\r\n\r\nhi", True),
    (R + b"Content-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nhi", True),
    (R + b"Content-Length: 2\r\nConnection: close\r\n\r\nhi", True),
    (R + b"Content-Length: 02\r\n\r\nhi", False),
    (R + b"Content-Length: 2\r\nConnection: x-private\r\n\r\nhi", False),
    (R + b"Content-Length: 2\r\nConnection: close\r\nConnection: close\r\n\r\nhi", False),
    (R + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nhi", False),
    (R + b"Content-Length: 2\r\nUpgrade: h2c\r\n\r\nhi", False),
    (R + b"Content-Length: 2 \r\n\r\nhi", False),
    (R + b"\r\nhi", False),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", False),
])
def test_plain_response_path_takes_only_heads_without_special_fields(data, plain):
    p = ResponseParser()
    p.feed(data)
    head, _ = p.whole_response()
    assert head.plain is plain


@pytest.mark.parametrize("auth, plain", [
    (b"Bearer abc", True), (b"Basic dXNlcjpwdw==", True),
    (b"NTLM TlRMTVNTUAABAAAA", False), (b"negotiate YIIG", False), (b"NTLMx y", True),
])
def test_connection_auth_requests_leave_the_plain_path(auth, plain):
    """NTLM/Negotiate credentials pin the upstream connection to the client (the general
    path checks them); other schemes keep a request plain."""
    data = b"GET " + T + b" HTTP/1.1\r\nHost: h\r\nAuthorization: " + auth + b"\r\n\r\n"
    req = RequestParser().take_plain(data)
    assert (req is not None) == plain


@pytest.mark.parametrize("auth, challenge, status, private", [
    (None, b"NTLM", 401, False),  # the bare offer: no state on the connection yet
    (None, b"NTLM TlRMTVNTUAACAAAA", 401, True),  # a type 2 challenge
    (None, b"Basic realm=\"x\", Negotiate oYIBBjCCAQKgAwoBAaEL", 401, True),
    (None, b"Basic realm=\"NTLM\"", 401, False),  # a realm, not a scheme
    (None, b"Bearer", 401, False),
    (b"NTLM TlRMTVNT", None, 200, True),
    (b"Negotiate YIIG", b"Negotiate oYG", 200, True),  # Kerberos mutual authentication
    (b"Bearer x", None, 200, False),
    (None, b"NTLM", 200, False),  # only a 401 challenges
])
def test_authenticates_connection(auth, challenge, status, private):
    p = RequestParser()
    p.feed(b"GET " + T + b" HTTP/1.1\r\nHost: h\r\nX: 1\r\n"
           + (b"Authorization: " + auth + b"\r\n" if auth else b"") + b"\r\n")
    req = p.next_event()
    r = ResponseParser()
    r.expect(b"GET")
    r.feed(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n" % status
           + (b"WWW-Authenticate: " + challenge + b"\r\n" if challenge else b"") + b"\r\n")
    resp = r.next_event()
    assert authenticates_connection(req, resp) is private
