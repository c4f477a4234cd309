"""Journal benchmark: replay time of a journal holding 1M pending purges, and the HTTP accept rate (URLs/s in
batches of 1000) with each ``durability`` mode. Prints its figures; each measurement is repeated (``--repeat``).

    .venv/bin/python bench/journal_bench.py                 # 1M replay, 5 s accept runs, 3 repeats
    .venv/bin/python bench/journal_bench.py --entries 200000 --seconds 2 --repeat 1

Replay is timed twice: ``Journal.open`` alone in a fresh process (read, verify, decode, rebuild the engine's
lanes), and a whole daemon from exec to ``READY=1`` on a test NOTIFY_SOCKET (interpreter start included). The
accept runs use edge nodes on ports nothing listens on, so the daemon only ingests and journals; the clients
(``--clients`` concurrent, in this process) share the machine's cores with it. Every process is started here
and stopped by its PID; every directory is a ``tempfile.mkdtemp`` of our own, removed afterwards.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable

# The demo's shape: two data centres, a backend and a frontend tier each.
TIERS = {"eqiad": (["127.0.0.1:9"], ["127.0.0.1:10"]), "codfw": (["127.0.0.1:11"], ["127.0.0.1:12"])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(port: int, state_dir: str | None, durability: str) -> str:
    dcs = {
        dc: {"tiers": [{"name": "backend", "nodes": b}, {"name": "frontend", "delay": 1.0, "nodes": f}]}
        for dc, (b, f) in TIERS.items()
    }
    return json.dumps({  # JSON is YAML
        "listen": {"http": f"127.0.0.1:{port}"},
        "state_dir": state_dir,
        "durability": durability,
        "datacenters": dcs,
        "sender": {"connect_timeout": 1.0, "retry_max": 5.0},
        # A benchmark of the accept path: none of the safe defaults that would throttle it (issue 12).
        "limits": {"client_rate": 0, "max_pending": 0, "max_pending_bytes": 0},
        "shutdown_timeout": 1.0,
    })


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- replay -------------------------------------------------------------------------------------------------------


def _topology():
    from purged.core.topology import DatacenterSpec, TierSpec, Topology

    return Topology([
        DatacenterSpec(dc, (), (TierSpec("backend", 0.0, tuple(b)), TierSpec("frontend", 1.0, tuple(f))))
        for dc, (b, f) in TIERS.items()
    ])


def build_journal(directory: str, entries: int) -> None:
    """A journal holding ``entries`` pending purges (nobody acknowledged anything), as a crash would leave it."""
    import trio

    from purged.core.engine import Engine
    from purged.net.journal import Journal

    async def main() -> None:
        gc.disable()  # millions of acyclic objects: see Journal.open
        engine = Engine(_topology(), now=trio.current_time())
        journal = Journal(directory, "none")
        journal.open(engine)
        for start in range(0, entries, 10_000):
            targets = [f"en.wikipedia.org/wiki/Page_{i}?action=history" for i in range(start, min(entries, start + 10_000))]
            engine.submit(targets, trio.current_time())
            await journal.flush()
        await journal.flush(final=True)
        journal.release()

    trio.run(main)


def replay_once(directory: str) -> None:
    """(In a fresh process.) Time Journal.open into a new engine; print JSON."""
    import trio

    from purged.core.engine import Engine
    from purged.net.journal import Journal

    async def main() -> dict:
        engine = Engine(_topology(), now=trio.current_time())
        journal = Journal(directory, "none")
        t0 = time.perf_counter()
        journal.open(engine)
        took = time.perf_counter() - t0
        journal.release()
        return {"seconds": took, "replayed": journal.stats.replayed, "backlog": engine.backlog("127.0.0.1:9")}

    print(json.dumps(trio.run(main)))


def ready_time(directory: str) -> float:
    """Seconds from exec to READY=1 of a daemon replaying ``directory``."""
    tmp = tempfile.mkdtemp(prefix="purged-jbench-ready-")
    try:
        port = free_port()
        cfg = Path(tmp, "purged.yaml")
        cfg.write_text(config_text(port, directory, "fsync"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(os.path.join(tmp, "notify"))
        sock.settimeout(120)
        env = dict(os.environ, NOTIFY_SOCKET=os.path.join(tmp, "notify"))
        t0 = time.perf_counter()
        proc = subprocess.Popen([PYTHON, "-m", "purged", "--config", str(cfg)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            return time.perf_counter() - t0
        finally:
            stop(proc)
            sock.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- accept rate ----------------------------------------------------------------------------------------------------


def accept_rate(durability: str | None, seconds: float, clients: int) -> tuple[float, dict]:
    """URLs/s accepted (202) by a daemon with ``durability`` (None: no journal)."""
    import httpx
    import trio

    tmp = tempfile.mkdtemp(prefix="purged-jbench-accept-")
    try:
        port = free_port()
        cfg = Path(tmp, "purged.yaml")
        cfg.write_text(config_text(port, os.path.join(tmp, "state") if durability else None, durability or "none"))
        proc = subprocess.Popen([PYTHON, "-m", "purged", "--config", str(cfg)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("purged did not start") from None
                    time.sleep(0.05)

            accepted = [0]

            async def client(cid: int, http: httpx.AsyncClient, until: float) -> None:
                n = 0
                while trio.current_time() < until:
                    n += 1
                    body = json.dumps({"urls": [f"http://en.wikipedia.org/wiki/C{cid}_{n}_{i}" for i in range(1000)]})
                    r = await http.post("/v1/purge", content=body, headers={"Content-Type": "application/json"})
                    if r.status_code != 202:
                        raise RuntimeError(f"{r.status_code} {r.text[:200]}")
                    accepted[0] += 1000

            async def main() -> float:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                             limits=httpx.Limits(max_connections=clients)) as http:
                    await http.post("/v1/purge", json={"urls": ["http://warm.up/"]})
                    t0 = trio.current_time()
                    async with trio.open_nursery() as nursery:
                        for cid in range(clients):
                            nursery.start_soon(client, cid, http, t0 + seconds)
                    took = trio.current_time() - t0
                    text = (await http.get("/metrics")).text
                metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                           if line.startswith(("purged_journal_fsyncs_total", "purged_journal_writes_total",
                                               "purged_journal_sync_seconds_total"))}
                return accepted[0] / took, metrics

            return trio.run(main)
        finally:
            stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--skip-replay", action="store_true")
    p.add_argument("--skip-accept", action="store_true")
    p.add_argument("--modes", default="fsync,batch,none,off", help="accept runs to do (off: no journal)")
    p.add_argument("--replay-once", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.replay_once:
        replay_once(args.replay_once)
        return

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    if not args.skip_replay:
        tmp = tempfile.mkdtemp(prefix="purged-jbench-replay-")
        try:
            t0 = time.perf_counter()
            build_journal(tmp, args.entries)
            size = sum(f.stat().st_size for f in Path(tmp).glob("*.seg"))
            print(f"journal: {args.entries} pending purges, 4 nodes, {size / 1e6:.1f} MB in "
                  f"{len(list(Path(tmp).glob('*.seg')))} segments (built in {time.perf_counter() - t0:.1f}s)")
            opens, readies = [], []
            for r in range(args.repeat):
                out = subprocess.run([PYTHON, __file__, "--replay-once", tmp], capture_output=True, check=True)
                res = json.loads(out.stdout)
                assert res["replayed"] == args.entries and res["backlog"] == args.entries, res
                opens.append(res["seconds"])
                readies.append(ready_time(tmp))
                print(f"  replay {r + 1}: Journal.open {opens[-1]:.2f}s; daemon exec -> READY=1 {readies[-1]:.2f}s")
            print(f"replay of {args.entries} pending: Journal.open median {statistics.median(opens):.2f}s, "
                  f"exec -> READY=1 median {statistics.median(readies):.2f}s (target <= 5 s)")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not args.skip_accept:
        print(f"accept rate: POST /v1/purge, 1000 URLs per batch, {args.clients} concurrent clients, "
              f"{args.seconds:g} s per run")
        for mode in [None if m == "off" else m for m in args.modes.split(",")]:
            rates = []
            for r in range(args.repeat):
                rate, metrics = accept_rate(mode, args.seconds, args.clients)
                rates.append(rate)
                extra = ""
                if metrics.get("purged_journal_writes_total"):
                    extra = (f"; {metrics['purged_journal_writes_total']:.0f} writes, "
                             f"{metrics.get('purged_journal_fsyncs_total', 0):.0f} fsyncs "
                             f"({metrics.get('purged_journal_sync_seconds_total', 0):.2f}s in fsync)")
                print(f"  {mode or 'no journal'} run {r + 1}: {rate:,.0f} URLs/s{extra}")
            print(f"durability {mode or 'off (state_dir: null)'}: median {statistics.median(rates):,.0f} URLs/s")


if __name__ == "__main__":
    main()
