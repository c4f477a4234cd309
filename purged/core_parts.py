"""From the frozen config to the core's parts: topology, engine policy, admission limits, per-node rates.

Pure (no I/O): the daemon builds its engine and admission from these at start and again on SIGHUP, so a start
and a reload can never read the config differently.
"""

from __future__ import annotations

from .config import Config
from .core.admission import URLRules
from .core.engine import Policy
from .core.topology import DatacenterSpec, TierSpec, Topology


def build_topology(config: Config) -> Topology:
    return Topology(
        [
            DatacenterSpec(
                dc.name, dc.hosts, tuple(TierSpec(t.name, t.delay, tuple(str(a) for a in t.nodes)) for t in dc.tiers)
            )
            for dc in config.datacenters
        ]
    )


def build_policy(config: Config) -> Policy:
    s, lim = config.sender, config.limits
    return Policy(
        retry_initial=s.retry_initial,
        retry_max=s.retry_max,
        down_after=s.down_after,
        poison_after=s.poison_after,
        dedup_window=config.dedup.window,
        linger=config.dedup.linger,
        max_lag=lim.max_lag,
        max_age=lim.max_age,
        recent_batches=lim.recent_batches,
    )


def admission_limits(config: Config) -> dict:
    lim = config.limits
    return {
        "client_rate": lim.client_rate,
        "client_burst": lim.client_burst,
        "max_pending": lim.max_pending,
        "max_pending_bytes": lim.max_pending_bytes,
        "rules": URLRules(max_length=lim.max_url_length, max_request_bytes=lim.max_request_bytes),
    }


def node_rates(config: Config) -> dict[str, tuple[float, float]]:
    return {str(a): dc.node_rate(t) for dc in config.datacenters for t in dc.tiers for a in t.nodes}
