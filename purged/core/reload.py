"""Core layer: apply a reloaded configuration (topology, rates, policy) to a running :class:`Engine`.

Nothing accepted is lost and nothing delivered is sent again: a node that stays keeps its cursor, in-flight
set, retries and counters untouched, whatever else changes; a new node starts at the log head (it owes
nothing accepted before it existed); a removed node's backlog is dropped and counted in the report. Tier gates
are rebuilt from the nodes' positions, keeping what a surviving tier had already opened. When the data centres
or their host patterns change, the entries still held are routed again with the new patterns.

Sans-IO like the engine: time is an argument; the caller stops a removed node's sender before calling this.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cursor import NodeCursor
from .engine import Engine, Node, Policy
from .lane import Lane, TierGate
from .limits import DedupWindow, TokenBucket
from .topology import Topology


@dataclass
class ReloadReport:
    added: list[str] = field(default_factory=list)
    removed: dict[str, int] = field(default_factory=dict)  # node -> purges dropped from its backlog
    removed_place: dict[str, tuple[str, str]] = field(default_factory=dict)  # node -> (dc, tier) it was in
    moved: list[str] = field(default_factory=list)  # nodes now in another data centre or tier
    rerouted: bool = False  # entries held were routed again (data centres or host patterns changed)



def reconfigure(
    engine: Engine,
    topology: Topology,
    policy: Policy,
    rates: dict[str, tuple[float, float]],
    now: float,
) -> ReloadReport:
    """Make ``engine`` run ``topology`` with ``policy`` and node ``rates`` (``{node: (rate, burst)}``)."""
    old_topology, old_policy = engine.topology, engine.policy
    old_specs, new_specs = old_topology.nodes, topology.nodes
    report = ReloadReport()
    for name, spec in old_specs.items():
        if name not in new_specs:
            report.removed[name] = engine.remove_node(name)
            report.removed_place[name] = (spec.dc, spec.tier)
    report.added = [name for name in new_specs if name not in old_specs]
    report.moved = [
        name
        for name, spec in new_specs.items()
        if name in old_specs and (old_specs[name].dc, old_specs[name].tier) != (spec.dc, spec.tier)
    ]
    routes = [(dc.name, dc.hosts) for dc in topology.datacenters]
    report.rerouted = routes != [(dc.name, dc.hosts) for dc in old_topology.datacenters] or any(
        old_specs[name].dc_index != new_specs[name].dc_index for name in report.moved
    )
    old_dc_names = [dc.name for dc in old_topology.datacenters]
    engine.topology = topology

    for name, spec in new_specs.items():
        rate, burst = rates.get(name, (0.0, 0.0))
        node = engine.nodes.get(name)
        if node is None:
            engine.nodes[name] = Node(name, spec.dc_index, spec.tier_index, TokenBucket(rate, burst or rate, now),
                                      policy.dedup_window)
            continue
        node.dc_index, node.tier_index, node.dc_bit = spec.dc_index, spec.tier_index, 1 << spec.dc_index
        if (node.bucket.rate, node.bucket.burst) != (rate, max(burst or rate, 1.0)):
            node.bucket = TokenBucket(rate, burst or rate, now)
        if policy.dedup_window != old_policy.dedup_window:
            # Forgetting what was sent recently can only make a purge go out sooner, never suppress one.
            node.dedup = DedupWindow(policy.dedup_window) if policy.dedup_window > 0 else None

    for lane in engine.lanes:
        _rebuild_lane(lane, topology, old_dc_names, report, now)

    engine.set_policy(policy, now)
    return report


def _rebuild_lane(
    lane: Lane, topology: Topology, old_dc_names: list[str], report: ReloadReport, now: float
) -> None:
    old_gates = {
        (old_dc_names[di], gate.name): gate for di, gates in enumerate(lane.tiers) for gate in gates
    }
    lane.place = {
        name: (di, ti)
        for di, dc in enumerate(topology.datacenters)
        for ti, tier in enumerate(dc.tiers)
        for name in tier.nodes
    }
    head = lane.log.head
    for name in report.added:
        lane.cursors[name] = NodeCursor(head)
    if report.rerouted:
        _reroute(lane, topology)
    else:
        for name in report.added:  # at the head: every entry so far counts as read (not owed)
            lane.cursors[name].matched = lane.dc_appended[lane.place[name][0]]

    tiers: list[list[TierGate]] = []
    for dc in topology.datacenters:
        gates = []
        for ti, spec in enumerate(dc.tiers):
            gate = TierGate(spec.name, spec.delay, list(spec.nodes))
            position = min(lane.cursors[n].position for n in spec.nodes)
            gate.position = position
            old = old_gates.get((dc.name, spec.name))
            if old is None:
                gate.gate = position  # a new tier: nothing of it to wait for below its nodes' positions
            else:
                gate.gate = min(old.gate, position)
                gate.marks = deque(m for m in old.marks if gate.gate < m[0] <= position)
                opened = gate.marks[-1][0] if gate.marks else gate.gate
                if position > opened:  # e.g. its slowest node was removed: the next tier's delay starts now
                    if ti + 1 < len(dc.tiers) and dc.tiers[ti + 1].delay > 0:
                        gate.marks.append((position, now))
                    else:
                        gate.gate = position
                        gate.marks.clear()
            gates.append(gate)
        tiers.append(gates)
    lane.tiers = tiers


def _reroute(lane: Lane, topology: Topology) -> None:
    """Route the held entries with the new data centres and recount, per data centre, what each node owes.

    ``backlog = dc_appended - matched + unfinished`` only needs the difference to be the entries at or past the
    node's cursor meant for its data centre, so both are recounted over the held entries alone.
    """
    log = lane.log
    log.remask(topology.target_mask)
    _, _, masks, off = log.columns()
    ndcs = len(topology.datacenters)
    counts = [0] * ndcs
    by_cursor = sorted(lane.cursors.items(), key=lambda kv: kv[1].cursor)
    k = 0
    for seq in range(log.base, log.head):
        while k < len(by_cursor) and by_cursor[k][1].cursor <= seq:
            name, cur = by_cursor[k]
            cur.matched = counts[lane.place[name][0]]
            k += 1
        mask = masks[seq + off]
        for di in range(ndcs):
            if mask >> di & 1:
                counts[di] += 1
    for name, cur in by_cursor[k:]:
        cur.matched = counts[lane.place[name][0]]
    lane.dc_appended = counts
