"""Command line: ``proxyd [flags]`` runs the proxy, ``proxyd check`` validates the config."""

from __future__ import annotations

import argparse
import sys

from . import __version__, config, logs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proxyd",
        description="HTTP forwarding proxy onto warm, pre-handshaked upstream TLS connections.")
    p.add_argument("--version", action="version", version=f"proxyd {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--listen", metavar="HOST:PORT", help="client listener (default 127.0.0.1:3128)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="metrics and health listener (default 127.0.0.1:9128)")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: CPUs)")
    p.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify origins with")
    p.add_argument("--origin", action="append", metavar="HOST[:PORT]",
                   help="origin to keep warm connections to (repeatable)")
    p.add_argument("--warm", type=int, metavar="N", help="warm connections per origin per worker")
    p.add_argument("--log-level", metavar="LEVEL",
                   help="debug, info, warning, error or critical")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="check: validate only; print nothing unless the config is invalid")
    p.add_argument("command", nargs="?", choices=["run", "check", "hash-password"],
                   default="run", help="run (default); check the configuration and print it "
                   "(with --quiet: only errors); "
                   "hash-password: read a password on stdin, print a users-file hash")
    return p


def load_config(args: argparse.Namespace) -> config.Config:
    """The effective configuration: defaults < file < flags."""
    if args.config == "":
        # Typically an unset variable (--config "$CONF"): running on the built-in defaults
        # instead of the intended file would hide the mistake.
        raise config.ConfigError("--config: empty path")
    cfg = config.load(args.config)
    return config.apply_flags(
        cfg, listen=args.listen, metrics_listen=args.metrics_listen, workers=args.workers,
        ca_file=args.ca_file, origins=args.origin, warm=args.warm, log_level=args.log_level)


def _hash_password() -> int:
    """Print a hash for access.users_file (``user:HASH``) from a password on stdin."""
    import getpass

    from .access import hash_password
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("proxyd: empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``proxyd`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quiet and args.command != "check":
        parser.error("--quiet: only with check")
    if args.command == "hash-password":
        return _hash_password()
    try:
        cfg = load_config(args)
    except config.ConfigError as exc:
        print(f"proxyd: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        if not args.quiet:  # quiet: for ExecStartPre/ExecReload, not the whole config each time
            sys.stdout.write(config.to_toml(cfg))
            print(f"proxyd: configuration OK ({cfg.source})", file=sys.stderr)
        return 0
    logs.setup(cfg.log_level)
    from . import master
    # SIGHUP re-reads the same file with the same flags on top.
    return master.run(cfg, loader=lambda: load_config(args))


if __name__ == "__main__":
    sys.exit(main())
