"""Two network namespaces joined by a delaying link: a stand-in for a WAN between data centres.

There is no ``tc netem`` on these kernels (and no iptables/nft), so the delay is a small stdlib program: it owns
one TUN device in each namespace (``/dev/net/tun``, ``TUNSETIFF``, opened after ``setns`` into that namespace),
and every IP packet the kernel routes into one TUN is held ``delay`` seconds and then written, in order, into
the other. Each namespace routes the other's /24 into its TUN, so both sides run an unmodified kernel TCP stack
end to end: slow start, congestion window, receive windows, delayed ACKs all see a real ``2 x delay`` round trip.
(A delaying TCP proxy would terminate TCP at each side and so hide all of that.)

    namespace A (purged side)                 delayer process                 namespace B (a data centre)
    198.18.0.1/32 on tun "wan0"  ──────►  read, hold D, write in order ──────►  tun "wan0" 198.18.1.1/32
    route 198.18.1.0/24 dev wan0  ◄──────  read, hold D, write in order ◄──────  route 198.18.0.0/24 dev wan0

Addresses are in 198.18.0.0/15 (benchmarking range); nothing is routed outside the two namespaces, which are
created with unique names and deleted (by those exact names) on exit, even on failure. The TUN devices vanish
with the delayer process.

    .venv/bin/python bench/netns_delay.py --check            # 40 ms each way; prints the measured TCP RTT
    .venv/bin/python bench/netns_delay.py --check --delay-ms 10

Used as a module by ``crossdc_bench.py``: ``with DelayedLink(delay=0.040) as link: ...``; ``link.netns_a``,
``link.netns_b``, ``link.addr_a``, ``link.addr_b``; ``with in_netns(link.netns_a): ...`` runs the calling thread
(and the processes it starts) inside namespace A.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
TUN_NAME = "wan0"

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str):
    """Run the calling thread inside network namespace ``name`` (created with ``ip netns add``)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        setns(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(target)
        os.close(home)


def open_tun(netns: str, name: str = TUN_NAME) -> int:
    """A non-blocking TUN fd (IFF_TUN, no packet info) whose device lives in ``netns``."""
    with in_netns(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
        except BaseException:
            os.close(fd)
            raise
    return fd


# -- the delayer (runs as its own process: ``netns_delay.py --serve``) ---------------------------------------------


def serve(netns_a: str, netns_b: str, delay: float, max_queue: int, max_seconds: float) -> None:
    """Forward packets between the TUNs in ``netns_a`` and ``netns_b``, each held ``delay`` s, in order.

    Prints ``ready`` once both devices exist, and a JSON line of counters on SIGTERM (or after ``max_seconds``,
    a safety bound): packets each way, packets dropped because a queue held ``max_queue`` (a full link),
    and ``max_late_ms``, the worst lateness of a release (CPU starvation of this process shows there; it
    runs at nice -10 to avoid it).
    """
    try:
        os.nice(-10)  # a wire is never starved of CPU: keep the delay faithful on a busy 2-core machine
    except OSError:
        pass
    fd_a, fd_b = open_tun(netns_a), open_tun(netns_b)
    peer = {fd_a: fd_b, fd_b: fd_a}
    queues: dict[int, collections.deque] = {fd_a: collections.deque(), fd_b: collections.deque()}  # by source
    stats = {"a_to_b": 0, "b_to_a": 0, "bytes": 0, "dropped_queue_full": 0, "write_errors": 0, "max_queue": 0,
             "max_late_ms": 0.0}
    key = {fd_a: "a_to_b", fd_b: "b_to_a"}
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__(0, True))
    ep = select.epoll()
    ep.register(fd_a, select.EPOLLIN)
    ep.register(fd_b, select.EPOLLIN)
    print("ready", flush=True)
    read, write, monotonic = os.read, os.write, time.monotonic
    end = monotonic() + max_seconds
    while not stop[0]:
        now = monotonic()
        if now > end:
            break
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - now) if due else 0.5
        try:
            events = ep.poll(min(timeout, 0.5))
        except InterruptedError:
            continue
        now = monotonic()
        for fd, _ in events:
            q = queues[fd]
            release = now + delay
            for _ in range(4096):  # bounded per wake-up, so the other direction is never starved
                try:
                    pkt = read(fd, 65536)
                except BlockingIOError:
                    break
                if len(q) >= max_queue:
                    stats["dropped_queue_full"] += 1
                    continue
                q.append((release, pkt))
            if len(q) > stats["max_queue"]:
                stats["max_queue"] = len(q)
        now = monotonic()
        for fd, q in queues.items():
            out = peer[fd]
            while q and q[0][0] <= now:
                release, pkt = q.popleft()
                late = (now - release) * 1000
                if late > stats["max_late_ms"]:
                    stats["max_late_ms"] = late
                try:
                    write(out, pkt)
                    stats[key[fd]] += 1
                    stats["bytes"] += len(pkt)
                except OSError:
                    stats["write_errors"] += 1
    stats["max_late_ms"] = round(stats["max_late_ms"], 2)
    print(json.dumps(stats), flush=True)


# -- set-up and tear-down ----------------------------------------------------------------------------------------


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


class DelayedLink:
    """Namespaces A and B (fresh, uniquely named), joined by the delayer: ``delay`` seconds each way."""

    def __init__(self, delay: float = 0.040, *, tag: str | None = None, addr_a: str = "198.18.0.1",
                 addr_b: str = "198.18.1.1", max_queue: int = 200_000, max_seconds: float = 3600.0):
        tag = tag or str(os.getpid())
        self.netns_a, self.netns_b = f"purged-dc0-{tag}", f"purged-dc1-{tag}"
        self.addr_a, self.addr_b = addr_a, addr_b
        self.delay = delay
        self.max_queue, self.max_seconds = max_queue, max_seconds
        self.proc: subprocess.Popen | None = None
        self.created: list[str] = []
        self.stats: dict | None = None

    def __enter__(self) -> DelayedLink:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        for ns in (self.netns_a, self.netns_b):
            if os.path.exists(f"/var/run/netns/{ns}"):
                raise RuntimeError(f"network namespace {ns} exists already")
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", self.netns_a, self.netns_b,
             "--delay-ms", repr(self.delay * 1000), "--max-queue", str(self.max_queue),
             "--max-seconds", str(self.max_seconds)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"delayer did not start: {line} {self.proc.stderr.read() if self.proc.poll() else ''}")
        for ns, mine, other in ((self.netns_a, self.addr_a, self.addr_b), (self.netns_b, self.addr_b, self.addr_a)):
            ip("-n", ns, "link", "set", TUN_NAME, "txqueuelen", "10000")
            ip("-n", ns, "addr", "add", f"{mine}/32", "dev", TUN_NAME)
            ip("-n", ns, "link", "set", TUN_NAME, "up")
            ip("-n", ns, "route", "add", other.rsplit(".", 1)[0] + ".0/24", "dev", TUN_NAME, "src", mine)

    def cpu_seconds(self) -> float:
        from common import cpu_seconds

        return cpu_seconds(self.proc.pid)

    def down(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                out, _ = self.proc.communicate(timeout=10)
                lines = [ln for ln in out.splitlines() if ln.startswith("{")]
                if lines:
                    self.stats = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()


# -- round-trip checks -------------------------------------------------------------------------------------------


def tcp_rtt(host: str, port: int, count: int = 5, request: bytes | None = None, timeout: float = 5.0) -> dict:
    """Median TCP connect time (SYN -> SYN/ACK: one round trip) and, if ``request`` is given, the median time
    from writing ``request`` to the first byte of its answer on an established connection. Seconds."""
    connects, requests = [], []
    for _ in range(count):
        t0 = time.monotonic()
        with socket.create_connection((host, port), timeout=timeout) as s:
            connects.append(time.monotonic() - t0)
            if request is not None:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                t1 = time.monotonic()
                s.sendall(request)
                if not s.recv(65536):
                    raise RuntimeError("connection closed without an answer")
                requests.append(time.monotonic() - t1)
    out = {"connect": statistics.median(connects), "connect_all": connects}
    if requests:
        out["request"] = statistics.median(requests)
        out["request_all"] = requests
    return out


def echo_server(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass


def check(delay_ms: float, count: int) -> int:
    """Set the link up, measure the TCP round trip through it with a small echo server in B, tear down."""
    with DelayedLink(delay=delay_ms / 1000) as link:
        stop = threading.Event()
        with in_netns(link.netns_b):
            srv = socket.create_server((link.addr_b, 7))
        thread = threading.Thread(target=echo_server, args=(srv, stop), daemon=True)
        thread.start()
        try:
            with in_netns(link.netns_a):
                rtt = tcp_rtt(link.addr_b, 7, count=count, request=b"ping\n")
        finally:
            stop.set()
            thread.join(timeout=5)
            srv.close()
        print(f"netns_delay: {link.netns_a} ({link.addr_a}) <-> {link.netns_b} ({link.addr_b}), "
              f"{delay_ms:g} ms each way")
        print(f"  TCP connect (1 RTT): median {rtt['connect'] * 1000:.1f} ms "
              f"({', '.join(f'{x * 1000:.1f}' for x in rtt['connect_all'])})")
        print(f"  request -> answer:   median {rtt['request'] * 1000:.1f} ms "
              f"({', '.join(f'{x * 1000:.1f}' for x in rtt['request_all'])})")
    print(f"  delayer: {link.stats}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", nargs=2, metavar=("NETNS_A", "NETNS_B"), help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help="set up a link, print its measured RTT, tear it down")
    p.add_argument("--delay-ms", type=float, default=40.0, help="one-way delay (default 40: an 80 ms RTT)")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--max-queue", type=int, default=200_000, help=argparse.SUPPRESS)
    p.add_argument("--max-seconds", type=float, default=3600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve[0], args.serve[1], args.delay_ms / 1000, args.max_queue, args.max_seconds)
        return 0
    if args.check:
        return check(args.delay_ms, args.count)
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
