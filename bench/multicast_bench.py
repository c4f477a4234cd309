"""Benchmark: how many HTCP datagrams/s ``serve_multicast`` decodes before the kernel starts dropping.

For each offered rate, a fresh receiver process runs ``serve_multicast`` with a no-op ingest, and sender
processes (one per loopback source address, so per-sender loss accounting stays meaningful) offer pre-built
HTCP CLR datagrams with a paced ``sendto`` loop. Traffic stays on the host: multicast with TTL 0 and loopback
on 127.0.0.1 (or plain unicast to 127.0.0.1 with ``--unicast``). Every run is bounded in count and time.

    .venv/bin/python bench/multicast_bench.py                  # 10k, 50k, 100k, 200k, 300k/s, 3 s each
    .venv/bin/python bench/multicast_bench.py --rates 100000 --seconds 5 --senders 3

Per rate it prints the rate the senders achieved, datagrams/s decoded (between the first and last ingest
call), kernel drops (SO_MEMINFO, cross-checked with /proc/net/snmp RcvbufErrors), the loss the LossTracker
estimated from transaction ids, and the receiver's CPU time; then the lowest rate at which loss started,
and the receiver's drain capacity alone (datagrams queued while it is stopped, then drained).
Figures depend on what else the host runs: on a 2-CPU machine the senders and the receiver compete.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GROUP = "239.255.91.17"


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- receiver (a subprocess) -----------------------------------------------------------------------------


def run_receiver(group: str, port: int, fmt: str, cpus: set[int] | None) -> None:
    import trio

    from purged.net.multicast import MulticastListen, MulticastStats, serve_multicast

    if cpus:
        os.sched_setaffinity(0, cpus)
    stats = MulticastStats()
    marks: list[tuple[float, int]] = []  # (time, datagrams decoded) at the first and the latest ingest call

    def ingest(targets: list[str], label: str) -> None:
        mark = (time.monotonic(), stats.packets["good"] + len(targets))  # stats are updated before ingest
        if not marks:
            marks.append(mark)
        marks[1:] = [mark]

    async def main() -> None:
        listen = MulticastListen(group=group, port=port, interface="127.0.0.1", format=fmt)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_multicast, listen, ingest, stats)
                cpu0 = cpu_seconds()
                print("ready", flush=True)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
        st = stats.statistics()
        (t0, n0), (t1, n1) = (marks + [(0.0, 0), (0.0, 0)])[:2]
        st["cpu_seconds"] = cpu_seconds() - cpu0
        # the first batch was decoded before the first mark: count from it
        st["decoded_per_s"] = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        print(json.dumps(st), flush=True)

    trio.run(main)


# -- senders (multiprocessing) ---------------------------------------------------------------------------


def sender_socket(source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)  # never leaves the host
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return sock


def datagram_templates() -> list[bytearray]:
    """Pre-built datagrams; only the transaction id (bytes 8-11) is patched in per send."""
    from purged.core.htcp import encode_clr

    return [bytearray(encode_clr(f"http://en.wikipedia.org/wiki/Page_{i}?action=raw", 0)) for i in range(256)]


def run_sender(
    source: str,
    dest: tuple[str, int],
    rate: float,
    count: int,
    start_at: float,
    limit: float,
    results,
    cpus: set[int] | None = None,
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    sock = sender_socket(source)
    templates = datagram_templates()
    pack_into = struct.Struct("!I").pack_into
    sendto = sock.sendto
    seq = sent = errors = 0
    while time.monotonic() < start_at:
        time.sleep(0.0005)
    t0 = time.monotonic()
    deadline = t0 + limit
    while sent < count:
        now = time.monotonic()
        if now > deadline:
            break
        # at most 1024 per burst, so that the deadline is checked even when the sender falls behind
        due = min(count, int((now - t0) * rate) + 64 if rate else count, sent + 1024)
        if due <= sent:
            time.sleep(0.0002)
            continue
        while sent < due:
            seq += 1
            buf = templates[seq & 255]
            pack_into(buf, 8, seq & 0xFFFFFFFF)
            try:
                sendto(buf, dest)
            except OSError:
                errors += 1
            sent += 1
    results.put((sent, errors, time.monotonic() - t0, cpu_seconds()))


# -- driver ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def udp_rcvbuf_errors() -> int:
    """The host-wide count of UDP datagrams dropped for a full receive buffer (a cross-check)."""
    with open("/proc/net/snmp") as f:
        names, values = [line.split() for line in f if line.startswith("Udp:")][:2]
    return int(values[names.index("RcvbufErrors")])


def start_receiver(group: str, port: int, pin: bool) -> tuple[subprocess.Popen, set[int] | None]:
    """Start a receiver; return it and the CPUs left for senders.

    Pinned, the receiver has the last CPU to itself and the senders share the rest; unpinned, the scheduler
    tends to pull the receiver onto a sender's CPU (the sender's softirq wakes it).
    """
    cpus = sorted(os.sched_getaffinity(0))
    pin = pin and len(cpus) > 1
    recv_cpus, send_cpus = ({cpus[-1]}, set(cpus[:-1])) if pin else (None, None)
    receiver = subprocess.Popen(
        [sys.executable, __file__, "--receiver", group, str(port), ",".join(map(str, recv_cpus or ()))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout.readline().strip() == "ready"
    return receiver, send_cpus


def stop_receiver(receiver: subprocess.Popen) -> dict:
    receiver.send_signal(signal.SIGTERM)
    stats = json.loads(receiver.stdout.readline())
    receiver.wait(timeout=10)
    return stats


def drain_capacity(unicast: bool, pin: bool, count: int = 9000) -> dict:
    """Queue ``count`` datagrams while the receiver is stopped (SIGSTOP), then time how fast it drains them.

    This measures the receiver alone: no sender competes for the CPU while it works.
    """
    group = "127.0.0.1" if unicast else GROUP
    port = free_port()
    receiver, _ = start_receiver(group, port, pin)
    try:
        receiver.send_signal(signal.SIGSTOP)
        templates = datagram_templates()
        with sender_socket("127.0.0.1") as sock:
            for seq in range(1, count + 1):
                buf = templates[seq & 255]
                struct.pack_into("!I", buf, 8, seq)
                sock.sendto(buf, (group, port))
        receiver.send_signal(signal.SIGCONT)
        time.sleep(1.0)
        stats = stop_receiver(receiver)
    finally:
        if receiver.poll() is None:
            receiver.kill()
    return stats


def one_rate(rate: int, seconds: float, senders: int, unicast: bool, pin: bool) -> dict:
    port = free_port()
    snmp_before = udp_rcvbuf_errors()
    group = "127.0.0.1" if unicast else GROUP
    receiver, send_cpus = start_receiver(group, port, pin)
    try:
        count = int((rate or 400_000) * seconds)  # "max" still stops after a bounded count
        results: multiprocessing.Queue = multiprocessing.Queue()
        start_at = time.monotonic() + 0.3
        procs = [
            multiprocessing.Process(
                target=run_sender,
                args=(
                    f"127.0.0.{i + 1}",
                    (group, port),
                    rate / senders,
                    count // senders,
                    start_at,
                    seconds * 2,
                    results,
                    send_cpus,
                ),
            )
            for i in range(senders)
        ]
        for p in procs:
            p.start()
        out = [results.get(timeout=seconds * 3 + 10) for _ in procs]
        for p in procs:
            p.join()
        time.sleep(0.5)  # let the receiver drain its buffer
        stats = stop_receiver(receiver)
        snmp_drops = udp_rcvbuf_errors() - snmp_before
    finally:
        if receiver.poll() is None:
            receiver.kill()
    sent = sum(o[0] for o in out)
    send_time = max(o[2] for o in out)
    return {
        "rate": rate,
        "sent": sent,
        "send_errors": sum(o[1] for o in out),
        "offered": sent / send_time,
        "sender_cpu": sum(o[3] for o in out),
        "good": stats["packets_good"],
        "decoded_per_s": stats["decoded_per_s"],
        "kernel_drops": stats["drops_kernel"],
        "snmp_drops": snmp_drops,
        "missing": sent - stats["packets_good"],
        "est_lost": stats["loss_lost"],
        "cpu": stats["cpu_seconds"],
        "rcvbuf": stats["rcvbuf_bytes"],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--receiver":
        run_receiver(sys.argv[2], int(sys.argv[3]), "htcp", {int(c) for c in sys.argv[4].split(",") if c})
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates",
        default="10000,50000,100000,200000,300000",
        help="comma-separated offered rates in datagrams/s; 0 means as fast as possible",
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--unicast", action="store_true", help="unicast to 127.0.0.1 instead of multicast")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the receiver to the last CPU and the senders to the others",
    )
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} CPUs; {'unicast' if args.unicast else 'multicast ' + GROUP} on loopback; "
        f"{args.senders} sender processes; {args.seconds:g} s per rate; "
        f"{'receiver pinned to its own CPU' if args.pin else 'no CPU pinning'}"
    )
    header = (
        f"{'target/s':>9} {'offered/s':>10} {'decoded/s':>10} {'received':>9} {'kernel drops':>12} "
        f"{'RcvbufErrors':>12} {'est. lost':>9} {'recv CPU s':>10} {'recv CPU %':>10} {'us/dgram':>8}"
    )
    print(header)
    onset = None
    for rate in (int(r) for r in args.rates.split(",")):
        r = one_rate(rate, args.seconds, args.senders, args.unicast, args.pin)
        busy = r["sent"] / r["offered"] if r["offered"] else 1
        print(
            f"{rate or 'max':>9} {r['offered']:>10.0f} {r['decoded_per_s']:>10.0f} {r['good']:>9} "
            f"{r['kernel_drops']:>12} {r['snmp_drops']:>12} {r['est_lost']:>9} {r['cpu']:>10.2f} "
            f"{100 * r['cpu'] / busy:>9.0f}% {1e6 * r['cpu'] / max(r['good'], 1):>8.1f}",
            flush=True,
        )
        if r["send_errors"]:
            print(f"          ({r['send_errors']} send errors)")
        if onset is None and r["missing"] > r["sent"] * 0.001:
            onset = r["offered"]
    print(f"receiver SO_RCVBUF (as getsockopt reports it): {r['rcvbuf']}")
    for _ in range(3):
        d = drain_capacity(args.unicast, args.pin)
        cpu_each = 1e6 * d["cpu_seconds"] / max(d["packets_good"], 1)
        print(
            f"drain capacity (receiver alone, {d['packets_good']} queued datagrams): "
            f"{d['decoded_per_s']:.0f}/s, {cpu_each:.1f} us CPU each"
        )
    print(
        "loss (>0.1%) starts at an offered rate of " + (f"{onset:.0f}/s" if onset else "none of these rates")
    )


if __name__ == "__main__":
    main()
