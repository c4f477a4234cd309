"""purgectl's command line grammar: the sub-commands, their options and the checks of their values (argparse).

The commands themselves live in :mod:`purged.ctl`; this module only says what a valid command line is.
"""

from __future__ import annotations

import argparse
import os
import re

DEFAULT_API = "http://127.0.0.1:8090"
SCOPES = ("purge", "purge:high", "read", "admin")


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number of seconds, got {text!r}")
    return value


def _name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, _ . @ - (at most 64)")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="purgectl", description="Operate purged: purge URLs, follow batches, "
                                "list nodes, make API tokens.")
    p.add_argument("--api", default=os.environ.get("PURGED_API") or DEFAULT_API,
                   help=f"purged's API (env PURGED_API, default {DEFAULT_API})")
    p.add_argument("--token", default=os.environ.get("PURGED_TOKEN") or None,
                   help="API token, sent as Authorization: Bearer (env PURGED_TOKEN)")
    p.add_argument("--cacert", metavar="FILE", help="verify the API's TLS certificate with this CA file")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pp = sub.add_parser("purge", help="purge URLs (arguments and/or --file)")
    pp.add_argument("urls", nargs="*", metavar="URL")
    pp.add_argument("--file", "-f", metavar="F", help="read URLs from F, one per line (- for stdin)")
    pp.add_argument("--priority", choices=("bulk", "high"), default="bulk")
    pp.add_argument("--wait", type=_seconds, metavar="SECONDS",
                    help="then wait up to SECONDS until every node has done every batch")
    pp.add_argument("--batch-size", type=_positive(int), default=5000, metavar="N",
                    help="URLs per request (default 5000; the daemon caps it at limits.max_urls_per_batch)")
    pp.add_argument("--retries", type=int, default=5, metavar="N",
                    help="times to retry a request answered 429, after its Retry-After (default 5)")

    ps = sub.add_parser("status", help="show (or wait for) one batch")
    ps.add_argument("id")
    ps.add_argument("--wait", type=_seconds, metavar="SECONDS", help="wait up to SECONDS until it is done")
    ps.add_argument("--json", action="store_true", help="print the API's answer as JSON")

    pn = sub.add_parser("nodes", help="a table of every edge node from /healthz")
    pn.add_argument("--json", action="store_true", help="print the API's answer as JSON")

    pf = sub.add_parser("fleet", help="the daemons of a fleet and their lag (docs/fleet.md); retire one")
    pf.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    fsub = pf.add_subparsers(dest="fleet_command", metavar="ACTION")
    pr = fsub.add_parser("retire", help="delete a daemon's consumer (it is gone for good); needs scope admin")
    pr.add_argument("name")

    pt = sub.add_parser("token", help="API tokens")
    tsub = pt.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    pnew = tsub.add_parser("new", help="make a token and print its tokens.yaml entry")
    pnew.add_argument("name", type=_name)
    pnew.add_argument("--scope", action="append", required=True, choices=SCOPES)
    return p
