"""purgectl: the operators' command line client of purged's HTTP API.

    purgectl [--api URL] [--token T] [--cacert FILE] purge [--file F] [--priority high] [--wait S] [URL ...]
    purgectl status ID [--wait S]
    purgectl nodes
    purgectl fleet [retire NAME]
    purgectl token new NAME --scope SCOPE [--scope ...]

``PURGED_API`` (default http://127.0.0.1:8090) and ``PURGED_TOKEN`` come from the environment; a token is sent as
``Authorization: Bearer``. Input is streamed: the file is read lazily and posted in batches of ``--batch-size``
URLs, so millions of URLs never sit in memory at once. A ``429`` is retried after its ``Retry-After``.

Exit codes: 0 everything accepted (and done, with ``--wait``); 1 a URL rejected or a request refused; 2 usage,
bad arguments or the API unreachable; 3 timed out waiting. A rejection outranks a time-out. Errors are one line.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import os
import re
import secrets
import ssl
import sys
import time
from collections.abc import Iterable, Iterator
from urllib.parse import quote

import httpx

from .ctl_args import parser
from .ctl_progress import make_display, print_table, totals

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
MAX_RETRY_AFTER = 60.0  # never sleep longer than this on one 429, whatever the server says
POLL_WAIT = 1.0  # seconds a status request may hold while waiting (the progress refreshes at least this often)


class CtlError(Exception):
    """Ends purgectl with ``code`` after printing ``message`` as one line on stderr."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def err(message: str) -> None:
    print(f"purgectl: {message}", file=sys.stderr, flush=True)


# -- HTTP ------------------------------------------------------------------------------------------------------

class Client:
    """A sync httpx client on the API; transport failures become ``CtlError(..., 2)``."""

    def __init__(self, api: str, token: str | None, cacert: str | None):
        if not re.match(r"^https?://[^/\s]+", api):
            raise CtlError(f"bad API URL {api!r}: expected http://host:port or https://host:port", EXIT_USAGE)
        verify: ssl.SSLContext | bool = True
        if cacert:
            try:
                verify = ssl.create_default_context(cafile=cacert)
            except (OSError, ssl.SSLError) as exc:
                raise CtlError(f"cannot use --cacert {cacert}: {exc.strerror or exc}", EXIT_USAGE) from None
        headers = {"User-Agent": "purgectl"}
        if token:
            if any(c.isspace() or ord(c) < 0x21 for c in token):
                raise CtlError("bad token: it contains whitespace or control characters", EXIT_USAGE)
            headers["Authorization"] = f"Bearer {token}"
        self.api = api.rstrip("/")
        self.http = httpx.Client(base_url=self.api, headers=headers, verify=verify,
                                 timeout=httpx.Timeout(30.0, connect=5.0))

    def request(self, method: str, path: str, *, read_timeout: float = 30.0, **kwargs) -> httpx.Response:
        try:
            return self.http.request(method, path, timeout=httpx.Timeout(read_timeout, connect=5.0), **kwargs)
        except httpx.TransportError as exc:
            raise CtlError(f"cannot reach the API at {self.api}: {exc or type(exc).__name__}", EXIT_USAGE) from None

    def close(self) -> None:
        self.http.close()


def body_of(resp: httpx.Response) -> dict:
    try:
        data = resp.json()
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"error": f"HTTP {resp.status_code}", "detail": resp.text[:200]}


def refusal(what: str, resp: httpx.Response) -> CtlError:
    body = body_of(resp)
    detail = f": {body['detail']}" if body.get("detail") else ""
    return CtlError(f"{what} refused: HTTP {resp.status_code} {body.get('error', '')}{detail}", EXIT_REFUSED)


def retry_after(resp: httpx.Response) -> float:
    """Seconds from ``Retry-After`` (delta-seconds or an HTTP date), 1 when absent, at most MAX_RETRY_AFTER."""
    value = resp.headers.get("retry-after", "").strip()
    seconds = 1.0
    if value.isdigit():
        seconds = float(value)
    elif value:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            pass
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


# -- purge -----------------------------------------------------------------------------------------------------

def read_urls(urls: Iterable[str], file: str | None) -> Iterator[tuple[str, str]]:
    """``(url, where)`` from the arguments, then lazily from ``file`` (``-``: stdin); blank lines are skipped."""
    for i, url in enumerate(urls, 1):
        try:
            url.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
            raise CtlError(f"argument {i}: not valid UTF-8", EXIT_USAGE) from None
        yield url, f"argument {i}"
    if file is None:
        return
    try:
        stream = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise CtlError(f"cannot read {file}: {exc.strerror or exc}", EXIT_USAGE) from None
    name = "stdin" if file == "-" else file
    try:
        for lineno, raw in enumerate(stream, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise CtlError(f"{name} line {lineno}: not valid UTF-8", EXIT_USAGE) from None
            if line:
                yield line, f"line {lineno}"
    except OSError as exc:
        raise CtlError(f"cannot read {name}: {exc.strerror or exc}", EXIT_USAGE) from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def in_batches(items: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def post_batch(client: Client, urls: list[str], priority: str, retries: int) -> dict:
    """POST one batch; 429 is retried ``retries`` times after Retry-After. A batch with no valid URL (400
    ``no_valid_urls``) answers like an accepted one, without an id. Anything else refused raises."""
    payload = {"urls": urls, "priority": priority}
    for attempt in range(retries + 1):
        resp = client.request("POST", "/v1/purge", json=payload)
        if resp.status_code != 429 or attempt == retries:
            break
        delay = retry_after(resp)
        err(f"{body_of(resp).get('error', 'HTTP 429')}: retrying in {delay:g} s ({attempt + 1}/{retries})")
        time.sleep(delay)
    if resp.status_code in (200, 201, 202):
        return body_of(resp)
    body = body_of(resp)
    if resp.status_code == 400 and body.get("error") == "no_valid_urls" and "rejected" in body:
        return {"id": None, "accepted": 0, "coalesced": 0, "rejected": body["rejected"]}
    extra = f" after {retries} retries" if resp.status_code == 429 and retries else ""
    error = refusal(f"batch of {len(urls)} URLs", resp)
    raise CtlError(f"{error}{extra}", EXIT_REFUSED)


def cmd_purge(args: argparse.Namespace, client: Client) -> int:
    ids: list[str] = []
    accepted = coalesced = rejected = sent = 0
    try:
        for batch in in_batches(read_urls(args.urls, args.file), args.batch_size):
            answer = post_batch(client, [url for url, _ in batch], args.priority, args.retries)
            for rej in answer.get("rejected", []):
                index = rej.get("index")
                url, where = batch[index] if isinstance(index, int) and 0 <= index < len(batch) else ("?", "?")
                err(f"rejected {url!r} ({where}): {rej.get('reason')}: {rej.get('detail', '')}")
                rejected += 1
            if answer.get("id"):
                ids.append(answer["id"])
                print(f"batch {answer['id']}: {answer.get('accepted', 0)} accepted, "
                      f"{answer.get('coalesced', 0)} coalesced", flush=True)
            accepted += answer.get("accepted", 0)
            coalesced += answer.get("coalesced", 0)
            sent += len(batch)
    except CtlError as exc:
        if ids:
            exc.args = (f"{exc.args[0]} (after {accepted} URLs accepted in {len(ids)} batches; "
                        f"the rest of the input was not sent)",)
        raise
    if not sent:
        raise CtlError("no URL given: pass URLs as arguments or --file F (- for stdin)", EXIT_USAGE)
    print(f"accepted {accepted} URLs ({coalesced} coalesced, {rejected} rejected) in {len(ids)} batches",
          flush=True)
    code = EXIT_REFUSED if rejected else EXIT_OK
    if args.wait is not None and ids:
        done = wait_batches(client, ids, args.wait)
        if not done and code == EXIT_OK:
            code = EXIT_TIMEOUT
    return code


def fetch_status(client: Client, batch_id: str, wait: float) -> dict:
    resp = client.request("GET", f"/v1/purge/{quote(batch_id, safe='')}", params={"wait": f"{wait:.3f}"},
                          read_timeout=wait + 30.0)
    if resp.status_code == 404:
        raise CtlError(f"unknown batch id {batch_id!r} (forgotten, or from another daemon)", EXIT_REFUSED)
    if resp.status_code != 200:
        raise refusal(f"status of {batch_id}", resp)
    return body_of(resp)


def wait_batches(client: Client, ids: list[str], seconds: float) -> bool:
    """Poll every unfinished batch until all are done or ``seconds`` pass; show progress; True when done."""
    start = time.monotonic()
    deadline = start + seconds
    statuses: dict[str, dict] = {}
    pending = list(ids)
    display = make_display(len(ids))
    first = True
    try:
        while True:
            # The last batch is the one most likely to finish last: hold on it (after a first quick look, so
            # that the display shows at once), then refresh the others.
            for i, batch_id in enumerate(reversed(pending)):
                hold = min(POLL_WAIT, deadline - time.monotonic()) if i == 0 and not first else 0.0
                statuses[batch_id] = fetch_status(client, batch_id, max(hold, 0.0))
            pending = [b for b in pending if not statuses[b].get("done")]
            first = False
            display.update(totals(statuses))
            if not pending or time.monotonic() >= deadline:
                break
    finally:
        display.close()
    took = time.monotonic() - start
    if not pending:
        print(f"done: {len(ids)} batches on every node in {took:.1f} s", flush=True)
        return True
    progress = ", ".join(f"{dc} {done}/{total}" for dc, (done, total) in totals(statuses).items())
    err(f"timed out after {seconds:g} s: {len(pending)} of {len(ids)} batches not done "
        f"(node-batches done: {progress}); purgectl status {pending[-1]} --wait S follows the last one")
    return False


# -- status, nodes, token --------------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace, client: Client) -> int:
    deadline = time.monotonic() + (args.wait or 0.0)
    while True:
        status = fetch_status(client, args.id, max(0.0, deadline - time.monotonic()))
        if status.get("done") or time.monotonic() >= deadline:
            break
    if args.json:
        print(json.dumps(status))
    else:
        state = "done" if status.get("done") else "in progress"
        print(f"batch {status.get('id')}: {state}, {status.get('accepted')} URLs, "
              f"priority {status.get('priority', '?')}")
        for dc, tiers in status.get("datacenters", {}).items():
            for tier, t in tiers.items():
                print(f"  {dc:<12} {tier:<12} {t.get('done')}/{t.get('nodes')} nodes done")
        for name, d in status.get("daemons", {}).items():  # a fleet id: every daemon of the fleet
            state = "done" if d.get("done") else f"not done (lag {d.get('lag')})"
            print(f"  daemon {name:<24} {state}")
    return EXIT_TIMEOUT if args.wait is not None and not status.get("done") else EXIT_OK


NODE_COLUMNS = ("node", "dc", "tier", "state", "backlog", "inflight", "retrying", "oldest_pending_seconds")


def answer(client: Client, method: str, path: str, what: str | None = None) -> dict:
    """The JSON body of a 200 answer to ``method path``; anything else is a refusal naming ``what``."""
    resp = client.request(method, path)
    if resp.status_code != 200:
        raise refusal(what or path, resp)
    return body_of(resp)


def cmd_nodes(args: argparse.Namespace, client: Client) -> int:
    health = answer(client, "GET", "/healthz")
    if args.json:
        print(json.dumps(health))
        return EXIT_OK
    print(f"status {health.get('status')}, {health.get('log_entries')} log entries, "
          f"{health.get('unique_pending')} unique pending")
    rows = [[name] + [str(node.get(col, "")) for col in NODE_COLUMNS[1:]]
            for name, node in health.get("nodes", {}).items()]
    print_table([c.upper().replace("OLDEST_PENDING_SECONDS", "OLDEST_S") for c in NODE_COLUMNS], rows, left=4)
    return EXIT_OK


FLEET_COLUMNS = ("daemon", "consumer", "lag", "pending", "ack_pending", "redelivered", "last_active")


def cmd_fleet(args: argparse.Namespace, client: Client) -> int:
    """The fleet's daemons (``GET /v1/fleet``), or ``retire NAME`` (``DELETE /v1/fleet/NAME``, scope admin)."""
    if args.fleet_command == "retire":
        body = answer(client, "DELETE", "/v1/fleet/" + quote(args.name, safe=""), f"retire {args.name}")
        print(f"retired {body.get('retired')} (consumer {body.get('consumer')} deleted)")
        return EXIT_OK
    fleet = answer(client, "GET", "/v1/fleet")
    if args.json:
        print(json.dumps(fleet))
        return EXIT_OK
    print(f"stream {fleet.get('stream')}, last sequence {fleet.get('last_seq')}, asked {fleet.get('self')} "
          f"(bus {fleet.get('bus')})")
    now = time.time()
    rows = []
    for name, d in fleet.get("daemons", {}).items():
        last = d.get("last_active")
        ago = f"{now - last:.0f}s ago" if isinstance(last, (int, float)) else "never"
        rows.append([name] + [str(d.get(c, "")) for c in FLEET_COLUMNS[1:-1]] + [ago])
    print_table([c.upper() for c in FLEET_COLUMNS], rows, left=2)
    return EXIT_OK


def cmd_token_new(args: argparse.Namespace) -> int:
    """The token goes to stderr (shown once, never stored); stdout is only the tokens.yaml entry, so that
    ``purgectl token new ci --scope purge >> tokens.yaml`` keeps the secret out of the file."""
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    scopes = list(dict.fromkeys(args.scope))
    print(f"token for {args.name} (give it to the client; only its sha256 is kept): {token}", file=sys.stderr)
    print(f"- name: {args.name}\n  sha256: \"{digest}\"\n  scopes: [{', '.join(scopes)}]")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # exits 2 on a usage error
    if args.command == "purge" and args.retries < 0:
        err("--retries must be 0 or more")
        return EXIT_USAGE
    client = None
    try:
        if args.command == "token":
            return cmd_token_new(args)
        client = Client(args.api, args.token, args.cacert)
        commands = {"purge": cmd_purge, "status": cmd_status, "nodes": cmd_nodes, "fleet": cmd_fleet}
        return commands[args.command](args, client)
    except CtlError as exc:
        err(str(exc))
        return exc.code
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except BrokenPipeError:  # stdout closed early (| head): quiet, and no second error when Python flushes it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if client is not None:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
