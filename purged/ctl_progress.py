"""purgectl's displays: aligned tables (:func:`print_table`), and the display while it waits for its batches:
per data centre, done (node, batch) pairs over the total.

Two displays with one interface, ``update(counts)`` and ``close()``, where ``counts`` maps each data centre to
``(done, total)``: ``total`` is the sum over the batches of the data centre's nodes, ``done`` how many of those
(node, batch) pairs are done. :class:`BarDisplay` draws a ``rich`` progress bar per data centre (for a terminal);
:class:`LineDisplay` prints one line per data centre when it completes (for logs and pipes). The caller prints
the final summary.
"""

from __future__ import annotations

import sys
from typing import TextIO

Counts = dict[str, tuple[int, int]]


class LineDisplay:
    """Plain lines: ``eqiad: done (2 nodes x 20 batches)`` once per data centre, as it completes."""

    def __init__(self, batches: int, out: TextIO | None = None):
        self.batches = batches
        self.out = out or sys.stdout
        self._reported: set[str] = set()

    def update(self, counts: Counts) -> None:
        for dc, (done, total) in counts.items():
            if dc not in self._reported and total and done >= total:
                self._reported.add(dc)
                nodes = total // self.batches if self.batches else total
                print(f"{dc}: done ({nodes} nodes x {self.batches} batches)", file=self.out, flush=True)

    def close(self) -> None:
        pass


class BarDisplay:
    """One ``rich`` progress bar per data centre: done (node, batch) pairs over the total, with elapsed time."""

    def __init__(self, batches: int, out: TextIO | None = None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.batches = batches
        self._progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("node-batches"),
            TimeElapsedColumn(),
            console=Console(file=out or sys.stdout),
        )
        self._tasks: dict[str, object] = {}
        self._progress.start()

    def update(self, counts: Counts) -> None:
        for dc, (done, total) in counts.items():
            task = self._tasks.get(dc)
            if task is None:
                task = self._tasks[dc] = self._progress.add_task(dc, total=total)
            self._progress.update(task, completed=done, total=total)

    def close(self) -> None:
        self._progress.stop()


def make_display(batches: int, out: TextIO | None = None) -> LineDisplay | BarDisplay:
    """Bars when ``out`` (default stdout) is a terminal, plain lines otherwise."""
    out = out or sys.stdout
    isatty = getattr(out, "isatty", None)
    return BarDisplay(batches, out) if isatty is not None and isatty() else LineDisplay(batches, out)


def totals(statuses: dict[str, dict]) -> Counts:
    """Sum ``GET /v1/purge/{id}`` answers (batch id -> answer) into ``{dc: (done, total)}``."""
    counts: dict[str, list[int]] = {}
    for status in statuses.values():
        for dc, tiers in status.get("datacenters", {}).items():
            pair = counts.setdefault(dc, [0, 0])
            for tier in tiers.values():
                pair[0] += tier.get("done", 0)
                pair[1] += tier.get("nodes", 0)
    return {dc: (done, total) for dc, (done, total) in counts.items()}


def print_table(header: list[str], rows: list[list[str]], left: int, out: TextIO | None = None) -> None:
    """Print ``rows`` under ``header`` in aligned columns: the first ``left`` columns (names) left-aligned, the
    rest (numbers) right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        print("  ".join(cells).rstrip(), file=out or sys.stdout)
