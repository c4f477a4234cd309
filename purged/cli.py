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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.check_config or args.config
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{path}: {line}" if not line.startswith(path) else line, file=sys.stderr)
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
        return 2
    if args.check_config:
        nodes = sum(len(t.nodes) for dc in config.datacenters for t in dc.tiers)
        print(f"{path}: OK ({len(config.datacenters)} data centres, {nodes} nodes)")
        return 0
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from functools import partial

    import trio

    from .daemon import serve
    from .net.journal import JournalSetupError

    try:
        trio.run(partial(serve, config, config_path=path))
    except JournalSetupError as exc:
        logging.getLogger("purged").critical("%s", exc)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
