"""Where a py-spy profile of the daemon went: the samples of a raw (collapsed stacks) file by category of
purged's work, then the functions with the most samples of their own. Used by ``sender_bench.py --profile
py-spy``; on its own: ``.venv/bin/python bench/profile_summary.py FILE``.

py-spy (without ``--native``) shows a C call as the Python line that made it: the sender's ``send`` and ``recv``
on its raw socket are samples of ``Pipeline._fill`` and ``Pipeline._reader`` themselves, and the kernel time of
a busy 2-core machine (a ``send`` wakes the Varnish thread that receives it) is counted there too.
"""

from __future__ import annotations

import sys

CATEGORIES = [  # (label, test on the stack's frames, leaf last); the first that matches counts
    ("epoll wait (idle or about to be)", lambda fr: "get_events" in fr[-1]),
    ("ingest: HTTP API, JSON, URL validation, log append",
     lambda fr: any("_serve_connection" in f or "API." in f for f in fr)),
    ("sender: response parsing", lambda fr: any("ResponseParser" in f for f in fr)),
    ("sender: acks (engine, cursors, trim)", lambda fr: any(f.startswith(("Acks.", "Driver.ack", "Engine.ack"))
                                                            for f in fr)),
    ("sender: take (engine, lanes)", lambda fr: any(f.startswith(("Driver.take", "Engine.take", "Lane.read"))
                                                    for f in fr)),
    ("sender: encoding", lambda fr: any("encode_purge" in f for f in fr)),
    ("read pause and wake-ups: timers, batch status, wait_for_work",
     lambda fr: any(k in f for f in fr for k in ("Pacer.", "run_timers", "batch_status", "wait_for_work",
                                                  "changed"))),
    ("sender: the read loop and its socket calls (Pipeline's own samples)", lambda fr: fr[-1].startswith("Pipeline.")),
    ("other (trio scheduler, GC...)", lambda fr: True),
]


def summarize(path: str, top: int = 20) -> str:
    """The categories' shares of all samples (and of those outside epoll), then the top functions (self)."""
    self_counts: dict[str, int] = {}
    cats = {label: 0 for label, _ in CATEGORIES}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            total += n
            frames = stack.split(";")
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
            for label, test in CATEGORIES:
                if test(frames):
                    cats[label] += n
                    break
    if not total:
        return "  no samples"
    waiting = sum(v for k, v in cats.items() if k.startswith("epoll"))
    busy = max(total - waiting, 1)
    lines = [f"  {total} samples; by category (% of all samples / % of samples outside epoll):"]
    for label, n in cats.items():
        share = "" if label.startswith("epoll") else f" / {100 * n / busy:5.1f}%"
        lines.append(f"    {100 * n / total:5.1f}%{share}  {label}")
    lines.append("  top functions (self):")
    for fr, n in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / total:5.1f}%  {fr}")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"== {arg}")
        print(summarize(arg))
