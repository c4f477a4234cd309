"""The trio <-> nats-py bridge alone, without a daemon: how many URLs/s it publishes into a 3-server R3 JetStream
stream in 5000-URL messages (purged's message format), and consumes back, with

- ``thread``: purged's adapter (purged/net/bus.py: one asyncio loop in a thread of its own), and
- ``trio-asyncio``: nats-py run inside trio's thread by trio-asyncio (``aio_as_trio``), the alternative the
  issue named. Needs ``pip install trio-asyncio`` (not a purged dependency); skipped without it.

Both run in the same process against the same cluster, alternately (``--rounds``), each on a stream of its own,
while a CPU-bound trio task takes ``--busy`` of every 10 ms (the daemon's own work: validating, the engine,
the senders), since that is where the thread's GIL hand-offs cost most.

    .venv/bin/python bench/fleet_bridge.py [--seconds 3] [--publishers 4] [--busy 0.5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nats_cluster import NatsCluster  # noqa: E402

from purged.config_bus import NatsSettings  # noqa: E402
from purged.core.fleet import encode_batch  # noqa: E402
from purged.net.bus import NatsBus  # noqa: E402

BATCH = 5000


def payload(i: int) -> bytes:
    [data] = encode_batch([f"en.wikipedia.org/wiki/Page_{i}_{k}" for k in range(BATCH)], priority="bulk",
                          origin="bench", accepted_at=time.time(), max_payload=1 << 20)
    return data


async def busy(fraction: float) -> None:
    """Hold trio's thread (and the GIL) ``fraction`` of the time, like a daemon validating and sending."""
    while fraction > 0:
        end = time.perf_counter() + 0.01 * fraction
        while time.perf_counter() < end:
            pass
        await trio.sleep(0.01 * (1 - fraction))


async def measure(publish, fetch_and_ack, seconds: float, publishers: int) -> tuple[float, float, float]:
    """``publishers`` tasks call ``publish()`` for ``seconds``, then ``fetch_and_ack()`` (which returns how many
    messages it acked) drains them: URLs/s published, URLs/s consumed, mean publish latency in ms."""
    published, lat = 0, []
    deadline = trio.current_time() + seconds

    async def publisher() -> None:
        nonlocal published
        while trio.current_time() < deadline:
            t = trio.current_time()
            await publish()
            lat.append(trio.current_time() - t)
            published += 1

    t0 = trio.current_time()
    async with trio.open_nursery() as pubs:
        for _ in range(publishers):
            pubs.start_soon(publisher)
    pub_rate = published * BATCH / (trio.current_time() - t0)
    got, t0 = 0, trio.current_time()
    while got < published:
        got += await fetch_and_ack()
    con_rate = got * BATCH / (trio.current_time() - t0)
    return pub_rate, con_rate, 1000 * sum(lat) / len(lat)


async def run_thread(servers: list[str], stream: str, seconds: float, publishers: int) -> tuple[float, float, float]:
    bus = NatsBus(NatsSettings(servers=tuple(servers), stream=stream, replicas=3, fetch_batch=16), "bench")
    data = payload(0)

    async def fetch_and_ack() -> int:
        msgs = await bus.fetch(16)
        for m in msgs:
            bus.ack(m)
        return len(msgs)

    async with trio.open_nursery() as nursery:
        await nursery.start(bus.serve)
        await bus.ready.wait()
        result = await measure(lambda: bus.publish([data], BATCH), fetch_and_ack, seconds, publishers)
        nursery.cancel_scope.cancel()
    return result


async def run_trio_asyncio(servers: list[str], stream: str, seconds: float,
                           publishers: int) -> tuple[float, float, float]:
    import nats
    import trio_asyncio
    from nats.js.api import ConsumerConfig, StreamConfig

    aio = trio_asyncio.aio_as_trio
    data = payload(0)
    async with trio_asyncio.open_loop():
        nc = await aio(nats.connect)(servers)
        js = nc.jetstream()
        await aio(js.add_stream)(StreamConfig(name=stream, subjects=[f"{stream}.batches"], num_replicas=3))
        await aio(js.add_consumer)(stream, ConsumerConfig(durable_name="bench"))
        sub = await aio(js.pull_subscribe_bind)(durable="bench", stream=stream)

        async def fetch_and_ack() -> int:
            msgs = await aio(sub.fetch)(16, timeout=1)
            for m in msgs:
                await aio(m.ack)()
            return len(msgs)

        result = await measure(lambda: aio(js.publish)(f"{stream}.batches", data, stream=stream), fetch_and_ack,
                               seconds, publishers)
        await aio(nc.close)()
    return result


async def one(mode: str, servers: list[str], stream: str, args: argparse.Namespace) -> tuple[float, float, float]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(busy, args.busy)
        runner = run_thread if mode == "thread" else run_trio_asyncio
        result = await runner(servers, stream, args.seconds, args.publishers)
        nursery.cancel_scope.cancel()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--busy", type=float, default=0.5, help="share of trio's thread held by other work (0-0.9)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    try:
        import trio_asyncio  # noqa: F401

        modes = ["thread", "trio-asyncio"]
    except ImportError:
        print("trio-asyncio is not installed (pip install trio-asyncio): measuring the thread only")
        modes = ["thread"]
    work = Path(tempfile.mkdtemp(prefix="purged-fleet-bridge-"))
    cluster = NatsCluster(work / "nats").start()
    try:
        results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode in modes:
                stream = f"B{r}{mode.replace('-', '')}"
                res = trio.run(one, mode, cluster.urls, stream, args)
                results[mode].append(res)
                print(f"round {r} {mode:>12}: publish {res[0]:>9,.0f} URLs/s (mean ack {res[2]:.1f} ms), "
                      f"consume {res[1]:>9,.0f} URLs/s", flush=True)
        for mode in modes:
            pubs = sorted(x[0] for x in results[mode])
            cons = sorted(x[1] for x in results[mode])
            print(f"{mode:>12}: median publish {pubs[len(pubs) // 2]:,.0f} URLs/s, consume "
                  f"{cons[len(cons) // 2]:,.0f} URLs/s ({args.publishers} publishers, {BATCH}-URL messages, "
                  f"R3, trio thread {args.busy:.0%} busy)")
        return 0
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)  # NATS stores and Varnish logs: hundreds of MB


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
