"""Bad input against a LIVE daemon: every file of ``tests/data/bad/`` (README there) plus huge bodies made here.

One ``python -m purged`` process (a subprocess, as systemd runs it) with one real Varnish node and two multicast
listeners on loopback (HTCP and purged's msgpack batches). Each file is named ``<expected>--<what>.<ext>``:

- HTTP bodies go to ``POST /v1/purge`` (content type from the extension) and ``POST /sys/purge/``; raw PURGE
  requests (``.http``) go over a socket as they are. Each must be answered 4xx with a JSON ``error`` equal to
  ``expected``, promptly: never a 5xx, never a hang, never a closed connection without an answer.
- Datagrams go to the listener of their format, three times each. ``expected`` is the decoder's reason (counted
  in ``purged_multicast_malformed_total{reason}``) or ``invalid_url`` (decoded, URL refused:
  ``purged_multicast_dropped_total{reason="invalid_url"}``); every one of them is counted, and the log says so
  in a few rate-limited lines, not one per datagram.

After each class a good purge still reaches Varnish (its own log) and the daemon's PID is alive.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from oracle import metric_sum
from test_multicast_e2e import free_udp_port, sender_socket
from test_signals import PurgedProcess, free_port, write_config

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parent.parent / "data" / "bad"
TYPES = {".json": "application/json", ".msgpack": "application/msgpack", ".txt": "text/plain"}
MIB = 1024 * 1024


def expected(path: Path) -> str:
    return path.name.split("--", 1)[0]


def corpus(sub: str) -> list[Path]:
    files = sorted((CORPUS / sub).iterdir())
    assert files, f"no corpus in {CORPUS / sub}"
    return files


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, pause: float = 0.0) -> tuple[int, dict]:
    """Send ``data`` as is, wait ``pause`` seconds (the server may answer and close meanwhile), read the answer
    until the server closes; (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before reading everything: read that answer
        time.sleep(pause)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the server closed first: it must have answered and not reset
            raise AssertionError(f"the connection was reset before the answer could be read: {exc}") from None
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    response = b"".join(chunks)
    assert response.startswith(b"HTTP/1.1 "), f"no answer: {response[:200]!r}"
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head[9:12]), json.loads(body)


def check_answer(name: str, status: int, body: dict, reason: str | None, wrong: list[str] | None = None) -> None:
    """4xx with a JSON error (and detail); ``reason`` if given. Mismatches go to ``wrong`` when given."""
    problem = None
    if not 400 <= status < 500 or not isinstance(body.get("error"), str) or not body.get("detail"):
        problem = f"{name}: {status} {body}"
    elif reason is not None and body["error"] != reason:
        problem = f"{name}: expected {reason}, got {status} {str(body)[:300]}"
    if problem and wrong is not None:
        wrong.append(problem)
    else:
        assert problem is None, problem


class Live:
    """The daemon under test, its node and an HTTP client."""

    def __init__(self, purged: PurgedProcess, node, http: httpx.Client):
        self.purged, self.node, self.http = purged, node, http
        self.rounds = 0

    def assert_still_serving(self, what: str) -> None:
        """A good purge accepted now reaches Varnish; the PID is alive."""
        self.rounds += 1
        path = f"/after/{self.rounds}-{what.replace(' ', '-')}"
        r = self.http.post("/v1/purge", json={"urls": [f"http://good.test{path}"]})
        assert r.status_code == 202, f"after {what}: {r.status_code} {r.text}"
        status = self.http.get(f"/v1/purge/{r.json()['id']}", params={"wait": 10}).json()
        assert status["done"], f"after {what}: {status}"
        assert path in {p.url for p in self.node.purges() if p.host == "good.test"}, f"after {what}"
        assert self.purged.proc.poll() is None, f"purged died after {what}:\n{self.purged.output()[-3000:]}"


def test_every_bad_input_is_refused_and_counted_and_good_purges_still_flow(varnish_factory, tmp_path):
    (node,) = varnish_factory(1)
    port = free_port()
    group = f"239.255.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
    htcp_port, batch_port = free_udp_port(), free_udp_port()
    listen = {"http": f"127.0.0.1:{port}", "multicast": [
        {"group": group, "port": htcp_port, "interface": "127.0.0.1", "format": "htcp"},
        {"group": group, "port": batch_port, "interface": "127.0.0.1", "format": "msgpack"},
    ]}
    config = write_config(tmp_path / "purged.yaml", [[node.address]], port, None, listen=listen)
    purged = PurgedProcess(config, port, tmp_path)
    t0 = time.monotonic()
    try:
        purged.wait_listening()
        with httpx.Client(base_url=purged.url, timeout=15) as http:
            live = Live(purged, node, http)
            live.assert_still_serving("start")
            _http_bodies(live)
            _raw_purges(live, port)
            _huge(live, port)
            _datagrams(live, group, htcp_port, batch_port)
        log = purged.output()
    finally:
        purged.stop()
    print(f"bad input: {time.monotonic() - t0:.1f}s")
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    # ~80 refused requests: one log line per status per 10 s (400, 413, 415, 431), not one per request.
    refused = [ln for ln in log.splitlines() if "purged.http:" in ln and " -> 4" in ln]
    assert 0 < len(refused) <= 12, refused  # 4 statuses; a slow run may span a few 10 s windows


def _http_bodies(live: Live) -> None:
    statuses: Counter[int] = Counter()
    wrong: list[str] = []
    for path in corpus("http/v1"):
        body = path.read_bytes()
        types = [TYPES[path.suffix]] if path.suffix in TYPES else [None, *TYPES.values(), "application/octet-stream"]
        for ctype in types:
            headers = {} if ctype is None else {"content-type": ctype}
            r = live.http.post("/v1/purge", content=body, headers=headers)
            # A .bin file's name holds its reason without a content type (sniffed as text); with one, its own.
            reason = expected(path) if ctype in (None, TYPES.get(path.suffix)) else None
            check_answer(f"{path.name} as {ctype}", r.status_code, r.json(), reason, wrong)
            statuses[r.status_code] += 1
    live.assert_still_serving("v1 bodies")
    for path in corpus("http/sys"):
        r = live.http.post("/sys/purge/", content=path.read_bytes(), headers={"content-type": "application/json"})
        check_answer(path.name, r.status_code, r.json(), expected(path), wrong)
        statuses[r.status_code] += 1
    assert not wrong, "\n".join(wrong)
    live.assert_still_serving("sys bodies")
    print(f"HTTP bodies: {dict(statuses)}")


def _raw_purges(live: Live, port: int) -> None:
    statuses: Counter[int] = Counter()
    wrong: list[str] = []
    for path in corpus("http/purge"):
        status, body = raw_exchange(port, path.read_bytes())
        check_answer(path.name, status, body, expected(path), wrong)
        statuses[status] += 1
    assert not wrong, "\n".join(wrong)
    # A UTF-8 Host (curl sends it as typed) is the host's IDNA form, not its latin-1 reading (that was a bug).
    status, body = raw_exchange(port, "PURGE /idn HTTP/1.1\r\nHost: café.test\r\nConnection: close\r\n\r\n".encode())
    assert status == 202, body
    assert live.http.get(f"/v1/purge/{body['id']}", params={"wait": 10}).json()["done"]
    assert ("xn--caf-dma.test", "/idn") in {(p.host, p.url) for p in live.node.purges()}
    live.assert_still_serving("raw PURGE")
    print(f"raw PURGE requests: {dict(statuses)}")


def _huge(live: Live, port: int) -> None:
    """Made here rather than stored: a head far past 64 KiB, bodies past 16 MiB (limits.max_body_bytes, declared and
    chunked) and past 100,000 URLs (limits.max_urls_per_batch)."""
    head = b"PURGE /" + b"a" * 300_000 + b" HTTP/1.1\r\nHost: h.test\r\n\r\n"
    declared = b"POST /v1/purge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    for pause in (0.0, 0.3):  # answered before the request was read to its end: the answer must survive the close
        status, body = raw_exchange(port, head, pause=pause)
        check_answer("300 KB head", status, body, "bad_request")
        assert status == 431
        status, body = raw_exchange(port, declared % (17 * MIB) + b"{" * 300_000, pause=pause)
        check_answer("17 MiB declared", status, body, "body_too_large")
        assert status == 413

    def chunks():
        yield b'{"urls": ["'
        for _ in range(17):
            yield b"a" * MIB

    r = live.http.post("/v1/purge", content=chunks(), headers={"content-type": "application/json"})
    check_answer("17 MiB chunked", r.status_code, r.json(), "body_too_large")
    many = json.dumps({"urls": [f"http://h.test/{i}" for i in range(100_001)]}).encode()
    r = live.http.post("/v1/purge", content=many, headers={"content-type": "application/json"})
    check_answer("100,001 URLs", r.status_code, r.json(), "too_many_urls")
    assert r.status_code == 413
    live.assert_still_serving("huge bodies")


def _datagrams(live: Live, group: str, htcp_port: int, batch_port: int) -> None:
    repeat = 3
    sent = 0
    want_malformed: dict[str, Counter[str]] = {}
    want_invalid: dict[str, int] = {}
    with sender_socket() as s:
        for fmt, udp_port in (("htcp", htcp_port), ("batch", batch_port)):
            malformed: Counter[str] = Counter()
            invalid = 0
            for path in corpus(f"udp/{fmt}"):
                data = path.read_bytes()
                for _ in range(repeat):
                    s.sendto(data, (group, udp_port))
                    sent += 1
                if expected(path) == "invalid_url":
                    invalid += repeat
                else:
                    malformed[expected(path)] += repeat
            key = f"{group}:{udp_port}"
            want_malformed[key], want_invalid[key] = malformed, invalid
            time.sleep(0.05)  # let the listener drain (the socket buffer holds far more; just not to race it)
    deadline = time.monotonic() + 10
    while True:
        text = live.http.get("/metrics").text
        got = {key: (Counter({r: int(metric_sum(text, "purged_multicast_malformed_total", group=key, reason=r))
                              for r in want}),
                     int(metric_sum(text, "purged_multicast_dropped_total", group=key, reason="invalid_url")))
               for key, want in want_malformed.items()}
        if all(got[k] == (want_malformed[k], want_invalid[k]) for k in got) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for key in got:
        assert got[key] == (want_malformed[key], want_invalid[key]), key
        bad = metric_sum(text, "purged_htcp_packets_total", group=key, state="bad")
        assert bad == sum(want_malformed[key].values()), key  # every undecodable datagram is a bad packet
        assert metric_sum(text, "purged_multicast_urls_total", group=key) == 0  # nothing of it was accepted
    lines = [ln for ln in live.purged.output().splitlines() if "purged.multicast: dropping" in ln]
    reasons = sum(len(m) for m in want_malformed.values()) + len(want_malformed)  # + one "url" line per listener
    print(f"datagrams: {sent} sent, all counted; {len(lines)} log lines")
    assert 0 < len(lines) <= reasons < sent / 2, lines  # one line per reason per 10 s, not one per datagram
    live.assert_still_serving("datagrams")
