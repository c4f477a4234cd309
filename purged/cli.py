"""Command line: ``purged --config FILE`` runs the daemon; ``purged --check-config FILE`` validates and exits."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="purged", description="CDN cache purge fan-out daemon")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", metavar="FILE", help="run the daemon with this YAML config")
    group.add_argument("--check-config", metavar="FILE", help="validate FILE, print each problem, and exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"purged {__version__}")
    return p


def _report(path: str, exc: ConfigError) -> None:
    for line in exc.errors:
        print(f"{path}: {line}" if not line.startswith(path) else line, file=sys.stderr)
    if len(exc.errors) > 1:
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)


def _check_files(config) -> int | None:
    """The files the config names that purged reads at start: tokens.yaml (its token count) and the TLS
    certificate and key. A problem is a :class:`ConfigError`."""
    errors: list[str] = []
    count = None
    if config.auth.tokens_file:
        from .tokens import load_tokens

        try:
            count = len(load_tokens(config.auth.tokens_file))
        except ConfigError as exc:
            errors += [f"auth.tokens_file: {line}" for line in exc.errors]
    if config.listen.https is not None:
        import ssl

        https = config.listen.https
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(https.cert, https.key)
        except (OSError, ssl.SSLError) as exc:
            errors.append(f"listen.https: cannot load the certificate {https.cert} and key {https.key}: {exc}")
    if errors:
        raise ConfigError(errors)
    return count


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.check_config or args.config
    try:
        config = load_config(path)
        tokens = _check_files(config)
    except ConfigError as exc:
        _report(path, exc)
        return 2
    if args.check_config:
        nodes = sum(len(t.nodes) for dc in config.datacenters for t in dc.tiers)
        auth = f", {tokens} tokens" if tokens is not None else ""
        print(f"{path}: OK ({len(config.datacenters)} data centres, {nodes} nodes{auth})")
        return 0
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import trio

    from .daemon import serve
    from .net.bus import BusSetupError
    from .net.journal import JournalSetupError

    try:
        return _run_daemon(trio, serve, config, path)
    except ConfigError as exc:  # the tokens file or the certificate changed between the check and the start
        _report(path, exc)
        return 2
    except JournalSetupError as exc:
        logging.getLogger("purged").critical("%s", exc)
        return 1
    except BusSetupError as exc:
        logging.getLogger("purged").critical("%s", exc)
        return 1


def _run_daemon(trio, serve, config, path) -> int:  # type: ignore[no-untyped-def]
    """Run the daemon; a bus set-up error (another daemon's consumer under our name) ends it like a config
    error at start, not as a traceback."""
    from functools import partial

    from .net.bus import BusSetupError

    try:
        trio.run(partial(serve, config, config_path=path))
    except BaseExceptionGroup as group:  # a task of the daemon's nursery failed: unwrap our own errors
        mine, rest = group.split((BusSetupError, ConfigError))
        if mine is None or rest is not None:
            raise
        raise _first_leaf(mine) from None
    return 0


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
