"""The conservation oracle: did every accepted purge reach every node it was meant for?

Inputs, all from outside purged's own bookkeeping where possible:

- ``Ledger``: each URL the API accepted, with the wall-clock time the request was *sent* (a lower bound
  on its acceptance; guarantee 1 wants a PURGE issued after the request arrived) and answered. URLs the
  answer listed as rejected (by index) are left out.
- per node, what the edge itself logged: ``(time, host, url)`` records (``varnish.VarnishNode.purges()``,
  ``ats.AtsNode.purges()``; anything with ``.time``, ``.host``, ``.url``).
- purged's ``/healthz`` (per-node backlog) and ``/metrics`` text (per-node named drop counters:
  ``purged_node_dropped_total{reason=...}`` and ``purged_node_errors_total``, purges given up on).

The check is by sets, not counts (coalescing merges purges, resends repeat them): for each node, every
accepted (host, path) routed to it (the DC's ``hosts`` globs) must appear in the node's log at or after its
acceptance. What does not is *missing*; missing purges are tolerated only up to what purged owns up to for
that node: its backlog (still pending) plus its named drops. Anything beyond that is *lost*. Repeats (a URL
logged more than once by a node) are reported, never failed: they are what at-least-once costs.

``tier_order`` checks guarantee 3 from the edges' logs: every frontend PURGE of a URL comes at least
``delay`` after a PURGE of it on every backend node of that DC, and for every acceptance the first
frontend PURGE after it has a backend PURGE between the two.
"""

from __future__ import annotations

import bisect
import fnmatch
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

#: Log timestamps: Varnish has microseconds, ATS truncates to milliseconds.
CLOCK_SLACK = 0.002

Key = tuple[str, str]  # (host lower-cased, path with query)


class Record(Protocol):
    time: float
    host: str
    url: str


def split_url(url: str) -> Key:
    """``https://Host/p?q`` or ``//host/p?q`` -> ("host", "/p?q"), as purged sends it (Host header, target)."""
    parts = urlsplit(url if "//" in url[:8] else "//" + url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host = parts.hostname or ""
    return host.lower(), path


@dataclass
class Ledger:
    """Every accepted URL with when its request was sent (and answered)."""

    accepted: list[tuple[Key, float, float]] = field(default_factory=list)  # (key, sent_at, answered_at)

    def add(self, urls: list[str], sent_at: float, answer: Mapping[str, Any] | None = None) -> int:
        """Record a batch the API answered 2xx; ``answer``'s ``rejected`` indexes are left out. Returns count."""
        answered_at = time.time()
        rejected = {r["index"] for r in (answer or {}).get("rejected", []) if "index" in r}
        n = 0
        for i, url in enumerate(urls):
            if i not in rejected:
                self.accepted.append((split_url(url), sent_at, answered_at))
                n += 1
        return n

    def keys(self) -> set[Key]:
        return {k for k, _, _ in self.accepted}


def routes(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """node address -> {"dc", "tier" (index), "hosts" (globs or None), "delay"} from a purged config mapping."""
    out = {}
    for dc, spec in config["datacenters"].items():
        hosts = spec.get("hosts")
        for t, tier in enumerate(spec["tiers"]):
            for node in tier["nodes"]:
                out[node] = {"dc": dc, "tier": t, "hosts": hosts, "delay": float(tier.get("delay", 0) or 0)}
    return out


def serves(hosts: list[str] | None, host: str) -> bool:
    return hosts is None or any(fnmatch.fnmatchcase(host.lower(), p.lower()) for p in hosts)


def node_drops(metrics_text: str) -> dict[str, dict[str, float]]:
    """node -> {reason: count} from purged_node_dropped_total and purged_node_errors_total ("gave_up")."""
    drops: dict[str, dict[str, float]] = defaultdict(dict)
    for fam in text_string_to_metric_families(metrics_text):
        for s in fam.samples:
            if s.name == "purged_node_dropped_total" and s.value:
                drops[s.labels["node"]][s.labels["reason"]] = s.value
            elif s.name == "purged_node_errors_total" and s.value:
                drops[s.labels["node"]]["gave_up"] = s.value
    return dict(drops)


@dataclass
class NodeReport:
    node: str
    expected: int  # distinct URLs accepted for this node
    delivered: int  # of those, logged by the node after their acceptance
    missing: set[Key]  # accepted, not (yet) logged after acceptance
    backlog: int  # what purged says the node still owes
    drops: dict[str, float]  # purged's named drops for the node
    repeats: dict[Key, int]  # URLs the node logged more than once, with the count
    unexpected: set[Key]  # logged by the node but never accepted for it (e.g. another DC's host)

    @property
    def lost(self) -> int:
        """Missing purges that neither the backlog nor a named drop accounts for."""
        return max(0, len(self.missing) - self.backlog - int(sum(self.drops.values())))

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not self.unexpected

    def summary(self) -> str:
        sample = sorted(self.missing)[:5]
        return (
            f"{self.node}: expected {self.expected}, delivered {self.delivered}, missing {len(self.missing)} "
            f"(backlog {self.backlog}, drops {self.drops or 0}) -> lost {self.lost}; "
            f"repeated {len(self.repeats)} URLs; unexpected {len(self.unexpected)}"
            + (f"; e.g. missing {sample}" if sample else "")
        )


@dataclass
class Report:
    nodes: dict[str, NodeReport]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.nodes.values())

    def __str__(self) -> str:
        return "\n".join(r.summary() for r in self.nodes.values())

    def assert_ok(self) -> None:
        assert self.ok, f"oracle: purges lost\n{self}"

    def assert_complete(self) -> None:
        """Stronger: nothing missing at all (nothing pending, nothing dropped)."""
        assert self.ok and not any(r.missing for r in self.nodes.values()), f"oracle: not complete\n{self}"


def check(
    ledger: Ledger,
    config: Mapping[str, Any],
    logs: Mapping[str, Iterable[Record]],
    health: Mapping[str, Any] | None = None,
    metrics_text: str = "",
) -> Report:
    """Conservation per node. ``logs`` is keyed by the node address as configured in purged."""
    route = routes(config)
    backlog = {n: int(s["backlog"]) for n, s in ((health or {}).get("nodes") or {}).items()}
    drops = node_drops(metrics_text) if metrics_text else {}
    reports = {}
    for node, info in route.items():
        times = defaultdict(list)
        for rec in logs.get(node, ()):
            times[(rec.host.lower(), rec.url)].append(rec.time)
        for ts in times.values():
            ts.sort()
        meant = [(k, sent) for k, sent, _ in ledger.accepted if serves(info["hosts"], k[0])]
        missing = set()
        for key, sent in meant:
            ts = times.get(key, [])
            if not ts or ts[-1] < sent - CLOCK_SLACK:
                missing.add(key)
        meant_keys = {k for k, _ in meant}
        reports[node] = NodeReport(
            node=node,
            expected=len(meant_keys),
            delivered=len(meant_keys - missing),
            missing=missing,
            backlog=backlog.get(node, 0),
            drops=drops.get(node, {}),
            repeats={k: len(ts) for k, ts in times.items() if len(ts) > 1},
            unexpected={k for k in times if not serves(info["hosts"], k[0]) or k not in meant_keys},
        )
    return Report(reports)


def tier_order(
    ledger: Ledger, config: Mapping[str, Any], logs: Mapping[str, Iterable[Record]]
) -> list[str]:
    """Violations of guarantee 3 found in the edges' logs (empty: tier order held)."""
    route = routes(config)
    times: dict[str, dict[Key, list[float]]] = {}
    for node in route:
        per: dict[Key, list[float]] = defaultdict(list)
        for rec in logs.get(node, ()):
            per[(rec.host.lower(), rec.url)].append(rec.time)
        for ts in per.values():
            ts.sort()
        times[node] = per
    violations = []
    for node, info in route.items():
        if info["tier"] == 0:
            continue
        earlier = [n for n, i in route.items() if i["dc"] == info["dc"] and i["tier"] == info["tier"] - 1]
        delay = info["delay"]
        # Every frontend PURGE has, on every backend node, a PURGE of the URL at least `delay` before it.
        for key, ts in times[node].items():
            for t in ts:
                for b in earlier:
                    bts = times[b].get(key, [])
                    if not bts or bts[0] > t - delay + CLOCK_SLACK:
                        first = f"{t - bts[0]:+.3f}s" if bts else "never"
                        violations.append(f"{node} {key} at {t:.3f}: backend {b} first purged it {first} before")
        # For every acceptance: the first frontend PURGE after it has a backend PURGE in between.
        for key, sent, _ in ledger.accepted:
            if not serves(info["hosts"], key[0]):
                continue
            ts = times[node].get(key, [])
            i = bisect.bisect_left(ts, sent - CLOCK_SLACK)
            if i == len(ts):
                continue  # not delivered: conservation's business
            t = ts[i]
            for b in earlier:
                bts = times[b].get(key, [])
                j = bisect.bisect_left(bts, sent - CLOCK_SLACK)
                if j == len(bts) or bts[j] > t - delay + CLOCK_SLACK:
                    violations.append(f"{node} {key}: frontend PURGE at {t:.3f} without backend {b} in between")
    return violations


def repeat_histogram(report: Report) -> dict[str, Counter[int]]:
    """node -> {times logged: how many URLs}, for the scenario table."""
    return {n: Counter(r.repeats.values()) for n, r in report.nodes.items()}


def metric_sum(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for fam in text_string_to_metric_families(metrics_text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
