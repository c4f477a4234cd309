"""Trio adapter: the per-node PURGE sender, HTTP/1.1 pipelined over a few persistent connections.

One :class:`NodeSender` per edge node, so a slow or dead node only ever blocks its own tasks (guarantee 4).
Each connection keeps up to ``window`` PURGEs in flight, written in batches; responses come back in order and
are matched to a FIFO of log seqs. When a connection dies mid-pipeline the unanswered seqs go back to the
engine (resent on a new connection: a repeated PURGE is harmless); answered ones are never resent.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import trio

from ..core.window import WindowControl
from .pipeline import Pacer, Pipeline, SenderPort

if TYPE_CHECKING:
    from ..config import Address, Sender

log = logging.getLogger("purged.sender")


class NodeSender:
    def __init__(self, port: SenderPort, address: Address, cfg: Sender, *, pacer: Pacer | None = None):
        self.port = port
        self.pacer = pacer or Pacer()  # the daemon gives all its senders one: their read pauses end together
        self.name = str(address)
        self.address = address
        self.cfg = cfg
        self.control = self._control(cfg)
        self.no_pipelining = False  # the edge closes after each answer: one PURGE at a time, for good
        self.pipelining_fallbacks = 0
        self.connects = 0
        self.hand_parser = False  # llhttp refused a stream it could not hand over: the hand parser from now on

    @staticmethod
    def _control(cfg: Sender) -> WindowControl:
        # sender.window per connection is the start (and floor), sender.max_window per connection the cap.
        n = cfg.connections
        return WindowControl(cfg.window * n, cfg.max_window * n, now=trio.current_time())

    @property
    def window(self) -> int:
        """PURGEs in flight allowed per connection now (the node's adaptive window split over them)."""
        return 1 if self.no_pipelining else max(1, self.control.limit // self.cfg.connections)

    @property
    def node_window(self) -> int:
        return self.window * self.cfg.connections

    def reconfigure(self, cfg: Sender) -> None:
        """A reload: the window adapts again from the new start (a pipelining fallback stays)."""
        if (cfg.window, cfg.max_window, cfg.connections) != (self.cfg.window, self.cfg.max_window,
                                                            self.cfg.connections):
            self.control = self._control(cfg)
        self.cfg = cfg

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.cfg.connections):
                nursery.start_soon(self._connection_loop)
            task_status.started()

    async def _connection_loop(self) -> None:
        port, name = self.port, self.name
        while True:
            await port.wait_for_work(name)
            try:
                with trio.fail_after(self.cfg.connect_timeout):
                    stream = await trio.open_tcp_stream(self.address.host, self.address.port)
            except (OSError, trio.TooSlowError) as exc:
                port.fail(name, [], "connect")
                log.debug("%s: connect failed: %s", name, exc)
                await trio.sleep(port.reconnect_delay(name))
                continue
            self.connects += 1
            # The connection's own socket, non-blocking, without trio's stream around it: a read or a write
            # is tried first and waits only if the kernel has nothing (trio's socket calls add a scheduling
            # round to each, and the stream a conflict check).
            sock = socket.socket(fileno=stream.socket.detach())
            sock.setblocking(False)
            conn = Pipeline(self, sock)
            try:
                kind = await conn.run()
            except (OSError, trio.ClosedResourceError):
                kind = "reset"
            finally:
                trio.lowlevel.notify_closing(sock)
                sock.close()
            unanswered = conn.unanswered()
            if kind is None:
                port.requeue(name, unanswered)
            else:
                self.control.failed(trio.current_time())
                port.fail(name, unanswered, kind)
                log.info("%s: connection %s with %d unanswered; they will be resent", name, kind, len(unanswered))
                await trio.sleep(port.reconnect_delay(name))
