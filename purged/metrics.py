"""Metrics: a Prometheus collector that turns ``statistics()`` of the core and adapters into metric families at
scrape time. Nothing is counted twice and the hot path pays nothing for metrics: the core keeps plain integers.

Names continue Wikimedia's Go purged where one exists (``purged_http_requests_total``, ``purged_backlog``,
``purged_tcp_errors_total``); docs/metrics.md lists every family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .core.engine import Engine
from .core.status import statistics

NODE_LABELS = ["dc", "layer", "node"]


class EngineCollector(Collector):
    def __init__(
        self,
        engine_fn: Callable[[], Engine],
        now: Callable[[], float],
        removed: Callable[[], dict[tuple[str, str, str], int]] = dict,
    ):
        self._engine = engine_fn  # a callable: a config reload may swap the engine's parts
        self._now = now
        self._removed = removed  # (dc, layer, node) -> backlog dropped when a reload removed the node

    def collect(self) -> Iterator[Any]:
        engine = self._engine()
        stats = statistics(engine, self._now())
        nodes = stats["nodes"]

        def node_family(cls: type, name: str, doc: str, value: Callable[[str, Any], float]) -> Any:
            fam = cls(name, doc, labels=NODE_LABELS)
            for node, st in nodes.items():
                fam.add_metric([st.dc, st.tier, node], value(node, st))
            return fam

        requests = CounterMetricFamily(
            "purged_http_requests", "PURGE responses from edge nodes, by status code", labels=["status", "layer", "dc"]
        )
        totals: dict[tuple[str, str, str], int] = {}
        tcp_errors: dict[str, int] = {}
        for node, ns in stats["node_stats"].items():
            st = nodes[node]
            for status, count in ns.responses.items():
                key = (str(status), st.tier, st.dc)
                totals[key] = totals.get(key, 0) + count
            for kind, count in ns.errors.items():
                tcp_errors[kind] = tcp_errors.get(kind, 0) + count
        for key, count in sorted(totals.items()):
            requests.add_metric(list(key), count)
        yield requests
        errors = CounterMetricFamily("purged_tcp_errors", "Connection failures to edge nodes, by type", labels=["type"])
        for kind, count in sorted(tcp_errors.items()):
            errors.add_metric([kind], count)
        yield errors
        node_errors = CounterMetricFamily(
            "purged_node_connection_errors", "Connection failures per node, by type", labels=NODE_LABELS + ["type"]
        )
        for node, ns in stats["node_stats"].items():
            for kind, count in sorted(ns.errors.items()):
                node_errors.add_metric([nodes[node].dc, nodes[node].tier, node, kind], count)
        yield node_errors
        ns_ = stats["node_stats"]
        yield node_family(GaugeMetricFamily, "purged_backlog", "Purges a node still owes", lambda n, s: s.backlog)
        yield node_family(
            GaugeMetricFamily,
            "purged_backlog_oldest_seconds",
            "Age of the oldest purge a node still owes",
            lambda n, s: s.oldest_pending_seconds,
        )
        yield node_family(GaugeMetricFamily, "purged_node_up", "1 while a node answers, 0 while marked down",
                          lambda n, s: 0 if s.state == "down" else 1)
        yield node_family(GaugeMetricFamily, "purged_inflight", "PURGEs sent and not answered yet",
                          lambda n, s: s.inflight)
        yield node_family(CounterMetricFamily, "purged_purges_sent", "PURGE requests written to a node",
                          lambda n, s: ns_[n].sent)
        yield node_family(CounterMetricFamily, "purged_retries", "PURGEs resent after a failure or a 5xx",
                          lambda n, s: ns_[n].retries)
        yield node_family(CounterMetricFamily, "purged_node_errors",
                          "PURGEs answered with an error status that is not retried (4xx other than 404)",
                          lambda n, s: ns_[n].gave_up)
        yield node_family(CounterMetricFamily, "purged_node_deferred",
                          "Purges held back to the end of the dedup window", lambda n, s: ns_[n].deferred)
        yield node_family(CounterMetricFamily, "purged_node_rate_limited",
                          "Times a node had work but no rate-limit tokens", lambda n, s: ns_[n].rate_limited)
        yield node_family(CounterMetricFamily, "purged_node_resyncs",
                          "Times a node was declared out of sync (max_lag)", lambda n, s: ns_[n].resyncs)
        node_dropped = CounterMetricFamily(
            "purged_node_dropped", "Purges dropped for a node by a policy (max_lag, max_age, poison, node_removed)",
            labels=NODE_LABELS + ["reason"],
        )
        for node, ns in stats["node_stats"].items():
            for reason, count in sorted(ns.dropped.items()):
                node_dropped.add_metric([nodes[node].dc, nodes[node].tier, node, reason], count)
        for (dc, layer, node), count in sorted(self._removed().items()):
            node_dropped.add_metric([dc, layer, node, "node_removed"], count)
        yield node_dropped

        fams = {
            "received": CounterMetricFamily("purged_purges_received", "Purges received, by source", labels=["source"]),
            "accepted": CounterMetricFamily("purged_purges_accepted", "Purges accepted, by source", labels=["source"]),
            "coalesced": CounterMetricFamily(
                "purged_purges_coalesced", "Purges merged into an unsent one for the same URL", labels=["source"]
            ),
        }
        rejected = CounterMetricFamily(
            "purged_purges_rejected", "Purges refused at ingest, by reason", labels=["source", "reason"]
        )
        for source, ss in sorted(stats["sources"].items()):
            for key, fam in fams.items():
                fam.add_metric([source], getattr(ss, key))
            for reason, count in sorted(ss.rejected.items()):
                rejected.add_metric([source, reason], count)
        yield from fams.values()
        yield rejected

        latency = HistogramMetricFamily(
            "purged_purge_latency_seconds", "From accepting a purge to a node acknowledging it", labels=["dc", "layer"]
        )
        for (dc, layer), hist in sorted(stats["latency"].items()):
            buckets = [("+Inf" if b == float("inf") else repr(b), n) for b, n in hist.cumulative()]
            latency.add_metric([dc, layer], buckets, hist.total)
        yield latency
        yield GaugeMetricFamily("purged_log_entries", "Entries held in the purge log", value=stats["log_entries"])
        yield GaugeMetricFamily(
            "purged_unique_pending", "Unique URLs some node has not been sent yet", value=stats["unique_pending"]
        )
        yield CounterMetricFamily("purged_batches", "Batches accepted", value=stats["batches"])


class MulticastCollector(Collector):
    """Multicast listeners' counters (``MulticastStats.statistics()``), labelled by ``group`` (``addr:port``).
    Names continue Go purged's ``purged_htcp_packets_total{state}`` and ``purged_udp_bytes_read_total``;
    docs/wire.md maps each statistic to its family."""

    def __init__(self, stats_fn: Callable[[], dict]):
        self._stats = stats_fn  # group -> MulticastStats

    def collect(self) -> Iterator[Any]:
        groups = {group: st.statistics() for group, st in sorted(self._stats().items())}
        if not groups:
            return

        def family(cls: type, name: str, doc: str, extra: list[str] | None = None) -> Any:
            return cls(name, doc, labels=["group"] + (extra or []))

        packets = family(CounterMetricFamily, "purged_htcp_packets", "Datagrams received, by state", ["state"])
        read = family(CounterMetricFamily, "purged_udp_bytes_read", "Bytes of datagrams read")
        urls = family(CounterMetricFamily, "purged_multicast_urls", "Purges from datagrams handed to the log")
        dropped = family(CounterMetricFamily, "purged_multicast_dropped", "Dropped, by reason", ["reason"])
        malformed = family(CounterMetricFamily, "purged_multicast_malformed", "Undecodable datagrams", ["reason"])
        rcvbuf = family(GaugeMetricFamily, "purged_udp_receive_buffer_bytes", "SO_RCVBUF as the kernel granted it")
        seq = family(CounterMetricFamily, "purged_multicast_seq", "Sequence number accounting per source", ["kind"])
        for group, st in groups.items():
            for key, value in st.items():
                kind, _, rest = key.partition("_")
                if kind == "packets":
                    packets.add_metric([group, rest], value)
                elif kind == "drops":
                    dropped.add_metric([group, rest], value)
                elif kind == "malformed":
                    malformed.add_metric([group, rest], value)
                elif kind == "loss" and rest in ("lost", "duplicates", "reordered", "resets", "received"):
                    seq.add_metric([group, rest], value)
            read.add_metric([group], st["bytes_read"])
            urls.add_metric([group], st["urls_accepted"])
            rcvbuf.add_metric([group], st["rcvbuf_bytes"])
        yield from (packets, read, urls, dropped, malformed, rcvbuf, seq)


class JournalCollector(Collector):
    """Metric families for the journal (docs/durability.md) and config reloads."""

    def __init__(self, journal: Callable[[], Any], reloads: Callable[[], dict[str, int]]):
        self._journal, self._reloads = journal, reloads  # the journal may be None (no state_dir)

    def collect(self) -> Iterator[Any]:
        reloads = CounterMetricFamily("purged_config_reloads", "Config reloads (SIGHUP) by result", labels=["result"])
        for result, count in sorted(self._reloads().items()):
            reloads.add_metric([result], count)
        yield reloads
        journal = self._journal()
        if journal is None:
            return
        s = journal.stats
        for name, doc, value in (
            ("bytes_written", "Bytes appended to journal segments", s.bytes_written),
            ("entries_written", "Purge log entries written to the journal", s.entries_written),
            ("writes", "Journal write batches (group commits)", s.writes),
            ("fsyncs", "fsync calls on journal segments", s.fsyncs),
            ("sync_seconds", "Time spent in fsync", s.sync_seconds),
            ("checkpoints", "Node position checkpoints written", s.checkpoints),
            ("segments_deleted", "Segments deleted once every node had their entries", s.segments_deleted),
            ("truncated_bytes", "Bytes of torn or corrupt segment tails truncated at start", s.truncated_bytes),
            ("lost_entries", "Entries missing from a corrupt journal at start", s.lost),
        ):
            yield CounterMetricFamily(f"purged_journal_{name}", doc, value=value)
        errors = CounterMetricFamily("purged_journal_write_errors", "Failed journal writes", labels=["reason"])
        for reason, count in sorted(s.write_errors.items()):
            errors.add_metric([reason], count)
        yield errors
        truncated = CounterMetricFamily(
            "purged_journal_truncated", "Torn or corrupt segment tails found at start, by reason", labels=["reason"]
        )
        for reason, count in sorted(s.truncated.items()):
            truncated.add_metric([reason], count)
        yield truncated
        yield GaugeMetricFamily("purged_journal_writable", "1 while the journal accepts writes, 0 after an error",
                                value=0 if journal.error else 1)
        yield GaugeMetricFamily("purged_journal_replayed_entries", "Pending purges restored at start",
                                value=s.replayed)
        yield GaugeMetricFamily("purged_journal_replay_seconds", "How long the start-up replay took",
                                value=s.replay_seconds)
        yield GaugeMetricFamily("purged_journal_segments", "Segment files held", value=journal.segment_count)


class SenderCollector(Collector):
    """Per-node connection counters kept by the senders themselves (the engine never sees connections)."""

    def __init__(self, senders_fn: Callable[[], dict], engine_fn: Callable[[], Engine]):
        self._senders, self._engine = senders_fn, engine_fn

    def collect(self) -> Iterator[Any]:
        topo = self._engine().topology.nodes
        opened = CounterMetricFamily("purged_connections_opened", "TCP connections opened to a node", labels=NODE_LABELS)
        fallbacks = CounterMetricFamily(
            "purged_pipelining_fallbacks",
            "Times a node closed after one answer with more queued, so it gets one PURGE at a time",
            labels=NODE_LABELS,
        )
        window = GaugeMetricFamily("purged_sender_window", "PURGEs in flight allowed per connection", labels=NODE_LABELS)
        node_window = GaugeMetricFamily(
            "purged_node_window", "PURGEs in flight allowed to a node (adaptive, all its connections)",
            labels=NODE_LABELS,
        )
        for name, sender in sorted(self._senders().items()):
            spec = topo.get(name)
            if spec is None:
                continue
            labels = [spec.dc, spec.tier, name]
            opened.add_metric(labels, sender.connects)
            fallbacks.add_metric(labels, sender.pipelining_fallbacks)
            window.add_metric(labels, sender.window)
            node_window.add_metric(labels, sender.node_window)
        yield from (opened, fallbacks, window, node_window)


class APICollector(Collector):
    """The HTTP API's refusals: every answer >= 400 by status and reason (the ``error`` of its JSON body), so that
    401s from a stale token, 400s from a broken producer and 413s are visible without reading logs."""

    def __init__(self, refused: Callable[[], dict[tuple[int, str], int]]):
        self._refused = refused

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily("purged_api_refused", "API answers >= 400, by status and reason",
                                     labels=["status", "reason"])
        for (status, reason), count in sorted(self._refused().items()):
            family.add_metric([str(status), reason], count)
        yield family


class BusCollector(Collector):
    """A fleet member's bus counters (docs/fleet.md): publishes, consumption, redeliveries, the connection, and
    every daemon's consumer lag as of the last look at the stream (every few seconds)."""

    def __init__(self, fleet: Any):
        self._fleet = fleet  # purged.net.fleet.Fleet

    def collect(self) -> Iterator[Any]:
        fleet = self._fleet
        bus = fleet.bus
        s = bus.stats
        yield CounterMetricFamily("purged_bus_published_messages", "Messages stored by the stream (acked)",
                                  value=s.published_messages)
        yield CounterMetricFamily("purged_bus_published_urls", "Purges published to the stream", value=s.published_urls)
        failures = CounterMetricFamily("purged_bus_publish_failures",
                                       "Publishes that failed (the client got 503 bus_unavailable), by reason",
                                       labels=["reason"])
        for reason, count in sorted(s.publish_failures.items()):
            failures.add_metric([reason], count)
        yield failures
        hist = HistogramMetricFamily("purged_bus_publish_seconds",
                                     "From publishing a batch to the stream's ack (all its messages)")
        hist.add_metric([], [("+Inf" if b == float("inf") else repr(b), n) for b, n in s.publish_seconds.cumulative()],
                        s.publish_seconds.total)
        yield hist
        yield CounterMetricFamily("purged_bus_consumed_messages", "Messages delivered to this daemon's consumer",
                                  value=s.consumed_messages)
        yield CounterMetricFamily("purged_bus_consumed_urls", "Purges in the messages this daemon consumed",
                                  value=s.consumed_urls)
        yield CounterMetricFamily("purged_bus_redelivered", "Messages delivered again (at-least-once: not acked "
                                  "in time, or a restart)", value=s.redelivered)
        yield CounterMetricFamily("purged_bus_acked", "Messages acked once done on every local node", value=s.acked)
        bad = CounterMetricFamily("purged_bus_bad_messages", "Unreadable messages, terminated, by reason",
                                  labels=["reason"])
        for reason, count in sorted(s.bad_messages.items()):
            bad.add_metric([reason], count)
        yield bad
        yield GaugeMetricFamily("purged_bus_held_messages", "Messages consumed and not yet done on every local node",
                                value=len(fleet.held))
        yield GaugeMetricFamily("purged_bus_connected", "1 while connected to the bus with the stream set up",
                                value=1 if bus.connected else 0)
        yield CounterMetricFamily("purged_bus_disconnects", "Times the bus connection was lost", value=s.disconnects)
        lag = GaugeMetricFamily("purged_fleet_consumer_lag",
                                "Stream messages a daemon has not acked yet (last sequence minus its ack floor)",
                                labels=["daemon"])
        for daemon, value in sorted(fleet.lags().items()):
            lag.add_metric([daemon], value)
        yield lag
