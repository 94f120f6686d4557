"""proxyd: an HTTP forwarding proxy that carries plain http:// requests onto warm,
pre-handshaked upstream TLS connections."""

__version__ = "0.1.0"
