"""Error types that carry the HTTP status and RFC 9209 Proxy-Status error type.

Every failure that a client can observe is one of these; the client connection turns it
into a short text response with a ``Proxy-Status`` field (RFC 9209 §2) instead of a
traceback or a silent close.
"""

from __future__ import annotations


class ProxyError(Exception):
    """A failure to be answered with ``status`` and ``Proxy-Status: proxyd; error=...``."""

    status: int = 502
    error_type: str = "proxy_internal_error"

    def __init__(self, reason: str, *, status: int | None = None,
                 error_type: str | None = None, details: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        self.details = details


class ParseError(ProxyError):
    """A message that breaks RFC 9112 framing or syntax rules.

    Raised by the sans-I/O parser; for requests ``status`` is the 4xx/5xx to answer, for
    responses the client connection maps it to 502 ``http_protocol_error``.
    """

    status = 400
    error_type = "http_request_error"


class UpstreamError(ProxyError):
    """The origin could not be reached or did not answer properly (RFC 9209 §2.3)."""

    status = 502
    error_type = "http_protocol_error"


class DnsError(UpstreamError):
    error_type = "dns_error"


class ConnectionRefused(UpstreamError):
    error_type = "connection_refused"


class ConnectionTimeout(UpstreamError):
    status = 504
    error_type = "connection_timeout"


class TlsCertificateError(UpstreamError):
    error_type = "tls_certificate_error"


class TlsProtocolError(UpstreamError):
    error_type = "tls_protocol_error"


class ResponseIncomplete(UpstreamError):
    error_type = "http_response_incomplete"


class ResponseTimeout(UpstreamError):
    """No response head in time (RFC 9209 §2.3.26)."""

    status = 504
    error_type = "http_response_timeout"


class ReadTimeout(UpstreamError):
    """The origin's body stalled past the idle timeout (RFC 9209 §2.3.10)."""

    status = 504
    error_type = "connection_read_timeout"


class WriteTimeout(UpstreamError):
    """The origin stopped reading the request body (RFC 9209 §2.3.11): not the client's
    fault, so not a 408."""

    status = 504
    error_type = "connection_write_timeout"


class ConnectionLimitReached(UpstreamError):
    status = 503
    error_type = "connection_limit_reached"


class ProxyResourceError(ProxyError):
    """This proxy ran out of something of its own (file descriptors, memory) while opening
    a connection: not the origin's fault (RFC 9209 §2.3.30), so no origin is blamed."""

    status = 503
    error_type = "proxy_internal_error"


class DestinationProhibited(ProxyError):
    status = 403
    error_type = "destination_ip_prohibited"
