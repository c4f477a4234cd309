"""Core layer: data centres, tiers and nodes, and which data centres serve a host.

Built from plain values (the config layer passes them in) so the core stays free of config parsing.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class NodeSpec:
    """One edge cache node: ``name`` is its ``host:port`` address, unique across the topology."""

    name: str
    dc: str
    tier: str
    dc_index: int
    tier_index: int


@dataclass(frozen=True)
class TierSpec:
    name: str
    delay: float
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class DatacenterSpec:
    name: str
    hosts: tuple[str, ...]  # glob patterns, lower case; empty: every host
    tiers: tuple[TierSpec, ...]


class Topology:
    """The static shape of the fleet. Host routing answers with a bit mask of data centres (bit i = DC i)."""

    _CACHE_MAX = 65536

    def __init__(self, datacenters: list[DatacenterSpec] | tuple[DatacenterSpec, ...]):
        self.datacenters = tuple(datacenters)
        self.nodes: dict[str, NodeSpec] = {}
        for di, dc in enumerate(self.datacenters):
            for ti, tier in enumerate(dc.tiers):
                for name in tier.nodes:
                    self.nodes[name] = NodeSpec(name, dc.name, tier.name, di, ti)
        self._all = (1 << len(self.datacenters)) - 1
        self._routes: dict[str, int] = {}
        self._patterned = any(dc.hosts for dc in self.datacenters)
        # How the log routes a batch: one mask for every host when no data centre has host patterns (no host
        # cut per target), else dc_mask (see PurgeLog.extend).
        self.routing = self.dc_mask if self._patterned else self._all

    def target_mask(self, target: str) -> int:
        """:meth:`dc_mask` of a purge target's host (``host/path``)."""
        return self.dc_mask(target[: target.find("/")]) if self._patterned else self._all

    def dc_mask(self, host: str) -> int:
        """Bit mask of the data centres that serve ``host`` (which may carry a ``:port``, ignored here)."""
        mask = self._routes.get(host)
        if mask is None:
            name = host[: host.find("]") + 1] if host.startswith("[") else host.partition(":")[0]
            mask = 0
            for i, dc in enumerate(self.datacenters):
                if not dc.hosts or any(fnmatchcase(name, p) for p in dc.hosts):
                    mask |= 1 << i
            if len(self._routes) >= self._CACHE_MAX:
                self._routes.clear()  # hosts are few in practice; a full reset keeps the cache bounded simply
            self._routes[host] = mask
        return mask
