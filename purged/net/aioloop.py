"""Adapter: one asyncio event loop in a thread of its own, for an asyncio library (nats-py) in a trio daemon.

Trio submits coroutines with ``asyncio.run_coroutine_threadsafe`` and waits for the result on a
:class:`trio.Event` that the future's done-callback sets through the trio token: no worker thread per call, and
cancelling the trio side cancels the asyncio task. :class:`purged.net.bus.NatsBus` owns one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Coroutine
from typing import Any

import trio

log = logging.getLogger("purged.bus")


class AsyncioThread:
    """One asyncio event loop in a daemon thread; trio awaits coroutines run there."""

    def __init__(self, name: str = "purged-nats"):
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # A plain selector loop, not asyncio.new_event_loop(): that goes through the global policy, which
        # trio-asyncio (if anything imported it) replaces with one that refuses to run beside trio.
        loop = self.loop = asyncio.SelectorEventLoop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            try:
                loop.run_forever()
            finally:
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                with contextlib.suppress(Exception):
                    loop.run_until_complete(asyncio.sleep(0))
                loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        started.wait(5)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Run ``coro`` on the loop without waiting (acks); its exception is only logged at debug level."""
        assert self.loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        fut.add_done_callback(_log_failure)
        return fut

    async def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the loop and return its result (or raise its exception) in trio."""
        assert self.loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: concurrent.futures.Future) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        fut.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            fut.cancel()
            raise
        return fut.result()

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)


def _log_failure(fut: concurrent.futures.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("bus: background call failed: %r", fut.exception())
