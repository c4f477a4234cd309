"""Many simulated edge caches in one process: ``--ports N`` listeners answering PURGE like Varnish, cheaply.

``tests/stub_edge.py`` is the stub for fault injection (trio; it keeps every request it saw, with its headers);
this one is for load: one asyncio process serving N ports, counting requests per port and answering each
``200 Purged`` at once, in order, so pipelined requests are safe (a read holding 300 requests gets one write of
300 answers; a request split across reads waits for its end). It keeps no request, only counters, and for paths
under ``--group-prefix`` (``/fb/<run>/<batch>/<i>``: the bench's URLs), per group (the path up to its last
``/``, i.e. one posted batch) how many requests came and the ``time.monotonic()`` of the last one. The clock
is the machine's (shared by every namespace), so the bench compares it with the time its POST got its 2xx.

Control on stdin/stdout, one line each: the stub prints ``ready PORT,PORT,...`` once it listens; ``stats``
prints one JSON line ``{"ports": {port: count}, "groups": {group: [count, last]}, "total": n}``; ``quit`` or
end of input stops it (so it never outlives the bench). It also stops after ``--max-seconds``.

    python bench/fleet_edges.py --host 127.0.0.1 --ports 50      # then type: stats
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time

RESPONSE = b"HTTP/1.1 200 Purged\r\nServer: fleet-edges\r\nContent-Length: 0\r\n\r\n"
MAX_HEAD = 64 * 1024


class Edges:
    """The counters of every port of this process."""

    def __init__(self, group_prefix: bytes) -> None:
        self.per_port: dict[int, int] = {}
        self.groups: dict[bytes, list] = {}  # group -> [count, last arrival]
        self.group_prefix = group_prefix
        self.bad = 0

    def stats(self) -> dict:
        return {
            "ports": self.per_port,
            "groups": {k.decode("latin-1"): v for k, v in self.groups.items()},
            "total": sum(self.per_port.values()),
            "bad": self.bad,
        }


class EdgeProtocol(asyncio.Protocol):
    __slots__ = ("edges", "port", "buf", "transport")

    def __init__(self, edges: Edges, port: int) -> None:
        self.edges, self.port = edges, port
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf + data if self.buf else data
        pos, n = 0, 0
        edges, prefix, groups = self.edges, self.edges.group_prefix, self.edges.groups
        while True:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            line_end = buf.find(b"\r\n", pos)
            parts = buf[pos:line_end].split(b" ")
            if len(parts) != 3 or b"content-length:" in buf[line_end:end].lower():
                # The clients here send PURGE without a body; anything else is answered and the line closed.
                edges.bad += 1
                self.transport.write(RESPONSE * n + b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
                                     b"Content-Length: 0\r\n\r\n")
                edges.per_port[self.port] += n
                self.transport.close()
                self.buf = b""
                return
            path = parts[1]
            if path.startswith(prefix):
                key = path[: path.rfind(b"/")]
                g = groups.get(key)
                if g is None:
                    groups[key] = [1, now]
                else:
                    g[0] += 1
                    g[1] = now
            n += 1
            pos = end + 4
        self.buf = buf[pos:]
        if len(self.buf) > MAX_HEAD:
            self.transport.close()
            return
        if n:
            edges.per_port[self.port] += n
            self.transport.write(RESPONSE * n)


async def serve(host: str, ports: int, base_port: int, group_prefix: bytes, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    edges = Edges(group_prefix)
    servers = []
    for k in range(ports):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, base_port + k if base_port else 0))
        port = sock.getsockname()[1]
        edges.per_port[port] = 0
        servers.append(await loop.create_server(lambda p=port: EdgeProtocol(edges, p), sock=sock, backlog=1024))
    print("ready " + ",".join(str(p) for p in edges.per_port), flush=True)
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    pending = b""

    def on_stdin() -> None:
        nonlocal pending
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            return
        if not chunk:
            done.set()
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            cmd = line.strip()
            if cmd == b"stats":
                sys.stdout.write(json.dumps(edges.stats()) + "\n")
                sys.stdout.flush()
            elif cmd == b"quit":
                done.set()

    os.set_blocking(0, False)
    loop.add_reader(0, on_stdin)
    try:
        await asyncio.wait_for(done.wait(), timeout=max_seconds)
    except TimeoutError:
        pass
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ports", type=int, default=50)
    p.add_argument("--base-port", type=int, default=0, help="ports BASE..BASE+N-1 (default: ephemeral ones)")
    p.add_argument("--group-prefix", default="/fb/")
    p.add_argument("--max-seconds", type=float, default=3600.0)
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.ports, args.base_port, args.group_prefix.encode(), args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
