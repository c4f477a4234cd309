"""The tier race under ~200 GET/s: no stale object served by the frontend once its purge is reported done.

One data centre: an origin serving a version that changes, Apache Traffic Server as the backend tier caching
from it, a Varnish frontend caching from the ATS node. A client loop does ~200 GET/s through the frontend over
a set of objects while they change at the origin and their purges are posted. The backend's PURGEs are held
for a moment by the fault proxy (a backend slower to acknowledge than the frontend), which is exactly when a
frontend purged first would refetch the old object from the not-yet-purged backend and keep serving it.

- With tier order (backend tier, then the frontend ``delay`` after the backend acknowledged): no GET that
  started after the batch was reported done returns the old version; tier order and conservation hold from
  the edges' own logs.
- With both nodes in one tier (no order): the same run serves the old version after "done". Kept as a check
  that the test can fail: it is deterministic, since the backend's PURGEs are held until every object was
  fetched again after the frontend's PURGEs.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import oracle
import pytest
import trio
from ats import purges_of
from daemon_helpers import running_daemon
from faultproxy import FaultProxy
from harness import post_batch, purged_view, wait_done

pytestmark = pytest.mark.integration
OBJECTS = 20
GET_RATE = 200.0
HOLD = 0.6  # seconds the backend's PURGEs wait in the fault proxy
DELAY = 0.2  # the frontend tier's delay after the backend acknowledged
HOST = "en.wikipedia.org"


class VersionedOrigin:
    """An HTTP origin in a thread: GET /path answers ``v<N> /path``, cacheable for an hour; ``bump`` edits."""

    def __init__(self) -> None:
        versions: dict[str, int] = {}
        self.versions = versions

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_GET(self) -> None:  # noqa: N802
                body = f"v{versions.get(self.path, 1)} {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "public, max-age=3600")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bump(self, paths: list[str]) -> None:
        for p in paths:
            self.versions[p] = self.versions.get(p, 1) + 1

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


FRONTEND_VCL = """vcl 4.1;
# A frontend caching from one ATS backend node; PURGE from loopback only. No grace: a purged object is gone.
backend ats {{ .host = "127.0.0.1"; .port = "{port}"; }}
acl purgers {{ "127.0.0.1"; }}
sub vcl_recv {{
    if (req.method == "PURGE") {{
        if (client.ip !~ purgers) {{ return (synth(405, "Not allowed")); }}
        return (purge);
    }}
}}
sub vcl_backend_response {{
    set beresp.ttl = 1h;
    set beresp.grace = 0s;
}}
"""


@dataclass
class Get:
    start: float
    end: float
    path: str
    version: int


class Client(threading.Thread):
    """GETs through the frontend round-robin over ``paths`` at ``rate``/s (a fixed schedule), until stopped;
    bounded by ``max_seconds`` and ``rate * max_seconds`` requests."""

    def __init__(self, address: str, paths: list[str], rate: float = GET_RATE, max_seconds: float = 15.0):
        super().__init__(daemon=True)
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.paths, self.rate, self.max_seconds = paths, rate, max_seconds
        self.log: list[Get] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        t0 = time.monotonic()
        try:
            for i in range(int(self.rate * self.max_seconds)):
                if self.stop.is_set():
                    break
                due = t0 + i / self.rate
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())
                path = self.paths[i % len(self.paths)]
                start = time.time()
                conn.request("GET", path, headers={"Host": HOST})
                r = conn.getresponse()
                body = r.read().decode()
                assert r.status == 200, (r.status, body)
                self.log.append(Get(start, time.time(), path, int(body.split()[0][1:])))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            conn.close()


async def race(origin, be, fe, proxy, tiered: bool, tag: str) -> tuple[list[Get], float, dict]:
    """One run on fresh objects: warm both caches, GET at ~200/s, edit the objects and purge them while the
    backend's PURGEs are held; keep GETting for a second after the batch is done. Returns (GET log, time the
    batch was reported done, result dict for the oracle)."""
    paths = [f"/wiki/Race_{tag}_{i}" for i in range(OBJECTS)]
    tiers = (
        [{"name": "backend", "nodes": [proxy.address]}, {"name": "frontend", "delay": DELAY, "nodes": [fe.address]}]
        if tiered
        else [{"name": "both", "nodes": [proxy.address, fe.address]}]
    )
    cfg = {
        "listen": {"http": "127.0.0.1:0"},
        "state_dir": None,
        "datacenters": {"eqiad": {"tiers": tiers}},
        "sender": {"timeout": 5.0, "retry_initial": 0.05, "retry_max": 0.5},
    }
    client = Client(fe.address, paths)

    def warm() -> None:  # v1 into ATS and into the frontend
        c = http.client.HTTPConnection("127.0.0.1", fe.port, timeout=5)
        for p in paths:
            c.request("GET", p, headers={"Host": HOST})
            assert c.getresponse().read().startswith(b"v1 ")
        c.close()

    await trio.to_thread.run_sync(warm)
    ledger = oracle.Ledger()
    fe_purges = await trio.to_thread.run_sync(fe.n_purges)
    async with running_daemon(cfg) as (service, api):
        client.start()
        await trio.sleep(0.3)
        origin.bump(paths)  # the edit: the origin serves v2 from now on
        proxy.set_mode("stall")  # the backend is slow to take its PURGEs
        posted_at = time.time()
        batch = await post_batch(api, ledger, [f"https://{HOST}{p}" for p in paths])
        await trio.sleep(HOLD)
        if not tiered:
            # Hold on until every object was fetched after the frontend's PURGEs (a loaded machine may starve
            # the client for a while): then the old copies are certainly back in the frontend.
            with trio.move_on_after(5):
                purged_fe = fe_purges + OBJECTS
                while await trio.to_thread.run_sync(fe.n_purges) < purged_fe:
                    await trio.sleep(0.02)
                fe_at = time.time()
                while {g.path for g in client.log[-4 * OBJECTS :] if g.start > fe_at} != set(paths):
                    await trio.sleep(0.02)
        proxy.set_mode("pass")
        assert await wait_done(api, [batch], timeout=20)
        done_at = time.time()
        await trio.sleep(1.0)
        client.stop.set()
        await trio.to_thread.run_sync(client.join, 10)
        health, metrics = await purged_view(api)
    if client.error is not None:
        raise client.error
    return client.log, done_at, {"ledger": ledger, "cfg": cfg, "health": health, "metrics": metrics,
                                 "posted_at": posted_at}


async def test_no_stale_object_after_done_with_tier_order_and_stale_without(ats_factory, varnish_factory, tmp_path,
                                                                           nursery):
    origin = VersionedOrigin()
    try:
        (be,) = await trio.to_thread.run_sync(lambda: ats_factory(1, origin=origin.address))
        vcl = tmp_path / "frontend.vcl"
        vcl.write_text(FRONTEND_VCL.format(port=be.port))
        (fe,) = await trio.to_thread.run_sync(lambda: varnish_factory(1, vcl=vcl))
        proxy = await nursery.start(FaultProxy(("127.0.0.1", be.port)).serve)

        gets, done_at, run = await race(origin, be, fe, proxy, tiered=True, tag="tiered")
        after = [g for g in gets if g.start > done_at]
        stale = [g for g in after if g.version == 1]
        seconds = gets[-1].start - gets[0].start
        print(f"tiered: {len(gets)} GETs in {seconds:.1f} s ({len(gets) / seconds:.0f}/s), {len(after)} after "
              f"done, stale after done: {len(stale)}; the old version served between the purge's post and done "
              f"({done_at - run['posted_at']:.2f} s): {sum(g.version == 1 and g.start > run['posted_at'] for g in gets)}")
        assert len(gets) / seconds > 0.5 * GET_RATE  # the load was there (~200/s; a loaded machine may lag)
        assert len(after) >= 100 and {g.path for g in after} == {g.path for g in gets}
        assert not stale, stale[:5]
        logs = await trio.to_thread.run_sync(purges_of, [be, fe])
        logs[proxy.address] = logs.pop(be.address)
        oracle.check(run["ledger"], run["cfg"], logs, run["health"], run["metrics"]).assert_complete()
        assert oracle.tier_order(run["ledger"], run["cfg"], logs) == []

        # The same with no tier order: the frontend, purged first, refetches v1 from the held backend.
        gets, done_at, _ = await race(origin, be, fe, proxy, tiered=False, tag="flat")
        stale = [g for g in gets if g.start > done_at and g.version == 1]
        print(f"one tier: {len(gets)} GETs, stale after done: {len(stale)} on {len({g.path for g in stale})} objects")
        assert stale, "without tier order the frontend should have refetched old objects (the check is blind)"
    finally:
        origin.stop()
