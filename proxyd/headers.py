"""Field rules of a forwarding proxy: hop-by-hop removal, Host, Via, framing fields.

RFC 9110 §7.6.1: a proxy removes ``Connection`` and every field it names, plus the
hop-by-hop fields (``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Transfer-Encoding``,
``Upgrade``); ``Proxy-Authorization``/``Proxy-Authenticate`` belong to this hop too.
§7.6.3: each forwarded message gets a ``Via`` entry.
"""

from __future__ import annotations

from .http1 import (Framing, Headers, RequestHead, ResponseHead, field_values, lower_names,
                    serialize_head)

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


def _filtered(head: RequestHead | ResponseHead) -> Headers:
    """Fields minus hop-by-hop ones and those named by Connection."""
    named = head.connection_tokens
    return [hv for lname, hv in zip(lower_names(head), head.headers)
            if lname not in HOP_BY_HOP and lname not in named]


def filter_trailers(trailers: Headers) -> Headers:
    """Trailer fields safe to forward."""
    return [(n, v) for n, v in trailers if n.lower() not in FORBIDDEN_TRAILERS]


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


def client_response_head(resp: ResponseHead, out_framing: Framing, keep_alive: bool,
                         client_version: int, via: bytes) -> bytes:
    """Serialise the response as sent to the client, re-framed for it."""
    headers = _filtered(resp)
    if out_framing is Framing.LENGTH or (out_framing is Framing.NONE and
                                         resp.get(b"content-length") is not None):
        cl = resp.get(b"content-length")
        if cl is not None:
            headers.append((b"Content-Length", cl.split(b",")[0].strip()))
    elif out_framing is Framing.CHUNKED:
        headers.append((b"Transfer-Encoding", b"chunked"))
    headers.append((b"Via", via))
    if not keep_alive:
        headers.append((b"Connection", b"close"))
    elif client_version < 11:
        headers.append((b"Connection", b"keep-alive"))
    reason = resp.reason or b""
    return serialize_head(b"HTTP/1.1 %d " % resp.status + reason, headers)


def informational_head(resp: ResponseHead, via: bytes) -> bytes:
    """A 1xx response forwarded to an HTTP/1.1 client (100, 103)."""
    headers = _filtered(resp)
    headers.append((b"Via", via))
    return serialize_head(b"HTTP/1.1 %d " % resp.status + resp.reason, headers)


def error_response(status: int, reason_phrase: str, error_type: str, message: str,
                   keep_alive: bool, details: str = "", head_only: bool = False) -> bytes:
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
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
        (b"Proxy-Status", proxy_status.encode("ascii", "replace")),
        (b"Cache-Control", b"no-store"),
        (b"Connection", b"keep-alive" if keep_alive else b"close"),
    ]
    head = serialize_head(b"HTTP/1.1 %d " % status + reason_phrase.encode(), headers)
    return head if head_only else head + body
