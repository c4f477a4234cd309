"""Core layer: read-only views of the engine for operators: a batch's status, a node's state, statistics.

Pure reads (a scrape or a status request changes nothing). Plain dataclasses and numbers; JSON shapes and
rounding are the API's (:mod:`purged.net.http_api`), metric families the collector's (:mod:`purged.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .batches import BatchStatus, TierProgress
from .engine import LANES, Engine


@dataclass(frozen=True, slots=True)
class NodeState:
    dc: str
    tier: str
    state: str  # up, down, out_of_sync
    backlog: int
    inflight: int
    retrying: int
    oldest_pending_seconds: float


def oldest_pending_age(engine: Engine, name: str, now: float) -> float:
    """Age of the oldest purge this node still owes (approximate: the entry at its position per lane)."""
    age = 0.0
    for lane in engine.lanes:
        position = lane.cursors[name].position
        if lane.backlog(name) and position < lane.log.head:
            age = max(age, now - lane.log.get(max(position, lane.log.base)).accepted_at)
    return age


def batch_status(engine: Engine, batch_id: str) -> BatchStatus | None:
    """Per data centre and tier, how many nodes are done with the batch (None: unknown or forgotten)."""
    batch = engine.batches.get(batch_id)
    if batch is None:
        return None
    lane = engine.lanes[batch.lane]
    dcs: dict[str, dict[str, TierProgress]] = {}
    done_all = True
    for di, dc in enumerate(engine.topology.datacenters):
        tiers = {}
        for tier in lane.tiers[di]:
            done = sum(1 for n in tier.nodes if lane.cursors[n].position >= batch.hi)
            done_all &= done == len(tier.nodes)
            tiers[tier.name] = TierProgress(len(tier.nodes), done)
        dcs[dc.name] = tiers
    return BatchStatus(batch_id, done_all, batch.accepted, LANES[batch.lane], dcs)


def node_state(engine: Engine, name: str, now: float) -> NodeState:
    node = engine.nodes[name]
    dc = engine.topology.datacenters[node.dc_index]
    return NodeState(
        dc.name,
        dc.tiers[node.tier_index].name,
        "down" if node.down else "out_of_sync" if node.out_of_sync else "up",
        engine.backlog(name),
        len(node.inflight),
        len(node.retries),
        oldest_pending_age(engine, name, now),
    )


def statistics(engine: Engine, now: float) -> dict:
    """Plain numbers for the metrics collector and /healthz."""
    return {
        "log_entries": sum(len(lane.log) for lane in engine.lanes),
        "unique_pending": engine.unique_pending(),
        "batches": engine.batches.count,
        "sources": engine.sources,
        "nodes": {name: node_state(engine, name, now) for name in engine.nodes},
        "node_stats": {name: node.stats for name, node in engine.nodes.items()},
        "latency": engine.latency,
    }
