"""Corpus data for tests/test_adversarial.py: malformed / tricky requests and responses.

Request templates are bytes with placeholders filled in at run time:

* ``$URL``  -> ``http://localhost:PORT`` of the module's TLS origin (every case targets it, so
  a request that proxyd wrongly forwarded would be seen there);
* ``$AUTH`` -> ``localhost:PORT``;
* ``$TAG``  -> the case id (unique path, so the origin's record of the case can be found);
* ``$PAD``  -> filler sized so that the request line or the head is exactly ``pad_to`` bytes.

Each case cites the RFC section (RFC 9110 semantics, RFC 9112 HTTP/1.1 syntax) or the
published smuggling technique it exercises:

* [Kettle19]  James Kettle, "HTTP Desync Attacks: Request Smuggling Reborn" (PortSwigger 2019):
              CL.TE, TE.CL, TE.TE obfuscations.
* [Linhart05] Linhart, Klein, Heled, Orrin, "HTTP Request Smuggling" (Watchfire 2005).
* [BishopFox20] Jake Miller, "h2c Smuggling" (Bishop Fox 2020).
* [Funky24]   Jeppe Bonde Weikop, "Funky chunks: abusing ambiguous chunk line terminators"
              (2024/2025): bare LF / bare CR in chunk-size lines and extensions.
* [Kettle22]  James Kettle, "Browser-Powered Desync Attacks" (2022): CL.0 / 0.CL.
"""

from __future__ import annotations

from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# Request corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestCase:
    """One request case.

    ``status`` is the set of acceptable answers for a rejected case, or None for a case
    proxyd must forward.  ``stage`` says where the defect is: ``head`` (nothing at all may go
    upstream), ``body`` (the head is valid; the defect is in the chunked body).
    For accepted cases: ``body`` is what the origin must receive, ``target`` the origin-form
    target it must see ("" = ``/echo/$TAG``), ``ok_status`` the origin's answer, ``count``
    the number of requests the origin must see, ``check`` an extra predicate
    ``check(msg, rec, auth) -> str | None`` (msg: the strict re-parse of what reached the
    origin, rec: the origin's RequestRecord; returns an error text or None).
    """

    id: str
    raw: bytes
    status: frozenset | None
    ref: str
    stage: str = "head"
    body: bytes = b""
    target: str = ""
    ok_status: int = 200
    count: int = 1
    method: str = "GET"
    check: object = None
    pad_to: tuple | None = None  # ("line" | "head", size)


def _b(s: str | bytes) -> bytes:
    return s.encode("latin-1") if isinstance(s, str) else s


def req(first: str | bytes, *headers: str | bytes, body: str | bytes = b"",
        host: bool = True) -> bytes:
    """A request: first line, ``Host: $AUTH`` (unless host=False), headers, CRLF, body."""
    lines = [_b(first)]
    if host:
        lines.append(b"Host: $AUTH")
    lines += [_b(h) for h in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + _b(body)


GET = "GET $URL/echo/$TAG HTTP/1.1"
POST = "POST $URL/echo/$TAG HTTP/1.1"
CHUNKED = "Transfer-Encoding: chunked"
HELLO_CHUNKED = "5\r\nhello\r\n0\r\n\r\n"

S400 = frozenset({400})
S400_501 = frozenset({400, 501})
S400_505 = frozenset({400, 505})
S414 = frozenset({414})
S431 = frozenset({431})
S417 = frozenset({417})
S403 = frozenset({403})
S508 = frozenset({508})


def R(id: str, raw: bytes, status: frozenset, ref: str, **kw) -> RequestCase:
    return RequestCase(id, raw, status, ref, **kw)


def A(id: str, raw: bytes, ref: str, **kw) -> RequestCase:
    return RequestCase(id, raw, None, ref, **kw)


# -- extra checks for accepted cases (msg = strict parse of the bytes the origin received) ----

def _hdr(msg, name: str) -> list[bytes]:
    return [v for n, v in msg.headers if n.lower() == name.encode()]


def host_is_authority(msg, rec, auth):
    got = _hdr(msg, "host")
    if got != [auth.encode()]:
        return f"origin saw Host {got!r}, expected [{auth!r}] (RFC 9112 §3.2.2)"
    return None


def method_is(m: bytes):
    def check(msg, rec, auth):
        return None if msg.method == m else f"origin saw method {msg.method!r}, expected {m!r}"
    return check


def value_is(name: str, value: bytes):
    def check(msg, rec, auth):
        got = _hdr(msg, name.lower())
        return None if got == [value] else f"origin saw {name} {got!r}, expected [{value!r}]"
    return check


def absent(*names: str):
    def check(msg, rec, auth):
        present = [n for n in names if _hdr(msg, n.lower())]
        return f"hop-by-hop/forbidden fields reached the origin: {present}" if present else None
    return check


def trailers_are(expected: list):
    def check(msg, rec, auth):
        got = [(n.lower(), v) for n, v in msg.trailers]
        return None if got == expected else f"origin saw trailers {got!r}, expected {expected!r}"
    return check


def all_of(*checks):
    def check(msg, rec, auth):
        for c in checks:
            err = c(msg, rec, auth)
            if err:
                return err
        return None
    return check


def chunk_sizes_are(sizes: list[bytes]):
    def check(msg, rec, auth):
        return None if msg.chunk_lines == sizes else \
            f"origin saw chunk-size lines {msg.chunk_lines!r}, expected {sizes!r}"
    return check


REQUEST_CASES: list[RequestCase] = [
    # ===================== CL.TE / TE.CL / TE.TE (head-level: refuse before forwarding) =====
    # RFC 9112 §6.1: a sender MUST NOT send CL with TE; §6.3 (3): such a message "ought to be
    # handled as an error" by an intermediary — the classic CL.TE / TE.CL desync [Linhart05].
    R("cl-te", req(POST, "Content-Length: 6", CHUNKED, body="0\r\n\r\nG"), S400,
      "RFC 9112 §6.3(3); CL.TE [Kettle19]"),
    R("te-cl", req(POST, CHUNKED, "Content-Length: 4",
                   body="5c\r\nGPOST /x HTTP/1.1\r\nContent-Length: 15\r\n\r\nx=1\r\n0\r\n\r\n"),
      S400, "RFC 9112 §6.3(3); TE.CL [Kettle19]"),
    R("te-cl-zero", req(POST, "Content-Length: 0", CHUNKED, body=HELLO_CHUNKED), S400,
      "RFC 9112 §6.3(3); CL: 0 with TE"),
    R("te-cl-connection-named", req(POST, "Connection: Transfer-Encoding", CHUNKED,
                                    "Content-Length: 5", body=HELLO_CHUNKED), S400,
      "RFC 9112 §6.3(3); TE hidden behind Connection (hop-by-hop deletion trick)"),
    R("te-xchunked", req(POST, "Transfer-Encoding: xchunked", body=HELLO_CHUNKED), S400_501,
      "RFC 9112 §6.3(4): final coding not chunked -> 400; TE.TE [Kettle19]"),
    R("te-chunkedx", req(POST, "Transfer-Encoding: chunkedx", body=HELLO_CHUNKED), S400_501,
      "RFC 9112 §6.3(4); TE.TE [Kettle19]"),
    R("te-space-before-colon", req(POST, "Transfer-Encoding : chunked", body=HELLO_CHUNKED),
      S400, "RFC 9112 §5.1: whitespace before colon MUST be rejected with 400; TE.TE [Kettle19]"),
    R("te-tab-before-colon", req(POST, "Transfer-Encoding\t: chunked", body=HELLO_CHUNKED),
      S400, "RFC 9112 §5.1; TE.TE [Kettle19]"),
    R("te-vtab", req(POST, "Transfer-Encoding:\x0bchunked", body=HELLO_CHUNKED), S400,
      "RFC 9110 §5.5: VT is not OWS nor field-vchar; TE.TE [Kettle19]"),
    R("te-formfeed", req(POST, "Transfer-Encoding:\x0cchunked", body=HELLO_CHUNKED), S400,
      "RFC 9110 §5.5: FF is a CTL; TE.TE"),
    R("te-nul-prefix", req(POST, "Transfer-Encoding: \x00chunked", body=HELLO_CHUNKED), S400,
      "RFC 9110 §5.5: NUL in a field value"),
    R("te-chunked-identity", req(POST, "Transfer-Encoding: chunked, identity",
                                 body=HELLO_CHUNKED), S400_501,
      "RFC 9112 §6.3(4): chunked not final"),
    R("te-identity", req(POST, "Transfer-Encoding: identity", "Content-Length: 5",
                         body="hello"), S400_501, "RFC 9112 §6.3(3)/(4); TE.TE [Kettle19]"),
    R("te-identity-only", req(POST, "Transfer-Encoding: identity", body="hello"), S400_501,
      "RFC 9112 §6.3(4): final coding not chunked"),
    R("te-identity-then-chunked-lines", req(POST, "Transfer-Encoding: identity", CHUNKED,
                                            body=HELLO_CHUNKED), S400_501,
      "RFC 9112 §6.1 (identity was removed; unknown coding -> 501) / duplicated TE lines"),
    R("te-dup-lines", req(POST, CHUNKED, CHUNKED, body=HELLO_CHUNKED), S400,
      "RFC 9112 §6.1: chunked MUST NOT be applied more than once; duplicated TE lines"),
    R("te-chunked-chunked-list", req(POST, "Transfer-Encoding: chunked, chunked",
                                     body=HELLO_CHUNKED), S400, "RFC 9112 §6.1"),
    R("te-chunked-then-x-lines", req(POST, CHUNKED, "Transfer-Encoding: x",
                                     body=HELLO_CHUNKED), S400_501,
      "RFC 9110 §5.3 (lines combine to 'chunked, x'); TE.TE [Kettle19]"),
    R("te-gzip-chunked", req(POST, "Transfer-Encoding: gzip, chunked", body=HELLO_CHUNKED),
      S400_501, "RFC 9112 §6.1: unimplemented coding -> 501"),
    R("te-chunked-gzip", req(POST, "Transfer-Encoding: chunked, gzip", body=HELLO_CHUNKED),
      S400_501, "RFC 9112 §6.3(4)"),
    R("te-empty-with-cl", req(POST, "Transfer-Encoding:", "Content-Length: 5", body="hello"),
      S400, "RFC 9112 §6.3(3): a TE field (even empty) plus CL is ambiguous"),
    R("te-empty", req(POST, "Transfer-Encoding: ", body="hello"), S400,
      "RFC 9112 §6.3(4): TE present, chunked not final"),
    R("te-quoted", req(POST, 'Transfer-Encoding: "chunked"', body=HELLO_CHUNKED), S400_501,
      "RFC 9112 §7: transfer-coding is a token, not a quoted-string"),
    R("te-param", req(POST, "Transfer-Encoding: chunked;q=1", body=HELLO_CHUNKED), S400_501,
      "RFC 9112 §7: chunked has no parameters"),
    R("te-internal-space", req(POST, "Transfer-Encoding: chu nked", body=HELLO_CHUNKED),
      S400_501, "RFC 9110 §5.6.2: token"),
    R("te-obs-fold", req(POST, "Transfer-Encoding:", " chunked", body=HELLO_CHUNKED), S400,
      "RFC 9112 §5.2: obs-fold in a request -> 400; TE.TE [Kettle19]"),
    R("te-bare-lf-hides-cl", req(POST, "Transfer-Encoding: chunked\nContent-Length: 5",
                                 body=HELLO_CHUNKED), S400,
      "RFC 9112 §2.2: bare LF; a peer splitting on LF would see CL+TE"),
    R("te-bare-cr-hides-cl", req(POST, "Transfer-Encoding: chunked\rContent-Length: 5",
                                 body=HELLO_CHUNKED), S400,
      "RFC 9112 §2.2: bare CR MUST be rejected or replaced by SP"),
    R("te-http10", req("POST $URL/echo/$TAG HTTP/1.0", CHUNKED, body=HELLO_CHUNKED), S400,
      "RFC 9112 §6.1: TE in an HTTP/1.0 message = faulty framing"),
    R("te-http10-with-cl", req("POST $URL/echo/$TAG HTTP/1.0", CHUNKED, "Content-Length: 5",
                               body=HELLO_CHUNKED), S400, "RFC 9112 §6.1, §6.3(3)"),

    # ===================== Content-Length =====================================================
    # RFC 9110 §8.6: Content-Length = 1*DIGIT; RFC 9112 §6.3(5): an invalid value is an
    # unrecoverable framing error -> 400 and close.
    R("cl-plus", req(POST, "Content-Length: +5", body="hello"), S400, "RFC 9110 §8.6"),
    R("cl-minus", req(POST, "Content-Length: -1", body="hello"), S400, "RFC 9110 §8.6"),
    R("cl-exponent", req(POST, "Content-Length: 1e2", body="hello"), S400, "RFC 9110 §8.6"),
    R("cl-hex", req(POST, "Content-Length: 0x5", body="hello"), S400, "RFC 9110 §8.6"),
    R("cl-decimal-point", req(POST, "Content-Length: 5.0", body="hello"), S400,
      "RFC 9110 §8.6"),
    R("cl-two-numbers", req(POST, "Content-Length: 5 5", body="hello"), S400,
      "RFC 9110 §8.6 (SP inside the value)"),
    R("cl-two-different-lines", req(POST, "Content-Length: 5", "Content-Length: 6",
                                    body="hello!"), S400,
      "RFC 9112 §6.3(5): differing CLs; CL.CL [Linhart05]"),
    R("cl-two-different-case", req(POST, "Content-Length: 5", "content-LENGTH: 6",
                                   body="hello!"), S400,
      "RFC 9110 §5.1 names are case-insensitive; RFC 9112 §6.3(5)"),
    R("cl-list-different", req(POST, "Content-Length: 5, 6", body="hello!"), S400,
      "RFC 9110 §8.6: only a list of identical values may be accepted"),
    R("cl-empty", req(POST, "Content-Length: ", body="hello"), S400, "RFC 9110 §8.6"),
    R("cl-empty-list-element", req(POST, "Content-Length: ,5", body="hello"), S400,
      "RFC 9110 §8.6 (not a list field)"),
    R("cl-overflow", req(POST, "Content-Length: 99999999999999999999", body="hello"),
      frozenset({400, 413}), "RFC 9110 §8.6: MUST anticipate overflow and not misparse it"),
    R("cl-fullwidth-digits", req(POST, "Content-Length: \uff15".encode("utf-8"),
                                 body="hello"), S400, "RFC 9110 §8.6: DIGIT is ASCII"),
    R("cl-obs-fold", req(POST, "Content-Length: 0", " 5", body="hello"), S400,
      "RFC 9112 §5.2: obs-fold"),
    R("cl-vtab", req(POST, "Content-Length:\x0b5", body="hello"), S400, "RFC 9110 §5.5"),
    R("cl-space-before-colon", req(POST, "Content-Length : 5", body="hello"), S400,
      "RFC 9112 §5.1"),
    R("cl-nul-suffix", req(POST, "Content-Length: 5\x00", body="hello"), S400,
      "RFC 9110 §5.5: NUL"),

    # ===================== field syntax =======================================================
    R("obs-fold", req(GET, "X-A: 1", " 2"), S400,
      "RFC 9112 §5.2: obs-fold in a request -> 400 (or replaced by SP)"),
    R("obs-fold-tab", req(GET, "X-A: 1", "\t2"), S400, "RFC 9112 §5.2"),
    R("ws-line-after-request-line", req(GET, " X-A: 1", host=True), S400,
      "RFC 9112 §2.2: whitespace between start-line and first field"),
    R("ws-before-colon", req(GET, "X-A : 1"), S400, "RFC 9112 §5.1: MUST reject with 400"),
    R("tab-before-colon", req(GET, "X-A\t: 1"), S400, "RFC 9112 §5.1"),
    R("host-space-before-colon", req(GET, "Host : evil.invalid", host=True), S400,
      "RFC 9112 §5.1 (Host vs 'Host ' confusion)"),
    R("bare-cr-in-value", req(GET, "X-A: a\rb"), S400, "RFC 9112 §2.2: bare CR"),
    R("bare-cr-eol", req(GET, "X-A: a\r"), S400, "RFC 9112 §2.2: CR CR LF"),
    R("bare-lf-line", req(GET, "X-A: a\nX-B: b"), S400, "RFC 9112 §2.2: bare LF"),
    R("bare-lf-end-of-head", b"GET $URL/echo/$TAG HTTP/1.1\r\nHost: $AUTH\r\n\n", S400,
      "RFC 9112 §2.2: head ended by bare LF"),
    R("all-bare-lf", b"GET $URL/echo/$TAG HTTP/1.1\nHost: $AUTH\n\n", S400,
      "RFC 9112 §2.2: LF-only line endings"),
    R("nul-in-value", req(GET, "X-A: a\x00b"), S400, "RFC 9110 §5.5: NUL MUST be rejected"),
    R("ctl-01-in-value", req(GET, "X-A: a\x01b"), S400, "RFC 9110 §5.5"),
    R("ctl-1b-in-value", req(GET, "X-A: a\x1bb"), S400, "RFC 9110 §5.5"),
    R("del-in-value", req(GET, "X-A: a\x7fb"), S400, "RFC 9110 §5.5: DEL is a CTL"),
    R("name-paren", req(GET, "X(Y): v"), S400, "RFC 9110 §5.1: field-name = token"),
    R("name-empty", req(GET, ": v"), S400, "RFC 9110 §5.1"),
    R("name-colon-only", req(GET, ":"), S400, "RFC 9110 §5.1"),
    R("name-h2-pseudo", req(GET, ":authority: evil.invalid"), S400,
      "RFC 9110 §5.1 (HTTP/2 pseudo-header in HTTP/1.1)"),
    R("name-non-ascii", req(GET, "X\xe9: v"), S400, "RFC 9110 §5.1"),
    R("name-utf8", req(GET, "X-\u00c5: v".encode("utf-8")), S400, "RFC 9110 §5.1"),
    R("name-space", req(GET, "X Y: v"), S400, "RFC 9110 §5.1"),
    R("name-quote", req(GET, '"X": v'), S400, "RFC 9110 §5.1"),
    R("name-slash", req(GET, "X/Y: v"), S400, "RFC 9110 §5.1"),
    R("name-at", req(GET, "X@Y: v"), S400, "RFC 9110 §5.1"),
    R("name-brace", req(GET, "X{}: v"), S400, "RFC 9110 §5.1"),
    R("name-nul", req(GET, "X\x00Y: v"), S400, "RFC 9110 §5.1"),
    R("line-without-colon", req(GET, "Foo"), S400, "RFC 9112 §5"),
    R("bad-then-pipelined-good", req(GET, "X-A : 1") + req("GET $URL/echo/$TAG-2 HTTP/1.1"),
      S400, "RFC 9112 §9.3.2 / §11.2: after a framing error the stream position is unknown; "
      "nothing pipelined behind it may be forwarded"),
    R("cl-te-smuggled-request", req(POST, "Content-Length: 58", CHUNKED,
                                    body="0\r\n\r\nGET $URL/echo/$TAG-smuggled HTTP/1.1\r\n"
                                         "X: x"), S400,
      "CL.TE carrying a full smuggled request [Kettle19]"),

    # ===================== request line =======================================================
    R("rl-double-space", req("GET  $URL/echo/$TAG HTTP/1.1"), S400,
      "RFC 9112 §3: single SP separators"),
    R("rl-trailing-space", req("GET $URL/echo/$TAG HTTP/1.1 "), S400, "RFC 9112 §3"),
    R("rl-leading-space", req(" GET $URL/echo/$TAG HTTP/1.1"), S400, "RFC 9112 §3"),
    R("rl-tabs", req("GET\t$URL/echo/$TAG\tHTTP/1.1"), S400, "RFC 9112 §3"),
    R("rl-extra-word", req("GET $URL/echo/$TAG HTTP/1.1 extra"), S400, "RFC 9112 §3"),
    R("rl-target-with-space", req("GET $URL/echo/$TAG x HTTP/1.1"), S400,
      "RFC 9112 §3.2: no whitespace in request-target"),
    R("rl-http09", req("GET $URL/echo/$TAG HTTP/0.9"), S400_505,
      "RFC 9110 §15.6.6 / RFC 9112 §2.3"),
    R("rl-http20", req("GET $URL/echo/$TAG HTTP/2.0"), S400_505, "RFC 9110 §15.6.6"),
    R("rl-http110", req("GET $URL/echo/$TAG HTTP/1.10"), S400_505,
      "RFC 9112 §2.3: HTTP-version = HTTP-name '/' DIGIT '.' DIGIT"),
    R("rl-lowercase-version", req("GET $URL/echo/$TAG http/1.1"), S400,
      "RFC 9112 §2.3: HTTP-name is case-sensitive"),
    R("rl-missing-version", req("GET $URL/echo/$TAG"), S400,
      "RFC 9112 §3 (HTTP/0.9 simple-request is not supported)"),
    R("rl-version-space", req("GET $URL/echo/$TAG HTTP/ 1.1"), S400, "RFC 9112 §2.3"),
    R("rl-version-nul", req("GET $URL/echo/$TAG HTTP/1.1\x00"), S400, "RFC 9112 §2.3"),
    R("rl-method-paren", req("GE(T $URL/echo/$TAG HTTP/1.1"), S400,
      "RFC 9110 §9.1: method = token"),
    R("rl-method-nul", req("GE\x00T $URL/echo/$TAG HTTP/1.1"), S400, "RFC 9110 §9.1"),
    R("rl-method-non-ascii", req("G\xc9T $URL/echo/$TAG HTTP/1.1"), S400, "RFC 9110 §9.1"),
    R("rl-target-nul", req("GET $URL/echo/$TAG\x00x HTTP/1.1"), S400,
      "RFC 9112 §3.2 / RFC 3986: no CTL in the target"),
    R("rl-target-ctl", req("GET $URL/echo/$TAG\x01x HTTP/1.1"), S400, "RFC 9112 §3.2"),
    R("rl-target-del", req("GET $URL/echo/$TAG\x7fx HTTP/1.1"), S400, "RFC 9112 §3.2"),
    R("rl-target-tab", req("GET $URL/echo/$TAG\tx HTTP/1.1"), S400, "RFC 9112 §3.2"),
    R("rl-target-bare-cr", req("GET $URL/echo/$TAG\r HTTP/1.1"), S400, "RFC 9112 §2.2"),
    R("rl-target-obs-text", req("GET $URL/echo/$TAG\xff HTTP/1.1"), S400,
      "RFC 3986 §2: URIs are ASCII"),
    R("rl-nine-leading-crlf", b"\r\n" * 9 + req(GET), S400,
      "RFC 9112 §2.2: a server SHOULD ignore at least one empty line (proxyd: up to 8)"),
    R("rl-too-long", req("GET $URL/echo/$TAG?$PAD HTTP/1.1"), S414,
      "RFC 9112 §3: 414 for a request line over the limit (8193 bytes)",
      pad_to=("line", 8193)),

    # ===================== request target / routing ===========================================
    R("tgt-origin-form", req("GET /echo/$TAG HTTP/1.1"), S400,
      "RFC 9112 §3.2.2: a forward proxy needs absolute-form"),
    R("tgt-asterisk-get", req("GET * HTTP/1.1"), S400,
      "RFC 9112 §3.2.4: asterisk-form only for OPTIONS"),
    R("tgt-authority-form-get", req("GET $AUTH HTTP/1.1"), S400,
      "RFC 9112 §3.2.3: authority-form only for CONNECT"),
    R("tgt-ftp", req("GET ftp://$AUTH/echo/$TAG HTTP/1.1"), S400, "not an http(s) URI"),
    R("tgt-empty-authority", req("GET http:///echo/$TAG HTTP/1.1"), S400,
      "RFC 9110 §4.2.1: http URI with empty host is invalid"),
    R("tgt-userinfo", req("GET http://u:p@$AUTH/echo/$TAG HTTP/1.1"), S400,
      "RFC 9110 §4.2.4: userinfo is deprecated; MUST NOT be generated, a phishing vector"),
    R("tgt-userinfo-confusion", req("GET http://$AUTH@evil.invalid/echo/$TAG HTTP/1.1"), S400,
      "RFC 9110 §4.2.4: 'host@evil' confusion"),
    R("tgt-fragment", req("GET $URL/echo/$TAG#frag HTTP/1.1"), S400,
      "RFC 9112 §3.2: request-target has no fragment"),
    R("tgt-fragment-in-authority", req("GET http://$AUTH#/echo/$TAG HTTP/1.1"), S400,
      "RFC 3986 §3.5"),
    R("tgt-port-zero", req("GET http://localhost:0/echo/$TAG HTTP/1.1"), S400,
      "RFC 3986 §3.2.3"),
    R("tgt-port-huge", req("GET http://localhost:99999/echo/$TAG HTTP/1.1"), S400,
      "RFC 3986 §3.2.3"),
    R("tgt-port-plus", req("GET http://localhost:+443/echo/$TAG HTTP/1.1"), S400,
      "RFC 3986 §3.2.3: port = *DIGIT"),
    R("tgt-double-port", req("GET http://$AUTH:1/echo/$TAG HTTP/1.1"), S400, "RFC 3986 §3.2"),
    R("tgt-bad-host-char", req("GET http://loc<al>host/echo/$TAG HTTP/1.1"), S400,
      "RFC 3986 §3.2.2"),
    R("tgt-unclosed-ipv6", req("GET http://[::1/echo/$TAG HTTP/1.1"), S400, "RFC 3986 §3.2.2"),
    R("tgt-backslash", req("GET http://$AUTH\\@evil.invalid/echo/$TAG HTTP/1.1"), S400,
      "RFC 3986 (backslash authority confusion)"),

    # ===================== Host ===============================================================
    R("host-two", req(GET, "Host: other.invalid"), S400,
      "RFC 9112 §3.2: more than one Host -> 400"),
    R("host-two-identical", req(GET, "Host: $AUTH"), S400, "RFC 9112 §3.2"),
    R("host-two-case", req(GET, "HOST: $AUTH"), S400, "RFC 9112 §3.2; RFC 9110 §5.1"),
    R("host-missing", req(GET, "Accept: */*", host=False), S400,
      "RFC 9112 §3.2: HTTP/1.1 request without Host -> 400"),
    R("host-list-value", req(GET, "Host: a.invalid, b.invalid", host=False), S400,
      "RFC 9112 §3.2: a Host field with an invalid value (two hosts joined) is a 400"),
    R("host-userinfo", req(GET, "Host: user@$AUTH", host=False), S400,
      "RFC 9112 §3.2; RFC 9110 §7.2: Host is uri-host [\":\" port], no userinfo"),
    R("host-bad-port", req(GET, "Host: localhost:http", host=False), S400,
      "RFC 9112 §3.2; RFC 3986 §3.2.3: port = *DIGIT"),
    R("proxy-authorization-twice", req(GET, "Proxy-Authorization: Basic eA==",
                                        "Proxy-Authorization: Basic eQ=="), S400,
      "RFC 9110 §11.7.2: Proxy-Authorization holds one set of credentials"),
    R("host-lookalike-only", req(GET, "X-Host: $AUTH", host=False), S400, "RFC 9112 §3.2"),

    # ===================== limits =============================================================
    R("head-too-large", req(GET, "X-Pad: $PAD"), S431,
      "RFC 6585 §5: 431 for a head over limits.head_size (65537 bytes)",
      pad_to=("head", 65537)),
    R("too-many-fields", req(GET, *[f"X-F{i}: {i}" for i in range(100)]), S431,
      "RFC 6585 §5: 101 field lines > limits.header_count"),

    # ===================== Expect / CONNECT / Via =============================================
    R("expect-unknown", req(GET, "Expect: x-unknown"), S417,
      "RFC 9110 §10.1.1: 417 for an expectation that cannot be met"),
    R("expect-list-unknown", req(GET, "Expect: 100-continue, x-unknown"), S417,
      "RFC 9110 §10.1.1"),
    R("expect-split-lines-unknown", req(GET, "Expect: 100-continue", "Expect: x-unknown"), S417,
      "RFC 9110 §5.3: two field lines == one comma-joined list, same verdict as "
      "expect-list-unknown"),
    R("expect-unknown-with-body", req(POST, "Expect: x-unknown", "Content-Length: 5",
                                      body="hello"), S417, "RFC 9110 §10.1.1"),
    A("expect-empty", req(GET, "Expect: "),
      "RFC 9110 §5.6.1.2: empty list elements are ignored, so nothing is expected"),
    R("connect-port-not-allowed", req("CONNECT $AUTH HTTP/1.1"), S403,
      "RFC 9110 §9.3.6: proxies SHOULD restrict CONNECT to known ports"),
    R("connect-no-port", req("CONNECT localhost HTTP/1.1"), S400,
      "RFC 9110 §9.3.6: CONNECT needs host:port"),
    R("connect-absolute-uri", req("CONNECT $URL/ HTTP/1.1"), S400,
      "RFC 9112 §3.2.3: authority-form only"),
    R("via-loop", req(GET, "Via: 1.1 proxyd"), S508, "RFC 9110 §7.6.3 / RFC 5842 §7.2: 508"),
    R("via-loop-in-list", req(GET, "Via: 1.0 a, 1.1 PROXYD"), S508, "RFC 9110 §7.6.3"),
    R("via-loop-second-line", req(GET, "Via: 1.1 a", "Via: 1.1 proxyd (c)"), S508,
      "RFC 9110 §7.6.3"),

    # ===================== chunked body defects (head valid; defect in the body) ==============
    R("chunk-0x", req(POST, CHUNKED, body="0x5\r\nhello\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1: chunk-size = 1*HEXDIG", stage="body"),
    R("chunk-trailing-space", req(POST, CHUNKED, body="5 \r\nhello\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1.1: BWS only before ';'", stage="body"),
    R("chunk-plus", req(POST, CHUNKED, body="+5\r\nhello\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1", stage="body"),
    R("chunk-minus-zero", req(POST, CHUNKED, body="-0\r\n\r\n"), S400, "RFC 9112 §7.1",
      stage="body"),
    R("chunk-leading-space", req(POST, CHUNKED, body=" 5\r\nhello\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1", stage="body"),
    R("chunk-overflow-18", req(POST, CHUNKED, body="ffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
      S400, "RFC 9112 §7.1: recipients MUST anticipate overflow", stage="body"),
    R("chunk-overflow-16", req(POST, CHUNKED, body="ffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
      S400, "RFC 9112 §7.1 (2^64-1 wraps to -1 in 64-bit parsers)", stage="body"),
    R("chunk-empty-size", req(POST, CHUNKED, body="\r\nhello\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1", stage="body"),
    R("chunk-size-nul", req(POST, CHUNKED, body="5\x00\r\nhello\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1", stage="body"),
    R("chunk-ext-unterminated", req(POST, CHUNKED, body='5;ext="unterminated\r\nhello\r\n'
                                                        '0\r\n\r\n'), S400,
      "RFC 9112 §7.1.1: quoted-string", stage="body"),
    R("chunk-ext-empty-name", req(POST, CHUNKED, body="5;=v\r\nhello\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1.1", stage="body"),
    R("chunk-ext-semicolon-only", req(POST, CHUNKED, body="5;\r\nhello\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1.1: chunk-ext-name = token", stage="body"),
    R("chunk-ext-space-in-value", req(POST, CHUNKED, body="5;a=b c\r\nhello\r\n0\r\n\r\n"),
      S400, "RFC 9112 §7.1.1", stage="body"),
    R("chunk-bare-lf-after-size", req(POST, CHUNKED, body="5\nhello\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1; bare LF terminator [Funky24]", stage="body"),
    R("chunk-bare-lf-in-ext", req(POST, CHUNKED, body="5;a\nxx\r\nhello\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1.1; TERM.EXT [Funky24]", stage="body"),
    R("chunk-bare-cr-in-ext", req(POST, CHUNKED, body="5;a\rxx\r\nhello\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1.1; bare CR [Funky24]", stage="body"),
    R("chunk-missing-crlf-after-data", req(POST, CHUNKED, body="5\r\nhello0\r\n\r\n"), S400,
      "RFC 9112 §7.1: chunk = chunk-size CRLF chunk-data CRLF", stage="body"),
    R("chunk-data-longer", req(POST, CHUNKED, body="5\r\nhelloXX\r\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1 (data longer than size)", stage="body"),
    R("chunk-bare-lf-after-data", req(POST, CHUNKED, body="5\r\nhello\n0\r\n\r\n"), S400,
      "RFC 9112 §7.1; [Funky24]", stage="body"),
    R("trailer-ws-before-colon", req(POST, CHUNKED, body="5\r\nhello\r\n0\r\nX-T : 1\r\n\r\n"),
      S400, "RFC 9112 §7.1.2 + §5.1", stage="body"),
    R("trailer-obs-fold", req(POST, CHUNKED, body="5\r\nhello\r\n0\r\nX-T: 1\r\n 2\r\n\r\n"),
      S400, "RFC 9112 §7.1.2 + §5.2", stage="body"),
    R("trailer-is-a-request-line", req(POST, CHUNKED,
                                       body="0\r\nGET $URL/echo/$TAG-smuggled HTTP/1.1\r\n"
                                            "Host: $AUTH\r\n\r\n"),
      S400, "RFC 9112 §7.1.2: the trailer section holds fields only (0-chunk confusion)",
      stage="body"),

    # ===================== accepted but tricky: forwarded once, re-framed canonically =========
    A("ok-te-tab-ows", req(POST, "Transfer-Encoding:\tchunked", body=HELLO_CHUNKED),
      "RFC 9110 §5.6.3: OWS = *( SP / HTAB ); TE:\\tchunked is valid", body=b"hello",
      method="POST", check=chunk_sizes_are([b"5", b"0"])),
    A("ok-te-no-ows", req(POST, "Transfer-Encoding:chunked", body=HELLO_CHUNKED),
      "RFC 9112 §5.1: OWS is optional", body=b"hello", method="POST"),
    A("ok-te-trailing-ows", req(POST, "Transfer-Encoding: chunked \t", body=HELLO_CHUNKED),
      "RFC 9112 §5.1: trailing OWS is not part of the value", body=b"hello", method="POST"),
    A("ok-te-uppercase", req(POST, "Transfer-Encoding: CHUNKED", body=HELLO_CHUNKED),
      "RFC 9112 §7: coding names are case-insensitive", body=b"hello", method="POST",
      check=value_is("Transfer-Encoding", b"chunked")),
    A("ok-te-name-case", req(POST, "tRANSFER-eNCODING: chunked", body=HELLO_CHUNKED),
      "RFC 9110 §5.1: field names are case-insensitive", body=b"hello", method="POST"),
    A("ok-te-empty-list-element", req(POST, "Transfer-Encoding: , chunked",
                                      body=HELLO_CHUNKED),
      "RFC 9110 §5.6.1.2: recipients MUST accept empty list elements", body=b"hello",
      method="POST", check=value_is("Transfer-Encoding", b"chunked")),
    A("ok-cl-leading-ows", req(POST, "Content-Length:  5", body="hello"),
      "RFC 9112 §5.1: leading OWS ('  5') is valid", body=b"hello", method="POST",
      check=value_is("Content-Length", b"5")),
    A("ok-cl-tab-ows", req(POST, "Content-Length:\t5\t", body="hello"),
      "RFC 9110 §5.6.3: HTAB is OWS", body=b"hello", method="POST",
      check=value_is("Content-Length", b"5")),
    A("ok-cl-trailing-ows", req(POST, "Content-Length: 5 ", body="hello"),
      "RFC 9112 §5.1: trailing OWS is not part of the value", body=b"hello", method="POST",
      check=value_is("Content-Length", b"5")),
    A("ok-cl-no-ows", req(POST, "content-length:5", body="hello"),
      "RFC 9112 §5.1: OWS is optional", body=b"hello", method="POST"),
    A("ok-host-tab-ows", req(GET, "Host:\t$AUTH\t", host=False),
      "RFC 9110 §5.6.3: HTAB is OWS around the Host value", check=host_is_authority),
    A("ok-cl-two-identical-lines", req(POST, "Content-Length: 5", "Content-Length: 5",
                                       body="hello"),
      "RFC 9110 §8.6: identical repeated CL MAY be accepted (as one)", body=b"hello",
      method="POST", check=value_is("Content-Length", b"5")),
    A("ok-cl-identical-list", req(POST, "Content-Length: 5, 5", body="hello"),
      "RFC 9110 §8.6: '42, 42' MAY be accepted as 42", body=b"hello", method="POST",
      check=value_is("Content-Length", b"5")),
    A("ok-cl-leading-zeros", req(POST, "Content-Length: 005", body="hello"),
      "RFC 9110 §8.6: 1*DIGIT (decimal, leading zeros allowed); re-emitted as 5",
      body=b"hello", method="POST", check=value_is("Content-Length", b"5")),
    A("ok-cl-zero-get", req(GET, "Content-Length: 0"),
      "RFC 9112 §6.3(6): CL 0 is framing", check=value_is("Content-Length", b"0")),
    A("ok-get-with-body", req(GET, "Content-Length: 5", body="hello"),
      "RFC 9110 §9.3.1: GET content has no semantics but framing is kept (CL.0 [Kettle22])",
      body=b"hello"),
    A("ok-cl-named-by-connection", req(POST, "Connection: Content-Length",
                                       "Content-Length: 5", body="hello"),
      "RFC 9110 §7.6.1: Connection-named CL must not lose framing (hop-by-hop deletion "
      "trick)", body=b"hello", method="POST", check=value_is("Content-Length", b"5")),
    A("ok-te-named-by-connection", req(POST, "Connection: close, Transfer-Encoding", CHUNKED,
                                       body=HELLO_CHUNKED),
      "RFC 9110 §7.6.1: Connection-named TE; framing must be re-generated", body=b"hello",
      method="POST", check=value_is("Transfer-Encoding", b"chunked")),
    A("ok-host-named-by-connection", req(GET, "Connection: Host"),
      "RFC 9110 §7.6.1 + RFC 9112 §3.2: Host must still reach the origin",
      check=host_is_authority),
    A("ok-chunk-ext-stripped", req(POST, CHUNKED, body="5;foo=bar\r\nhello\r\n0\r\n\r\n"),
      "RFC 9112 §7.1.1: extensions may be ignored; proxyd strips them", body=b"hello",
      method="POST", check=chunk_sizes_are([b"5", b"0"])),
    A("ok-chunk-ext-quoted-bws", req(POST, CHUNKED,
                                     body='5 ; a = "q \\" v" ;b\t=\tc\r\nhello\r\n0\r\n\r\n'),
      "RFC 9112 §7.1.1: BWS and quoted-string with quoted-pair", body=b"hello",
      method="POST", check=chunk_sizes_are([b"5", b"0"])),
    A("ok-chunk-leading-zeros", req(POST, CHUNKED, body="0005\r\nhello\r\n000\r\n\r\n"),
      "RFC 9112 §7.1: 1*HEXDIG; re-emitted canonically", body=b"hello", method="POST",
      check=chunk_sizes_are([b"5", b"0"])),
    A("ok-chunk-uppercase-hex", req(POST, CHUNKED, body="A\r\n0123456789\r\n0\r\n\r\n"),
      "RFC 9112 §7.1: HEXDIG is case-insensitive", body=b"0123456789", method="POST",
      check=chunk_sizes_are([b"a", b"0"])),
    A("ok-chunk-many-small", req(POST, CHUNKED, body="".join(f"1\r\n{ch}\r\n" for ch in "hello")
                                 + "0\r\n\r\n"),
      "RFC 9112 §7.1", body=b"hello", method="POST"),
    A("ok-chunk-last-ext", req(POST, CHUNKED, body="5\r\nhello\r\n0;end=1\r\n\r\n"),
      "RFC 9112 §7.1: last-chunk may carry extensions", body=b"hello", method="POST"),
    A("ok-trailer-forwarded", req(POST, CHUNKED, "TE: trailers",
                                  body="5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"),
      "RFC 9112 §7.1.2: trailer fields", body=b"hello", method="POST",
      check=trailers_are([(b"x-sum", b"1")])),
    A("ok-trailer-forbidden-stripped", req(POST, CHUNKED,
                                           body="5\r\nhello\r\n0\r\nContent-Length: 50\r\n"
                                                "Transfer-Encoding: chunked\r\nHost: evil\r\n"
                                                "\r\n"),
      "RFC 9110 §6.5.1: framing/routing fields MUST NOT be trailers", body=b"hello",
      method="POST", check=trailers_are([])),
    A("ok-obs-text-value", req(GET, "X-A: caf\xe9"),
      "RFC 9110 §5.5: obs-text is allowed in values",
      check=value_is("X-A", b"caf\xe9")),
    A("ok-htab-in-value", req(GET, "X-A: a\tb"), "RFC 9110 §5.5: HTAB inside a value",
      check=value_is("X-A", b"a\tb")),
    A("ok-all-tchar-name", req(GET, "X!#$%&'*+-.^_`|~Y: v"), "RFC 9110 §5.6.2: tchar",
      check=value_is("X!#$%&'*+-.^_`|~Y", b"v")),
    A("ok-underscore-te-lookalike", req(POST, "Transfer_Encoding: chunked",
                                        "Content-Length: 5", body="hello"),
      "RFC 9110 §5.1: a different field; framing is by Content-Length", body=b"hello",
      method="POST", check=value_is("Content-Length", b"5")),
    A("ok-lowercase-method", req("get $URL/echo/$TAG HTTP/1.1"),
      "RFC 9110 §9.1: methods are case-sensitive tokens; 'get' is forwarded unchanged",
      method="get", check=method_is(b"get")),
    A("ok-extension-method", req("X-CUSTOM $URL/echo/$TAG HTTP/1.1"),
      "RFC 9110 §9.1: unknown methods are forwarded", method="X-CUSTOM",
      check=method_is(b"X-CUSTOM")),
    A("ok-http12", req("GET $URL/echo/$TAG HTTP/1.2"),
      "RFC 9110 §2.5 / RFC 9112 §2.3: higher minor version processed as 1.1"),
    A("ok-leading-crlf", b"\r\n" + req(GET),
      "RFC 9112 §2.2: SHOULD ignore at least one empty line before the request-line"),
    A("ok-leading-crlf-8", b"\r\n" * 8 + req(GET), "RFC 9112 §2.2"),
    A("ok-host-mismatch", req(GET, "Host: b.invalid", host=False),
      "RFC 9112 §3.2.2: proxy MUST replace Host with the target's authority",
      check=host_is_authority),
    A("ok-host-empty", req(GET, "Host: ", host=False),
      "RFC 9112 §3.2.2: Host replaced from absolute-form", check=host_is_authority),
    A("ok-http10-no-host", req("GET $URL/echo/$TAG HTTP/1.0", host=False),
      "RFC 9112 §3.2: Host is only required in HTTP/1.1; proxyd adds it",
      check=host_is_authority),
    A("ok-uri-uppercase-scheme-host", req("GET HTTP://LOCALHOST:$PORT/echo/$TAG HTTP/1.1"),
      "RFC 3986 §3.1, §3.2.2: scheme and host are case-insensitive"),
    A("ok-empty-path-query", req("GET $URL?tag=$TAG HTTP/1.1"),
      "RFC 9112 §3.2.1: empty path is sent as '/'", target="/?tag=$TAG", ok_status=404),
    A("ok-options-asterisk", req("OPTIONS $URL HTTP/1.1", "X-Tag: $TAG"),
      "RFC 9112 §3.2.4: OPTIONS with empty path becomes asterisk-form at the last proxy",
      target="*", ok_status=404, method="OPTIONS"),
    A("ok-pct-encoded-nul", req("GET $URL/echo/$TAG%00x HTTP/1.1"),
      "RFC 3986 §2.1: percent-encoding is opaque to the proxy", target="/echo/$TAG%00x"),
    A("ok-h2c-upgrade-stripped", req(GET, "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__",
                                     "Connection: Upgrade, HTTP2-Settings"),
      "RFC 9110 §7.6.1, §7.8; h2c smuggling [BishopFox20]",
      check=absent("Upgrade", "HTTP2-Settings", "Keep-Alive")),
    A("ok-hop-by-hop-stripped", req(GET, "Proxy-Authorization: Basic eA==",
                                    "Proxy-Connection: keep-alive", "Keep-Alive: 5",
                                    "Connection: X-Secret", "X-Secret: 1"),
      "RFC 9110 §7.6.1, §11.7.2",
      check=absent("Proxy-Authorization", "Proxy-Connection", "Keep-Alive", "X-Secret")),
    A("ok-expect-case-insensitive", req(POST, "Expect: 100-Continue", "Content-Length: 5",
                                        body="hello"),
      "RFC 9110 §10.1.1: the Expect value is case-insensitive", body=b"hello",
      method="POST"),
    A("ok-expect-http10-dropped", req("POST $URL/echo/$TAG HTTP/1.0", "Expect: 100-continue",
                                      "Content-Length: 5", body="hello"),
      "RFC 9110 §10.1.1: 100-continue from HTTP/1.0 MUST be ignored", body=b"hello",
      method="POST", check=absent("Expect")),
    A("ok-via-other-proxy", req(GET, "Via: 1.1 proxyd-edge"),
      "RFC 9110 §7.6.3: a different pseudonym is not a loop"),
    A("ok-cl-body-then-pipelined", req(POST, "Content-Length: 5",
                                       body="hello" + "GET $URL/echo/$TAG HTTP/1.1\r\n"
                                            "Host: $AUTH\r\n\r\n"),
      "RFC 9112 §9.3.2: bytes after the CL body are the next (pipelined) request — both the "
      "proxy and the origin must see two requests [Linhart05]",
      body=b"hello", method="POST", count=2),
    A("ok-100-fields", req(GET, *[f"X-F{i}: {i}" for i in range(99)]),
      "limits.header_count = 100 (boundary, accepted)"),
    A("ok-head-exactly-limit", req("GET $URL/headers/$TAG HTTP/1.1", "X-Pad: $PAD"),
      "limits.head_size = 65536 (boundary, accepted; /headers answers in the body)",
      pad_to=("head", 65536), target="/headers/$TAG"),
    A("ok-request-line-exactly-limit", req("GET $URL/echo/$TAG?$PAD HTTP/1.1"),
      "limits.request_line = 8192 (boundary, accepted)", pad_to=("line", 8192),
      target="/echo/$TAG?$PAD"),
]


# --------------------------------------------------------------------------------------------
# Response corpus (scripted TLS origin, one response per case)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseCase:
    """One malformed (or tricky) origin response.

    ``outcomes``: what the client may observe — ``"502"`` (generated error with Proxy-Status),
    ``"incomplete"`` (a valid head then a close before the announced end), ``"complete"``
    (a complete response whose body must equal ``body``).
    ``after``: what the origin does after sending — ``keep`` (keeps the connection open and
    would serve another request on it), ``fin`` (TCP close without TLS close_notify),
    ``close_notify`` (TLS close_notify, then close).
    ``pipelined``: the client's next request is sent together with the case's request.
    """

    id: str
    response: bytes
    outcomes: frozenset
    ref: str
    after: str = "keep"
    method: str = "GET"
    body: bytes = b""
    status: int = 200
    pipelined: bool = False
    discard: bool = True  # the upstream connection must not be reused afterwards


SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: 1\r\n\r\nSMUGGLED"
E502 = frozenset({"502"})
INCOMPLETE = frozenset({"incomplete", "502"})
COMPLETE = frozenset({"complete"})


def resp(first: str, *headers: str, body: bytes | str = b"") -> bytes:
    return ("\r\n".join((first,) + headers) + "\r\n\r\n").encode("latin-1") + _b(body)


OK = "HTTP/1.1 200 OK"

RESPONSE_CASES: list[ResponseCase] = [
    # -- framing conflicts (RFC 9112 §6.3) ----------------------------------------------------
    ResponseCase("cl-and-te", resp(OK, "Content-Length: 5", "Transfer-Encoding: chunked",
                                   body=b"0\r\n\r\n" + SMUGGLED), E502,
                 "RFC 9112 §6.3(3): CL+TE in a response; the proxy MUST NOT forward ambiguous "
                 "framing"),
    ResponseCase("two-different-cl", resp(OK, "Content-Length: 5", "Content-Length: 83",
                                          body=b"hello" + SMUGGLED), E502,
                 "RFC 9112 §6.3(5): differing CLs -> 502 and discard the connection"),
    ResponseCase("cl-list-different", resp(OK, "Content-Length: 5, 6", body="hello!"), E502,
                 "RFC 9110 §8.6"),
    ResponseCase("negative-cl", resp(OK, "Content-Length: -1", body="hello"), E502,
                 "RFC 9110 §8.6"),
    ResponseCase("cl-plus", resp(OK, "Content-Length: +5", body="hello"), E502,
                 "RFC 9110 §8.6"),
    ResponseCase("cl-hex", resp(OK, "Content-Length: 0x5", body="hello"), E502,
                 "RFC 9110 §8.6"),
    ResponseCase("te-not-chunked", resp(OK, "Transfer-Encoding: gzip", body="xyz"),
                 frozenset({"502", "complete"}),
                 "RFC 9112 §6.3(4): final coding not chunked (proxyd refuses)",
                 after="close_notify", body=b"xyz"),
    ResponseCase("te-chunked-twice", resp(OK, "Transfer-Encoding: chunked, chunked",
                                          body="5\r\nhello\r\n0\r\n\r\n"), E502,
                 "RFC 9112 §6.1"),
    # -- status line (RFC 9112 §4, RFC 9110 §15) ----------------------------------------------
    ResponseCase("garbage-status-line", resp("HTTP/1.1 abc OK", "Content-Length: 0"), E502,
                 "RFC 9112 §4: status-code = 3DIGIT"),
    ResponseCase("not-http", b"garbage\r\n\r\n", E502, "RFC 9112 §4"),
    ResponseCase("status-099", resp("HTTP/1.1 099 Low", "Content-Length: 0"), E502,
                 "RFC 9110 §15: status codes are 100..599"),
    ResponseCase("status-600", resp("HTTP/1.1 600 High", "Content-Length: 0"), E502,
                 "RFC 9110 §15"),
    ResponseCase("status-two-digits", resp("HTTP/1.1 20 OK", "Content-Length: 0"), E502,
                 "RFC 9112 §4"),
    ResponseCase("status-http2", resp("HTTP/2.0 200 OK", "Content-Length: 0"), E502,
                 "RFC 9112 §2.3: major version 2 on an HTTP/1.1 connection"),
    ResponseCase("status-double-space", resp("HTTP/1.1  200 OK", "Content-Length: 0"), E502,
                 "RFC 9112 §4: single SP"),
    ResponseCase("icy", resp("ICY 200 OK", "Content-Length: 0"), E502,
                 "RFC 9112 §4 (SHOUTcast status line)"),
    # -- field syntax --------------------------------------------------------------------------
    ResponseCase("obs-fold", resp(OK, "X-A: 1", " 2", "Content-Length: 5", body="hello"), E502,
                 "RFC 9112 §5.2: a proxy MUST discard the message and send 502, or replace "
                 "obs-fold with SP"),
    # RFC 9112 §2.2: a recipient MAY take a lone LF as a line end. nginx, HAProxy and Squid do
    # for responses, and so does proxyd: it re-serialises the head, the client sees CRLF.
    ResponseCase("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello", COMPLETE,
                 "RFC 9112 §2.2 (MAY accept)", body=b"hello", discard=False),
    ResponseCase("bare-lf-chunked", b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n"
                                    b"5\nhello\n0\n\n", COMPLETE,
                 "RFC 9112 §2.2 (MAY accept)", body=b"hello", discard=False),
    ResponseCase("nul-in-value", resp(OK, "X-A: a\x00b", "Content-Length: 5", body="hello"),
                 E502, "RFC 9110 §5.5: NUL MUST be rejected or replaced"),
    ResponseCase("bare-cr-in-value", resp(OK, "X-A: a\rb", "Content-Length: 5", body="hello"),
                 E502, "RFC 9112 §2.2"),
    ResponseCase("ws-before-colon", resp(OK, "Content-Length : 5", body="hello"), E502,
                 "RFC 9112 §5.1: a proxy MUST remove it before forwarding (or reject)"),
    ResponseCase("invalid-name", resp(OK, "X Y: 1", "Content-Length: 5", body="hello"), E502,
                 "RFC 9110 §5.1"),
    ResponseCase("head-too-large", resp(OK, "X-Big: " + "a" * 70000, "Content-Length: 5",
                                        body="hello"), E502,
                 "limits.head_size = 65536 applies to responses too"),
    # -- bodies cut or broken after a valid head -------------------------------------------------
    ResponseCase("bad-chunk-size", resp(OK, "Transfer-Encoding: chunked",
                                        body="0x5\r\nhello\r\n0\r\n\r\n"), INCOMPLETE,
                 "RFC 9112 §7.1: the head may already be out; the client must see truncation"),
    ResponseCase("chunk-data-longer", resp(OK, "Transfer-Encoding: chunked",
                                           body="5\r\nhelloXX\r\n0\r\n\r\n"), INCOMPLETE,
                 "RFC 9112 §7.1"),
    ResponseCase("chunk-bare-cr", resp(OK, "Transfer-Encoding: chunked",
                                       body="5\rhello\r\n0\r\n\r\n"), INCOMPLETE,
                 "RFC 9112 §7.1; [Funky24] (a lone LF is a line end here, a bare CR never)"),
    ResponseCase("chunk-ext-unterminated", resp(OK, "Transfer-Encoding: chunked",
                                                body='5;a="x\r\nhello\r\n0\r\n\r\n'),
                 INCOMPLETE, "RFC 9112 §7.1.1"),
    ResponseCase("bad-trailer", resp(OK, "Transfer-Encoding: chunked",
                                     body="5\r\nhello\r\n0\r\nX : 1\r\n\r\n"), INCOMPLETE,
                 "RFC 9112 §7.1.2"),
    ResponseCase("chunked-truncated-fin", resp(OK, "Transfer-Encoding: chunked",
                                               body="5\r\nhello\r\n10\r\nabc"), INCOMPLETE,
                 "RFC 9112 §8: incomplete chunked message", after="fin"),
    ResponseCase("chunked-no-last-chunk-close-notify", resp(OK, "Transfer-Encoding: chunked",
                                                            body="5\r\nhello\r\n"), INCOMPLETE,
                 "RFC 9112 §8: a clean close does not complete a chunked body",
                 after="close_notify"),
    ResponseCase("chunked-truncated-in-size-line", resp(OK, "Transfer-Encoding: chunked",
                                                        body="5\r\nhello\r\n1"), INCOMPLETE,
                 "RFC 9112 §8", after="fin"),
    ResponseCase("cl-truncated-fin", resp(OK, "Content-Length: 100", body="hello"), INCOMPLETE,
                 "RFC 9112 §8: fewer octets than Content-Length", after="fin"),
    ResponseCase("cl-truncated-close-notify", resp(OK, "Content-Length: 100", body="hello"),
                 INCOMPLETE, "RFC 9112 §8", after="close_notify"),
    ResponseCase("head-truncated-fin", b"HTTP/1.1 200 OK\r\nContent-Len", E502,
                 "RFC 9209 §2.3.13 http_response_incomplete", after="fin"),
    ResponseCase("close-delimited-no-close-notify", resp(OK, "Content-Type: text/plain",
                                                         body="partial"), INCOMPLETE,
                 "RFC 9112 §9.8: without Content-Length or chunked, a response is complete only "
                 "if a valid TLS closure alert was received", after="fin"),
    ResponseCase("close-delimited-close-notify", resp(OK, "Content-Type: text/plain",
                                                      body="whole"), COMPLETE,
                 "RFC 9112 §6.3(8) + §9.8: control case, complete", after="close_notify",
                 body=b"whole"),
    # -- bytes after a complete response (a smuggled second response) --------------------------
    ResponseCase("extra-after-cl", resp(OK, "Content-Length: 5", body=b"hello" + SMUGGLED),
                 COMPLETE, "RFC 9112 §6.3: the rest is not part of this response; the "
                 "connection must be discarded, never reused", body=b"hello"),
    ResponseCase("extra-after-cl-pipelined", resp(OK, "Content-Length: 5",
                                                  body=b"hello" + SMUGGLED), COMPLETE,
                 "same, with the client's next request already buffered in proxyd",
                 body=b"hello", pipelined=True),
    ResponseCase("extra-crlf-after-cl", resp(OK, "Content-Length: 5", body=b"hello\r\n"),
                 COMPLETE, "stray CRLF after the body: unread bytes -> not reusable",
                 body=b"hello"),
    ResponseCase("extra-after-chunked", resp(OK, "Transfer-Encoding: chunked",
                                             body=b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
                 COMPLETE, "RFC 9112 §7.1", body=b"hello"),
    ResponseCase("extra-after-204", resp("HTTP/1.1 204 No Content", body=SMUGGLED), COMPLETE,
                 "RFC 9112 §6.3(1): 204 has no body; following bytes are not a response",
                 status=204),
    ResponseCase("204-with-cl-body", resp("HTTP/1.1 204 No Content", "Content-Length: 8",
                                          body=b"SMUGGLED"), COMPLETE,
                 "RFC 9110 §15.3.5 / RFC 9112 §6.3(1): a 204 body is never forwarded",
                 status=204),
    ResponseCase("extra-after-304", resp("HTTP/1.1 304 Not Modified", body=SMUGGLED),
                 COMPLETE, "RFC 9112 §6.3(1)", status=304),
    ResponseCase("head-response-with-body", resp(OK, "Content-Length: 8", body=b"SMUGGLED"),
                 COMPLETE, "RFC 9112 §6.3(1): a response to HEAD has no body",
                 method="HEAD"),
    # -- interim responses ----------------------------------------------------------------------
    ResponseCase("1xx-then-garbage", b"HTTP/1.1 100 Continue\r\n\r\ngarbage\r\n\r\n", E502,
                 "RFC 9110 §15.2"),
    ResponseCase("1xx-with-body", resp("HTTP/1.1 100 Continue", "Content-Length: 5",
                                       body=b"hello" + SMUGGLED), E502,
                 "RFC 9112 §6.3(1): 1xx has no body, so 'hello...' must be a status line"),
    ResponseCase("101-unsolicited", resp("HTTP/1.1 101 Switching Protocols", "Upgrade: h2c",
                                         "Connection: Upgrade", body=SMUGGLED), E502,
                 "RFC 9110 §15.2.2: 101 only in answer to Upgrade"),
    # -- valid controls -------------------------------------------------------------------------
    ResponseCase("cl-tab-ows", resp(OK, "Content-Length:\t5\t", body="hello"), COMPLETE,
                 "RFC 9110 §5.6.3 (valid control: HTAB OWS; the client must get a canonical "
                 "Content-Length)", body=b"hello", discard=False),
    ResponseCase("cl-identical-dup", resp(OK, "Content-Length: 5", "Content-Length: 5",
                                          body="hello"), COMPLETE,
                 "RFC 9110 §8.6: identical repeated CL (valid control: may be reused)",
                 body=b"hello", discard=False),
]
