"""Test helper: a throw-away network namespace joined to the root namespace by a veth pair.

    with veth_namespace() as ns:            # needs root (CAP_NET_ADMIN) and iproute2's ``ip``
        ns.host_addr, ns.ns_addr            # e.g. "198.18.37.5", "198.18.37.6" (one random /30)
        subprocess.run(ns.exec_argv(["node", "send.js"]))   # runs inside the namespace
        ns.set_link(False); ns.set_link(True)                # partition the namespace, then heal it

Everything is named ``pgd<6 hex>`` (namespace ``pgd-<hex>``, interfaces ``pgd<hex>h``/``pgd<hex>n``), unique
per call, and deleted by those exact names on exit, whatever happened. Addresses come from 198.18.0.0/15 (the
benchmarking range): a random /30 that no interface of the root namespace already uses. With
``multicast_route`` the namespace routes 224.0.0.0/4 out of its veth, so a multicast sender that does not pick
an interface (npm ``htcp-purge``) sends there; nothing in the root namespace forwards multicast, so such
datagrams end at the root side of the veth.

While the namespace exists, a ``blackhole`` route for its /30 (metric 4242, below the veth's connected route)
keeps its addresses from ever being routed out of the default route: with the veth down (``set_link(False)``,
a partition) packets to the namespace are dropped here, as on a cut link, instead of leaving the machine.

Reverse-path filtering needs no change: the sender's address is on the veth's own connected /30, so even strict
``rp_filter`` accepts it. Only the two interfaces created here are ever touched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

RANGE = ipaddress.ip_network("198.18.0.0/15")


class NetnsError(RuntimeError):
    pass


@dataclass(frozen=True)
class VethNamespace:
    name: str  # the namespace, as ``ip netns`` knows it
    host_if: str  # veth end in the root namespace
    ns_if: str  # veth end inside the namespace
    host_addr: str
    ns_addr: str
    prefixlen: int = 30
    network: str = ""  # the /30

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: the PID is the program's own)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def set_link(self, up: bool) -> None:
        """Take the root-side end of the veth down (a partition: the connected route goes, packets to the
        namespace fail) or up again (the route comes back by itself; the addresses stay)."""
        _ip("link", "set", self.host_if, "up" if up else "down")

    def sysctl_path(self, key: str) -> str:
        """``/proc/sys/net/ipv4/conf/<host_if>/<key>``: per-interface settings of the root-side end."""
        return f"/proc/sys/net/ipv4/conf/{self.host_if}/{key}"


def missing_prerequisites() -> list[str]:
    """Why :func:`veth_namespace` cannot work here (empty if it can)."""
    problems = []
    if shutil.which("ip") is None:
        problems.append("iproute2's `ip` is not installed (Debian package iproute2)")
    if os.geteuid() != 0:
        problems.append("creating a network namespace needs root (CAP_NET_ADMIN)")
    return problems


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and res.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show").stdout
    nets = []
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            nets.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    return nets


def _free_slash30(rng: random.Random) -> ipaddress.IPv4Network:
    used = _used_networks()
    for _ in range(100):
        net = ipaddress.ip_network(f"{RANGE[rng.randrange(0, RANGE.num_addresses, 4)]}/30")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsError("no free /30 in 198.18.0.0/15 after 100 tries")


@contextlib.contextmanager
def veth_namespace(*, multicast_route: bool = True) -> Iterator[VethNamespace]:
    """Create the namespace and veth pair (both ends and the namespace's ``lo`` up); delete them on exit."""
    problems = missing_prerequisites()
    if problems:
        raise NetnsError("; ".join(problems))
    rng = random.Random(os.urandom(8))
    tag = f"pgd{rng.getrandbits(24):06x}"
    net = _free_slash30(rng)
    host, peer = (str(a) for a in net.hosts())
    ns = VethNamespace(f"pgd-{tag[3:]}", f"{tag}h", f"{tag}n", host, peer, network=str(net))
    created: list[str] = []  # "ns", "link", "route": what cleanup must delete
    try:
        _ip("netns", "add", ns.name)
        created.append("ns")
        _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if, "netns", ns.name)
        created.append("link")
        # A blackhole for the /30 under the connected route: while the veth is down (set_link(False)) the
        # connected route is gone, and without this the namespace's addresses would be routed out of the
        # default route, off this machine. Metric 4242 loses to the connected route while it exists.
        _ip("route", "add", "blackhole", str(net), "metric", "4242")
        created.append("route")
        _ip("addr", "add", f"{host}/30", "dev", ns.host_if)
        _ip("link", "set", ns.host_if, "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        _ip("-n", ns.name, "addr", "add", f"{peer}/30", "dev", ns.ns_if)
        _ip("-n", ns.name, "link", "set", ns.ns_if, "up")
        if multicast_route:
            _ip("-n", ns.name, "route", "add", "224.0.0.0/4", "dev", ns.ns_if)
        yield ns
    except BaseException:
        _delete(ns, created)  # best effort; the original error is the one to see
        raise
    errors = _delete(ns, created)
    if errors:
        raise NetnsError("; ".join(errors))


def _delete(ns: VethNamespace, created: list[str]) -> list[str]:
    """Delete exactly what :func:`veth_namespace` created; return the errors."""
    errors = []
    # Deleting either end deletes the pair; the namespace's end would also go with the namespace.
    if "link" in created and _ip("link", "show", ns.host_if, check=False).returncode == 0:
        res = _ip("link", "del", ns.host_if, check=False)
        if res.returncode != 0:
            errors.append(f"ip link del {ns.host_if}: {res.stderr.strip()}")
    if "route" in created:
        res = _ip("route", "del", "blackhole", ns.network, "metric", "4242", check=False)
        if res.returncode != 0:
            errors.append(f"ip route del blackhole {ns.network}: {res.stderr.strip()}")
    if "ns" in created:
        res = _ip("netns", "del", ns.name, check=False)
        if res.returncode != 0:
            errors.append(f"ip netns del {ns.name}: {res.stderr.strip()}")
    return errors
