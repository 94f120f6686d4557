"""Field rules of a forwarding proxy: hop-by-hop removal, Host, Via, framing fields.

RFC 9110 §7.6.1: a proxy removes ``Connection`` and every field it names, plus the
hop-by-hop fields (``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Transfer-Encoding``,
``Upgrade``); ``Proxy-Authorization``/``Proxy-Authenticate`` belong to this hop too.
§7.6.3: each forwarded message gets a ``Via`` entry.
"""

from __future__ import annotations

import email.utils
import re
import time

from .http1 import (Framing, Headers, RequestHead, ResponseHead, content_length_field,
                    field_values, lower_names, plain_ows, serialize_head)

# Fields never forwarded, whatever Connection says. Content-Length is handled by framing.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"host", b"content-length",
})
# Fields a trailer section must not carry (RFC 9110 §6.5.1): framing, routing, auth.
FORBIDDEN_TRAILERS = frozenset({
    b"transfer-encoding", b"content-length", b"host", b"connection", b"keep-alive",
    b"te", b"trailer", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
    b"authorization", b"set-cookie", b"content-type", b"content-encoding", b"cache-control",
    b"expect", b"max-forwards", b"age", b"expires", b"date", b"location", b"retry-after",
    b"vary", b"warning", b"www-authenticate", b"content-range", b"proxy-connection",
})


# Fast paths forward the received field section as it is when nothing in it needs changing,
# instead of rebuilding it field by field. These are the names that rule a fast path out.
_REQUEST_SLOW = (HOP_BY_HOP - {b"host", b"content-length", b"connection", b"keep-alive",
                              b"proxy-connection"} | {b"expect"})
_RESPONSE_SLOW = HOP_BY_HOP - {b"content-length", b"connection", b"keep-alive"}
_CONNECTION_PLAIN = frozenset({b"keep-alive", b"close"})
# Connection and Keep-Alive lines of a validated field section (values hold no CR or LF).
_CONNECTION_LINES = re.compile(rb"(?im)^(?:connection|keep-alive):[^\r\n]*\r\n")
# ... and, in a request, Proxy-Connection (what curl sends to a proxy) as well.
_REQUEST_HOP_LINES = re.compile(rb"(?im)^(?:connection|keep-alive|proxy-connection):[^\r\n]*\r\n")
_USUAL_CONNECTION = b"\r\nConnection: keep-alive\r\n"


def _filtered(head: RequestHead | ResponseHead) -> Headers:
    """Fields minus hop-by-hop ones and those named by Connection."""
    named = head.connection_tokens
    return [hv for lname, hv in zip(lower_names(head), head.headers)
            if lname not in HOP_BY_HOP and lname not in named]


def filter_trailers(trailers: Headers, named: frozenset[bytes] = frozenset()) -> Headers:
    """Trailer fields safe to forward: none a trailer must not carry, and none of ``named``,
    the message's Connection tokens (RFC 9110 §7.6.1: a proxy removes the header or
    trailer fields a connection option names)."""
    return [(n, v) for n, v in trailers
            if (lname := n.lower()) not in FORBIDDEN_TRAILERS and lname not in named]


# RFC 9110 §7.6.2: the methods whose requests carry a hop limit a proxy must keep.
MAX_FORWARDS_METHODS = frozenset({b"TRACE", b"OPTIONS"})
# Request fields a TRACE answer leaves out (RFC 9110 §9.3.8: likely to hold secrets).
_SENSITIVE_FIELDS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


def max_forwards(req: RequestHead) -> int | None:
    """The request's Max-Forwards hop count; None when absent or not one 1*DIGIT value
    (such a request is forwarded as it came, as Squid does)."""
    values = [v for n, (_, v) in zip(req.lnames, req.headers) if n == b"max-forwards"]
    if len(values) != 1 or not values[0].isdigit() or len(values[0]) > 18:
        return None
    return int(values[0])


def decrement_max_forwards(req: RequestHead, hops: int) -> None:
    """Forward ``req`` with Max-Forwards one less (RFC 9110 §7.6.2): its fields are rebuilt
    rather than forwarded as received."""
    req.headers = [(n, b"%d" % (hops - 1) if n.lower() == b"max-forwards" else v)
                   for n, v in req.headers]
    req.lnames = [n.lower() for n, _ in req.headers]
    req.plain = False
    req.raw_block = b""


def final_recipient_response(req: RequestHead, keep_alive: bool,
                             why: bytes = b"Max-Forwards is 0: answered by the proxy") -> bytes:
    """The answer to a TRACE or OPTIONS of which proxyd is the final recipient: its
    Max-Forwards reached 0 here (RFC 9110 §7.6.2), or it is ``OPTIONS *`` with no default
    origin (§9.3.7: about the server itself). TRACE reflects the request as ``message/http``
    without the fields that may hold credentials (§9.3.8); OPTIONS gets an empty 200."""
    body = b""
    headers: Headers = [(b"Date", http_date())]
    if req.method == b"TRACE":
        fields = [(n, v) for n, v in req.headers if n.lower() not in _SENSITIVE_FIELDS]
        body = serialize_head(b"%s %s HTTP/1.%d" % (req.method, req.target, req.version % 10),
                              fields)
        headers.append((b"Content-Type", b"message/http"))
    headers += [
        (b"Content-Length", b"%d" % len(body)),
        (b"Proxy-Status", b'proxyd; details="%s"' % why),
        (b"Connection", b"keep-alive" if keep_alive else b"close"),
    ]
    return serialize_head(b"HTTP/1.1 200 OK", headers) + body


_date = [0, b""]  # [second, its IMF-fixdate]


def http_date() -> bytes:
    """Now as an IMF-fixdate (RFC 9110 §5.6.7), formatted once a second."""
    now = int(time.time())
    if now != _date[0]:
        _date[1] = email.utils.formatdate(now, usegmt=True).encode()
        _date[0] = now
    return _date[1]  # type: ignore[return-value]


def via_entry(version: int, pseudonym: str) -> bytes:
    """A Via list member: received-protocol and received-by (RFC 9110 §7.6.3)."""
    return (b"1.0 " if version == 10 else b"1.1 ") + pseudonym.encode()


def has_loop(headers: Headers, pseudonym: str) -> bool:
    """True when a Via entry already names this proxy: forwarding would loop."""
    me = pseudonym.encode().lower()
    if not any(n.lower() == b"via" for n, _ in headers):
        return False
    for member in field_values(headers, b"via"):
        parts = member.split()
        if len(parts) >= 2 and parts[1].lower() == me:
            return True
    return False


def upstream_request_head(req: RequestHead, target: bytes, host: bytes, via: bytes) -> bytes:
    """Serialise the request as sent to the origin (always HTTP/1.1, origin-form)."""
    if req.plain and req.plain_host == host:
        # The parser checked everything _section_as_received does.
        block: bytes | None = req.raw_block
        if req.plain_hop_lines:
            block = _REQUEST_HOP_LINES.sub(b"", req.raw_block)
    else:
        block = _section_as_received(req, host)
    if block is not None:
        return req.method + b" " + target + b" HTTP/1.1\r\n" + block + b"Via: " + via + b"\r\n\r\n"
    headers: Headers = [(b"Host", host)]
    headers += _filtered(req)
    if req.version < 11:
        # RFC 9110 §10.1.1: 100-continue from an HTTP/1.0 client must be ignored.
        headers = [(n, v) for n, v in headers if n.lower() != b"expect"]
    if req.framing is Framing.LENGTH:
        headers.append((b"Content-Length", b"%d" % req.content_length))
    elif req.framing is Framing.CHUNKED:
        headers.append((b"Transfer-Encoding", b"chunked"))
    if b"trailers" in (v.lower() for v in field_values(req.headers, b"te")):
        # TE is hop-by-hop; "trailers" is ours to repeat, with Connection: TE (§10.1.4).
        headers += [(b"TE", b"trailers"), (b"Connection", b"TE")]
    headers.append((b"Via", via))
    return serialize_head(req.method + b" " + target + b" HTTP/1.1", headers)


def _section_as_received(req: RequestHead, host: bytes) -> bytes | None:
    """The request's field section to forward as received, or None to rebuild it.

    As received when nothing in it is hop-by-hop but the connection's own persistence
    fields (Connection saying only keep-alive or close, so it names no field to remove;
    Keep-Alive; Proxy-Connection — their lines are dropped), Host is already the URI's
    authority, and the framing is canonical.
    """
    lnames = lower_names(req)
    if not (req.raw_block and plain_ows(req.raw_block) and _REQUEST_SLOW.isdisjoint(lnames)
            and lnames.count(b"host") == 1 and req.get(b"host") == host
            and lnames.count(b"content-length") <= 1
            and (req.framing is Framing.NONE
                 or req.get(b"content-length") == b"%d" % req.content_length)
            and req.connection_tokens <= _CONNECTION_PLAIN and lnames.count(b"connection") <= 1):
        return None
    if b"connection" in lnames or b"keep-alive" in lnames or b"proxy-connection" in lnames:
        return _REQUEST_HOP_LINES.sub(b"", req.raw_block)
    return req.raw_block


def client_response_head(resp: ResponseHead, out_framing: Framing, keep_alive: bool,
                         client_version: int, via: bytes) -> bytes:
    """Serialise the response as sent to the client, re-framed for it."""
    if resp.plain and out_framing is resp.framing:
        # The parser checked the field conditions of _fast_response_head (a plain head is
        # never 204): the received section minus Connection and Keep-Alive.
        block = resp.raw_block
        if resp.connection_tokens and resp.keep_alive_field is None:
            # The usual origin line, exactly as nginx and most servers send it, goes with a
            # plain replace (a plain head has one Connection line; CRLF only ends lines).
            cut = (b"\r\n" + block).replace(_USUAL_CONNECTION, b"\r\n", 1)
            block = cut[2:] if len(cut) < len(block) + 2 else _CONNECTION_LINES.sub(b"", block)
        elif resp.connection_tokens or resp.keep_alive_field is not None:
            block = _CONNECTION_LINES.sub(b"", block)
        return _response_head_bytes(resp, block, resp.plain_dated, keep_alive, client_version,
                                    via)
    fast = _fast_response_head(resp, out_framing, keep_alive, client_version, via)
    if fast is not None:
        return fast
    headers = _filtered(resp)
    if b"date" not in lower_names(resp):
        # RFC 9110 §6.6.1: a recipient with a clock MUST add the Date a response lacks.
        headers.append((b"Date", http_date()))
    if resp.status == 204:
        pass  # RFC 9110 §8.6: a server MUST NOT send Content-Length in a 204
    elif out_framing is Framing.LENGTH or out_framing is Framing.NONE:
        # One plain number; an invalid one (only a 304's is not checked by the parser, as
        # it frames nothing) is dropped rather than passed on.
        cl = resp.get(b"content-length")
        if cl is not None and (cl := content_length_field(cl)) is not None:
            headers.append((b"Content-Length", cl))
    elif out_framing is Framing.CHUNKED:
        headers.append((b"Transfer-Encoding", b"chunked"))
    headers.append((b"Via", via))
    if not keep_alive:
        headers.append((b"Connection", b"close"))
    elif client_version < 11:
        headers.append((b"Connection", b"keep-alive"))
    reason = resp.reason or b""
    return serialize_head(b"HTTP/1.1 %d " % resp.status + reason, headers)


def _fast_response_head(resp: ResponseHead, out_framing: Framing, keep_alive: bool,
                        client_version: int, via: bytes) -> bytes | None:
    """The common case — same framing, no hop-by-hop field but Connection: keep-alive/close
    and Keep-Alive — as the received section minus those lines; None when not applicable.
    (Plain heads are taken by client_response_head itself.)"""
    if resp.plain:
        return None  # re-framed: the general serialisation
    lnames = lower_names(resp)
    if (not resp.raw_block or out_framing is not resp.framing or resp.status == 204
            or not plain_ows(resp.raw_block)
            or not _RESPONSE_SLOW.isdisjoint(lnames) or lnames.count(b"content-length") > 1
            or not resp.connection_tokens <= _CONNECTION_PLAIN):
        return None
    if resp.framing is Framing.LENGTH:
        if resp.get(b"content-length") != b"%d" % resp.content_length:
            return None  # a list, leading zeros: sent as one plain number
    elif b"content-length" in lnames and not _plain_number(resp.get(b"content-length")):
        return None  # HEAD, 304, a length of 0: "0,0" too is sent as one number
    block = resp.raw_block
    if b"connection" in lnames or b"keep-alive" in lnames:
        block = _CONNECTION_LINES.sub(b"", block)
    return _response_head_bytes(resp, block, b"date" in lnames, keep_alive, client_version, via)


def _plain_number(value: bytes | None) -> bool:
    """A Content-Length value as a sender should write it: digits, no leading zero."""
    return value is not None and value.isdigit() and (value[0] != 48 or len(value) == 1)


def _response_head_bytes(resp: ResponseHead, block: bytes, dated: bool, keep_alive: bool,
                         client_version: int, via: bytes) -> bytes:
    """Status line, forwarded field section (plus the Date it lacks, RFC 9110 §6.6.1), Via
    and our Connection, in one formatting."""
    if not dated:
        block += b"Date: " + http_date() + b"\r\n"
    if not keep_alive:
        tail = b"Connection: close\r\n\r\n"
    elif client_version < 11:
        tail = b"Connection: keep-alive\r\n\r\n"
    else:
        tail = b"\r\n"
    return b"HTTP/1.1 %d %b\r\n%bVia: %b\r\n%b" % (resp.status, resp.reason, block, via, tail)


def informational_head(resp: ResponseHead, via: bytes) -> bytes:
    """A 1xx response forwarded to an HTTP/1.1 client (100, 103)."""
    headers = _filtered(resp)
    headers.append((b"Via", via))
    return serialize_head(b"HTTP/1.1 %d " % resp.status + resp.reason, headers)


def error_response(status: int, reason_phrase: str, error_type: str, message: str,
                   keep_alive: bool, details: str = "", head_only: bool = False,
                   extra: Headers | None = None) -> bytes:
    """A generated error with a text body and an RFC 9209 Proxy-Status field."""
    body = (message + "\n").encode("utf-8", "replace")
    proxy_status = f"proxyd; error={error_type}"
    if details:
        # An sf-string (RFC 8941 §3.3.3) holds printable ASCII only; anything else from an
        # exception message becomes "?" so it can never break the field or inject one.
        printable = "".join(c if " " <= c <= "~" else "?" for c in details)
        safe = printable.replace("\\", "\\\\").replace('"', '\\"')
        proxy_status += f'; details="{safe}"'
    headers: Headers = [
        (b"Date", http_date()),  # RFC 9110 §6.6.1: proxyd is this response's origin
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
        (b"Proxy-Status", proxy_status.encode("ascii", "replace")),
        (b"Cache-Control", b"no-store"),
        (b"Connection", b"keep-alive" if keep_alive else b"close"),
        *(extra or ()),
    ]
    head = serialize_head(b"HTTP/1.1 %d " % status + reason_phrase.encode(), headers)
    return head if head_only else head + body
