"""Fixtures of the reliability suite: real Apache Traffic Server nodes and a tiny origin for them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from ats import TRAFFIC_SERVER, AtsNode, Origin, start_all, stop_all


@pytest.fixture
def origin() -> Iterator[Origin]:
    """A threaded stdlib HTTP origin answering any GET with a cacheable 200."""
    o = Origin().start()
    yield o
    o.stop()


@pytest.fixture
def ats_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., list[AtsNode]]]:
    """``ats_factory(count=1, **AtsNode kwargs) -> started nodes`` (concurrently, ~2 s); all stopped at teardown."""
    if not os.access(TRAFFIC_SERVER, os.X_OK):
        pytest.fail("traffic_server is not installed: bash .ci/test installs it (Debian package trafficserver)")
    nodes: list[AtsNode] = []

    def make(count: int = 1, **kwargs: object) -> list[AtsNode]:
        new = [AtsNode(tmp_path_factory.mktemp("ats"), **kwargs) for _ in range(count)]
        nodes.extend(new)
        start_all(new)
        return new

    yield make
    errors = stop_all(nodes, sync=False)  # a test that wants the record read it already
    for node in nodes:
        (node.workdir / "cache" / "cache.db").unlink(missing_ok=True)  # 64 MiB sparse, the bulk
    if errors:
        raise errors[0]
