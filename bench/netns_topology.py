"""Several network namespaces joined by delaying links: data centres around a WAN hub, for fleet benchmarks.

The same technique as ``netns_delay.py`` (no ``tc netem`` on these kernels: a stdlib TUN delayer), generalised
from one link to N namespaces. One hub process owns a TUN device ``wan0`` in every namespace; each namespace
routes 198.18.0.0/15 into its TUN, and the hub reads every packet, looks at its IPv4 destination, holds it for
that pair's one-way delay and writes it, in order, into the destination's TUN. Every namespace runs an
unmodified kernel TCP stack end to end (slow start, windows, delayed ACKs see the real round trip).

Star (the default): each DC hangs off the hub by a spoke of ``link_ms`` one way, so DC i -> DC j takes
``link_ms[i] + link_ms[j]``: 20 ms spokes give the 80 ms DC-to-DC round trip. A mesh is any matrix of one-way
delays (``Topology(delay_ms=[[...], ...])``); the star is the matrix ``link[i] + link[j]``.

                                  dc1 198.18.11.1
                                        |
              dc0 198.18.10.1 ---.      |      .--- dc2 198.18.12.1
                                  \\     |     /
                                   [ hub: TUN router ]      one process, nice -10, holds each packet
                                  /     |     \\            delay[src][dst] s, FIFO per pair
              dc5 198.18.15.1 ---'      |      '--- dc3 198.18.13.1
                                        |
                                  dc4 198.18.14.1

Traffic inside a namespace (a daemon to its own DC's edges) never crosses the hub: it is local, as on a LAN.
Namespaces are named ``pfl<tag>-dc<i>`` (tag: our PID unless given) and deleted by those exact names on exit,
also on an exception or Ctrl-C, after SIGKILLing (by PID, from ``ip netns pids``) any process still running in
them; if this process dies without cleaning up (SIGKILL), the hub gets SIGTERM from the kernel
(``PR_SET_PDEATHSIG``) and does the same itself. The hub also stops after ``max_seconds``. Processes started
with :meth:`Topology.popen` die with this process too.

    .venv/bin/python bench/netns_topology.py --check             # 6 DCs, 20 ms spokes: prints the RTT matrix
    .venv/bin/python bench/netns_topology.py --check --dcs 3 --link-ms 5

As a module: ``with Topology(dcs=6, link_ms=20) as topo: topo.netns[i], topo.addr[i], topo.popen(i, argv)``;
``with in_netns(topo.netns[i]): ...`` runs the calling thread in DC i.
"""

from __future__ import annotations

import argparse
import ctypes
import heapq
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from netns_delay import TUN_NAME, echo_server, in_netns, ip, open_tun, tcp_rtt  # noqa: E402

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when the thread that started it exits."""
    _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def dc_address(i: int) -> str:
    """DC i's address: 198.18.(10+i).1 (its /24 is routed to it by the hub)."""
    if not 0 <= i < 200:
        raise ValueError("at most 200 data centres")
    return f"198.18.{10 + i}.1"


# -- the hub (its own process: ``netns_topology.py --serve``) ----------------------------------------------------


def serve(netns: list[str], delay: list[list[float]], max_queue: int, max_seconds: float,
          delete_on_orphan: bool) -> None:
    """Route IPv4 packets between the namespaces' TUNs by destination /24, each held ``delay[src][dst]`` s.

    Prints ``ready`` once every TUN exists, and a JSON line of counters when it stops (SIGTERM, or
    ``max_seconds``): packets per pair, drops (full queue, unknown destination, not IPv4), and
    ``max_late_ms``, the worst lateness of a release (CPU starvation of the hub shows there).
    """
    parent = os.getppid()
    die_with_parent()
    try:
        os.nice(-10)  # a wire is never starved of CPU: keep the delays faithful on a busy 2-core machine
    except OSError:
        pass
    fds = [open_tun(ns) for ns in netns]
    index = {fd: i for i, fd in enumerate(fds)}
    by_net = {bytes([198, 18, 10 + i]): i for i in range(len(netns))}
    n = len(netns)
    sent = [[0] * n for _ in range(n)]
    stats = {"bytes": 0, "dropped_queue_full": 0, "dropped_unknown_dst": 0, "dropped_not_ipv4": 0,
             "write_errors": 0, "max_queue": 0, "max_late_ms": 0.0}
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__(0, True))
    ep = select.epoll()
    for fd in fds:
        ep.register(fd, select.EPOLLIN)
    print("ready", flush=True)
    # One heap for all pairs: (release, seq, dst, src, packet). A pair's delay is fixed, so its packets leave
    # in arrival order; seq breaks ties between equal release times in arrival order too.
    heap: list[tuple[float, int, int, int, bytes]] = []
    seq = 0
    read, write, monotonic, push, pop = os.read, os.write, time.monotonic, heapq.heappush, heapq.heappop
    end = monotonic() + max_seconds
    while not stop[0]:
        now = monotonic()
        if now > end:
            break
        timeout = max(0.0, heap[0][0] - now) if heap else 0.5
        try:
            events = ep.poll(min(timeout, 0.5))
        except InterruptedError:
            continue
        now = monotonic()
        for fd, _ in events:
            src = index[fd]
            row = delay[src]
            for _ in range(4096):  # bounded per wake-up, so no namespace starves the others
                try:
                    pkt = read(fd, 65536)
                except BlockingIOError:
                    break
                if len(pkt) < 20 or pkt[0] >> 4 != 4:
                    stats["dropped_not_ipv4"] += 1
                    continue
                dst = by_net.get(pkt[16:19])
                if dst is None or dst == src:
                    stats["dropped_unknown_dst"] += 1
                    continue
                if len(heap) >= max_queue:
                    stats["dropped_queue_full"] += 1
                    continue
                seq += 1
                push(heap, (now + row[dst], seq, dst, src, pkt))
        if len(heap) > stats["max_queue"]:
            stats["max_queue"] = len(heap)
        now = monotonic()
        while heap and heap[0][0] <= now:
            release, _, dst, src, pkt = pop(heap)
            late = (now - release) * 1000
            if late > stats["max_late_ms"]:
                stats["max_late_ms"] = late
            try:
                write(fds[dst], pkt)
                sent[src][dst] += 1
                stats["bytes"] += len(pkt)
            except OSError:
                stats["write_errors"] += 1
    stats["max_late_ms"] = round(stats["max_late_ms"], 2)
    stats["packets"] = sum(map(sum, sent))
    stats["packets_by_pair"] = {f"{i}>{j}": sent[i][j] for i in range(n) for j in range(n) if sent[i][j]}
    if delete_on_orphan and os.getppid() != parent:
        # Our creator died without tearing down (SIGKILL): the namespaces, and what still runs in them, are
        # ours to remove.
        kill_namespace_pids(netns)
        for ns in netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    print(json.dumps(stats), flush=True)


# -- set-up and tear-down ----------------------------------------------------------------------------------------


def kill_namespace_pids(netns: list[str]) -> list[int]:
    """SIGKILL, by PID, every process still running in these namespaces (all started by us: nothing else
    can enter a namespace we just created); returns the PIDs."""
    pids = []
    for ns in netns:
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
        pids += [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def star(link_ms: Sequence[float]) -> list[list[float]]:
    """The one-way delay matrix (ms) of a star whose spoke i takes ``link_ms[i]`` one way."""
    return [[0.0 if i == j else a + b for j, b in enumerate(link_ms)] for i, a in enumerate(link_ms)]


class Topology:
    """``dcs`` fresh namespaces (``netns[i]``, address ``addr[i]`` on its TUN) joined through the hub.

    ``link_ms``: one spoke delay for all, or one per DC (star); ``delay_ms``: a full one-way matrix (mesh)
    instead. Nothing outside the namespaces is touched; every address is in 198.18.0.0/15.
    """

    def __init__(self, dcs: int = 6, link_ms: float | Sequence[float] = 20.0, *,
                 delay_ms: Sequence[Sequence[float]] | None = None, tag: str | None = None,
                 max_queue: int = 200_000, max_seconds: float = 3600.0):
        if dcs < 2:
            raise ValueError("a topology needs at least two data centres")
        if delay_ms is None:
            spokes = [float(link_ms)] * dcs if isinstance(link_ms, int | float) else [float(x) for x in link_ms]
            if len(spokes) != dcs:
                raise ValueError(f"link_ms has {len(spokes)} entries for {dcs} data centres")
            delay_ms = star(spokes)
        if len(delay_ms) != dcs or any(len(row) != dcs for row in delay_ms):
            raise ValueError(f"delay_ms must be a {dcs} x {dcs} matrix")
        self.delay_ms = [[float(x) for x in row] for row in delay_ms]
        tag = tag or str(os.getpid())
        self.netns = [f"pfl{tag}-dc{i}" for i in range(dcs)]
        self.addr = [dc_address(i) for i in range(dcs)]
        self.max_queue, self.max_seconds = max_queue, max_seconds
        self.hub: subprocess.Popen | None = None
        self.created: list[str] = []
        self.stats: dict | None = None
        self.procs: list[subprocess.Popen] = []

    def __len__(self) -> int:
        return len(self.netns)

    def __enter__(self) -> Topology:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        for ns in self.netns:
            if os.path.exists(f"/var/run/netns/{ns}"):
                raise RuntimeError(f"network namespace {ns} exists already")
        for ns in self.netns:
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        matrix = json.dumps([[d / 1000 for d in row] for row in self.delay_ms])
        self.hub = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", *self.netns, "--delay-matrix", matrix,
             "--max-queue", str(self.max_queue), "--max-seconds", str(self.max_seconds)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        line = self.hub.stdout.readline().strip()
        if line != "ready":
            err = self.hub.stderr.read() if self.hub.poll() is not None else ""
            raise RuntimeError(f"hub did not start: {line} {err}")
        for ns, mine in zip(self.netns, self.addr, strict=True):
            ip("-n", ns, "link", "set", TUN_NAME, "txqueuelen", "10000")
            ip("-n", ns, "addr", "add", f"{mine}/32", "dev", TUN_NAME)
            ip("-n", ns, "link", "set", TUN_NAME, "up")
            ip("-n", ns, "route", "add", "198.18.0.0/15", "dev", TUN_NAME, "src", mine)

    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run in DC i (``ip netns exec`` execs it: the PID is the program's own)."""
        return ["ip", "netns", "exec", self.netns[i], *argv]

    def popen(self, i: int | None, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in DC i (``None``: here), dying with this thread (start it from the main thread)."""
        cmd = argv if i is None else self.exec_argv(i, argv)
        proc = subprocess.Popen(cmd, preexec_fn=die_with_parent, **kwargs)
        self.procs.append(proc)
        return proc

    def hub_cpu_seconds(self) -> float:
        from common import cpu_seconds

        return cpu_seconds(self.hub.pid)

    def down(self) -> None:
        for proc in reversed(self.procs):  # ours only, by PID: normally the caller stopped them already
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        if self.hub is not None and self.hub.poll() is None:
            self.hub.send_signal(signal.SIGTERM)
            try:
                out, _ = self.hub.communicate(timeout=10)
                lines = [ln for ln in out.splitlines() if ln.startswith("{")]
                if lines:
                    self.stats = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                self.hub.kill()
                self.hub.wait()
        # Whatever is still running in our namespaces (a varnishd's worker, a process started elsewhere) is
        # a leftover of this run: stopped by PID before the namespaces go.
        left = kill_namespace_pids(self.created)
        if left:
            print(f"netns_topology: killed {len(left)} leftover process(es) in our namespaces: {left}",
                  file=sys.stderr)
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()


# -- round-trip check ----------------------------------------------------------------------------------------------


def check(dcs: int, link_ms: float, count: int) -> int:
    """Build the star, print the TCP connect RTT (min of ``count``) between every pair, tear it down."""
    with Topology(dcs=dcs, link_ms=link_ms) as topo:
        stop = threading.Event()
        servers, threads = [], []
        try:
            for i in range(dcs):
                with in_netns(topo.netns[i]):
                    servers.append(socket.create_server((topo.addr[i], 7)))
                threads.append(threading.Thread(target=echo_server, args=(servers[-1], stop), daemon=True))
                threads[-1].start()
            print(f"netns_topology: {dcs} DCs, star with {link_ms:g} ms spokes (expected DC-to-DC RTT "
                  f"{4 * link_ms:g} ms); min TCP connect time, ms:")
            print("        " + "".join(f"{'dc' + str(j):>8}" for j in range(dcs)))
            for i in range(dcs):
                row = []
                with in_netns(topo.netns[i]):
                    for j in range(dcs):
                        rtt = tcp_rtt(topo.addr[j], 7, count=count, request=b"ping\n")
                        row.append(min(rtt["connect_all"]) * 1000)
                print(f"  {'dc' + str(i):<6}" + "".join(f"{x:8.1f}" for x in row))
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=5)
            for s in servers:
                s.close()
    print(f"  hub: {json.dumps({k: v for k, v in (topo.stats or {}).items() if k != 'packets_by_pair'})}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", nargs="+", metavar="NETNS", help=argparse.SUPPRESS)
    p.add_argument("--delay-matrix", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help="build the star, print its RTT matrix, tear it down")
    p.add_argument("--dcs", type=int, default=6)
    p.add_argument("--link-ms", type=float, default=20.0, help="one-way spoke delay (default 20: 80 ms RTT)")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--max-queue", type=int, default=200_000, help=argparse.SUPPRESS)
    p.add_argument("--max-seconds", type=float, default=3600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, json.loads(args.delay_matrix), args.max_queue, args.max_seconds, True)
        return 0
    if args.check:
        return check(args.dcs, args.link_ms, args.count)
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
