"""purgectl, the operators' CLI, run as a subprocess against a real purged daemon and real Varnish nodes.

What reached the edges is read from Varnish's own counter (MAIN.n_purges). The daemon runs in the test's trio
loop (tests/daemon_helpers.py) while purgectl runs as a separate process with its stdout captured (so not a
terminal: plain progress lines).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
import yaml
from daemon_helpers import config_for, running_daemon

pytestmark = pytest.mark.integration
CTL = [sys.executable, "-m", "purged.ctl"]
SENDER = {"retry_initial": 0.05, "retry_max": 0.2, "connect_timeout": 1.0}


async def ctl(api: str | None, *args: str, stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PURGED_API", "PURGED_TOKEN")}
    if api:
        environ["PURGED_API"] = api
    environ.update(env or {})
    with trio.fail_after(60):
        proc = await trio.run_process(
            [*CTL, *args], stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, env=environ
        )
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


def api_of(service) -> str:
    return f"http://127.0.0.1:{service.http_port}"


async def n_purges(node) -> int:
    return await trio.to_thread.run_sync(node.n_purges)


def two_dcs(a, b, **extra) -> dict:
    return config_for({"eqiad": [[a.address]], "codfw": [[b.address]]}, sender=SENDER, **extra)


async def test_file_of_100k_urls_with_wait_reaches_every_node(varnish_factory, tmp_path):
    a, b = varnish_factory(2)
    count = 100_000
    path = tmp_path / "urls.txt"
    with path.open("w") as f:
        for i in range(count):
            f.write(f"https://en.wikipedia.org/wiki/Page_{i}?action=raw\n")
            if i % 1000 == 0:
                f.write("\n")  # blank lines are skipped
    async with running_daemon(two_dcs(a, b)) as (service, _client):
        started = time.monotonic()
        r = await ctl(api_of(service), "purge", "--file", str(path), "--wait", "45")
        took = time.monotonic() - started
        assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert sum(line.startswith("batch ") for line in lines) == 20  # 100k / --batch-size 5000
    assert f"accepted {count} URLs (0 coalesced, 0 rejected) in 20 batches" in lines
    assert "eqiad: done (1 nodes x 20 batches)" in lines and "codfw: done (1 nodes x 20 batches)" in lines
    assert lines[-1].startswith("done: 20 batches on every node")
    assert "\x1b" not in r.stdout  # not a terminal: no bars, no escape codes
    assert r.stderr == ""
    assert await n_purges(a) == count and await n_purges(b) == count
    assert took < 40, took


async def test_stdin_and_arguments_high_priority(varnish_factory):
    a, b = varnish_factory(2)
    async with running_daemon(two_dcs(a, b)) as (service, _client):
        stdin = b"https://en.wikipedia.org/wiki/A\n\n  \r\nhttps://en.wikipedia.org/wiki/B\r\n"
        r = await ctl(api_of(service), "purge", "--file", "-", "--priority", "high", "--wait", "10",
                      "//en.wikipedia.org/wiki/C", stdin=stdin)
        assert r.returncode == 0, r.stderr
        assert "accepted 3 URLs (0 coalesced, 0 rejected) in 1 batches" in r.stdout
        batch_id = r.stdout.split()[1].rstrip(":")
        st = await ctl(api_of(service), "status", batch_id, "--json")
        assert st.returncode == 0 and json.loads(st.stdout)["priority"] == "high"
    assert await n_purges(a) == 3 and await n_purges(b) == 3


async def test_rejected_url_exits_1_and_names_it(varnish_factory, tmp_path):
    a, b = varnish_factory(2)
    path = tmp_path / "urls.txt"
    path.write_text("https://en.wikipedia.org/wiki/X\nftp://en.wikipedia.org/bad\nhttps://en.wikipedia.org/wiki/Y\n")
    async with running_daemon(two_dcs(a, b)) as (service, _client):
        # Batches of one: the bad URL is a whole batch (400 no_valid_urls); purgectl goes on with the next one.
        r = await ctl(api_of(service), "purge", "--file", str(path), "--batch-size", "1", "--wait", "10")
        assert r.returncode == 1
        assert "rejected 'ftp://en.wikipedia.org/bad' (line 2):" in r.stderr
        assert "accepted 2 URLs (0 coalesced, 1 rejected) in 2 batches" in r.stdout
        # In one batch with good URLs: the good ones are accepted, the bad one named by its argument position.
        r = await ctl(api_of(service), "purge", "https://en.wikipedia.org/wiki/Z", "http://user@en.wikipedia.org/p")
        assert r.returncode == 1
        assert r.stderr.startswith("purgectl: rejected 'http://user@en.wikipedia.org/p' (argument 2): ")
        assert r.stderr.count("\n") == 1
        assert "accepted 1 URLs (0 coalesced, 1 rejected) in 1 batches" in r.stdout
        await trio.sleep(0.5)
    assert await n_purges(a) == 3 and await n_purges(b) == 3


async def test_usage_and_unreachable_api_exit_2(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    cases = [
        ((), "usage:"),
        (("purge", "--wait", "soon", "http://h.org/x"), "expected seconds"),
        (("purge", "--batch-size", "0", "http://h.org/x"), "must be positive"),
        (("status",), "usage:"),
        (("purge",), "no URL given"),
        (("purge", "--file", str(tmp_path / "missing.txt")), "cannot read"),
        (("purge", "http://h.org/x"), f"cannot reach the API at {closed}"),
        (("nodes",), f"cannot reach the API at {closed}"),
        (("--api", "ftp://x", "nodes"), "bad API URL"),
        (("--cacert", str(tmp_path / "missing.pem"), "nodes"), "cannot use --cacert"),
        (("token", "new", "ci", "--scope", "everything"), "invalid choice"),
        (("token", "new", "ci"), "--scope"),
    ]
    results = {}

    async def run(args):
        results[args] = await ctl(closed, *args)

    async with trio.open_nursery() as nursery:  # each case is a process start: run them side by side
        for args, _ in cases:
            nursery.start_soon(run, args)
    for args, message in cases:
        r = results[args]
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
        # argparse prints its usage, then one error line; purgectl's own errors are one line.
        assert r.stderr.startswith("usage:") or r.stderr.count("\n") == 1, r.stderr


async def test_wait_times_out_exit_3_on_a_rate_limited_node(varnish_factory):
    slow, fast = varnish_factory(2)
    cfg = {
        "listen": {"http": "127.0.0.1:0"},
        "state_dir": None,
        "sender": SENDER,
        "datacenters": {
            "slow": {"rate": 20, "burst": 1, "tiers": [{"nodes": [slow.address]}]},
            "fast": {"tiers": [{"nodes": [fast.address]}]},
        },
    }
    async with running_daemon(cfg) as (service, _client):
        urls = [f"http://h.org/r{i}" for i in range(200)]
        r = await ctl(api_of(service), "purge", "--wait", "0.5", *urls)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert "fast: done (1 nodes x 1 batches)" in r.stdout and "slow: done" not in r.stdout
        assert "timed out after 0.5 s: 1 of 1 batches not done" in r.stderr
        batch_id = r.stdout.split()[1].rstrip(":")
        st = await ctl(api_of(service), "status", batch_id)  # no --wait: reports, exit 0
        assert st.returncode == 0 and f"batch {batch_id}: in progress, 200 URLs, priority bulk" in st.stdout
        assert "slow         tier0        0/1 nodes done" in st.stdout
        st = await ctl(api_of(service), "status", batch_id, "--wait", "0.2")
        assert st.returncode == 3
    assert await n_purges(fast) == 200 and await n_purges(slow) < 200


async def test_status_and_nodes(varnish_factory):
    a, b = varnish_factory(2)
    async with running_daemon(two_dcs(a, b)) as (service, client):
        batch_id = (await client.post("/v1/purge", json={"urls": ["http://h.org/1", "http://h.org/2"]})).json()["id"]
        r = await ctl(api_of(service), "status", batch_id, "--wait", "10")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [
            f"batch {batch_id}: done, 2 URLs, priority bulk",
            "  eqiad        t0           1/1 nodes done",
            "  codfw        t0           1/1 nodes done",
        ]
        r = await ctl(api_of(service), "status", "nope-1")
        assert r.returncode == 1 and "unknown batch id 'nope-1'" in r.stderr
        r = await ctl(api_of(service), "nodes")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("status ") and lines[1].split() == [
            "NODE", "DC", "TIER", "STATE", "BACKLOG", "INFLIGHT", "RETRYING", "OLDEST_S"]
        rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
        assert rows == {a.address: ["eqiad", "t0", "up", "0", "0", "0", "0.0"],
                        b.address: ["codfw", "t0", "up", "0", "0", "0", "0.0"]}
        r = await ctl(api_of(service), "nodes", "--json")
        assert set(json.loads(r.stdout)["nodes"]) == {a.address, b.address}


async def test_429_honours_retry_after_then_gives_up(varnish_factory):
    (a,) = varnish_factory(1)
    cfg = config_for({"dc": [[a.address]]}, sender=SENDER, limits={"client_rate": 2000, "client_burst": 1000})
    urls = "".join(f"http://h.org/{i}\n" for i in range(3000)).encode()
    async with running_daemon(cfg) as (service, _client):
        r = await ctl(api_of(service), "purge", "--file", "-", "--batch-size", "1000", "--retries", "0",
                      stdin=urls[: len(urls) * 2 // 3])
        assert r.returncode == 1, r.stderr
        assert "refused: HTTP 429 rate_limited" in r.stderr
        assert "after 1000 URLs accepted in 1 batches" in r.stderr
        started = time.monotonic()
        r = await ctl(api_of(service), "purge", "--file", "-", "--batch-size", "1000", "--wait", "10", stdin=urls)
        assert r.returncode == 0, r.stderr
        assert "rate_limited: retrying in 1 s (1/5)" in r.stderr
        assert "accepted 3000 URLs" in r.stdout and time.monotonic() - started >= 1.0
    assert await n_purges(a) == 1000 + 3000  # the second run purges its first 1000 URLs again, as it should


async def test_token_new_prints_a_yaml_entry_whose_hash_matches():
    r = await ctl(None, "token", "new", "ci-bot", "--scope", "purge", "--scope", "read", "--scope", "purge")
    assert r.returncode == 0, r.stderr
    token = r.stderr.split()[-1]
    assert len(token) >= 43 and token not in r.stdout
    (entry,) = yaml.safe_load(r.stdout)
    assert entry == {"name": "ci-bot", "sha256": hashlib.sha256(token.encode()).hexdigest(), "scopes": ["purge", "read"]}
    again = await ctl(None, "token", "new", "ci-bot", "--scope", "admin")
    assert again.stderr.split()[-1] != token and yaml.safe_load(again.stdout)[0]["scopes"] == ["admin"]


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers /healthz with an empty node list and records each request's Authorization header."""

    seen: list = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.seen.append(self.headers.get("Authorization"))
        body = b'{"status":"ok","log_entries":0,"unique_pending":0,"nodes":{}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


async def test_bearer_token_and_cacert(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: apt-get install openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        api = f"https://127.0.0.1:{server.server_address[1]}"
        r = await ctl(api, "--cacert", str(cert), "nodes", env={"PURGED_TOKEN": "from-env"})
        assert r.returncode == 0, r.stderr
        r = await ctl(api, "--cacert", str(cert), "--token", "from-flag", "nodes", env={"PURGED_TOKEN": "from-env"})
        assert r.returncode == 0, r.stderr
        assert _Recorder.seen == ["Bearer from-env", "Bearer from-flag"]
        r = await ctl(api, "nodes")  # the system's CAs do not know this certificate
        assert r.returncode == 2 and "cannot reach the API" in r.stderr and "CERTIFICATE_VERIFY_FAILED" in r.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "purgectl"
    if not script.exists():
        pytest.fail(f"{script} missing: pip install -e '.[test]' installs the purgectl console script")
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "purge" in r.stdout and "token" in r.stdout
