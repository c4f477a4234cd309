# ---- Varnish edge nodes: fixtures over tests/varnish.py (keep this block together) -------------
import os
import shutil
from collections.abc import Callable, Iterator

import pytest
from varnish import VARNISHD, VarnishNode, start_all, stop_all


@pytest.fixture
def varnish_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., list[VarnishNode]]]:
    """``varnish_factory(count=1, **VarnishNode kwargs) -> list of started nodes``.

    Nodes start concurrently (~0.2-0.5 s for a batch here) in their own temporary directories;
    all of them are stopped at teardown, whatever the test did. From a trio test, call it before
    starting the code under test, or via ``trio.to_thread.run_sync``.
    """
    if not os.access(VARNISHD, os.X_OK):
        pytest.fail("varnishd is not installed: bash .ci/test installs it (Debian package varnish)")
    nodes: list[VarnishNode] = []

    def make(count: int = 1, **kwargs: object) -> list[VarnishNode]:
        new = [VarnishNode(tmp_path_factory.mktemp("varnish"), **kwargs) for _ in range(count)]
        nodes.extend(new)
        start_all(new)
        return new

    yield make
    errors = stop_all(nodes)
    for node in nodes:
        # The shared-memory log (vsl_space) is the bulk; keep purges.*.log and varnishd.*.out.
        shutil.rmtree(node.instance_dir, ignore_errors=True)
    if errors:
        raise errors[0]


@pytest.fixture
def varnish_node(varnish_factory: Callable[..., list[VarnishNode]]) -> VarnishNode:
    """One started Varnish edge node with conf/varnish-demo.vcl."""
    return varnish_factory(1)[0]


# ---- end of Varnish edge nodes --------------------------------------------------------------
