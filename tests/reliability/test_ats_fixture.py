"""The Apache Traffic Server fixture: a real traffic_server caches from the origin, answers PURGE 200 when
it held the object and 404 when not, logs both, and is stopped by PID (its process group)."""

from __future__ import annotations

import httpx
import pytest
from procgroup import _pgroup_members

pytestmark = pytest.mark.integration


def test_ats_caches_purges_and_logs(ats_factory, origin):
    (node,) = ats_factory(1, origin=origin.address)
    host = {"Host": "en.wikipedia.org"}
    with httpx.Client(base_url=node.url, headers=host) as c:
        first = c.get("/wiki/A?x=1")
        assert first.status_code == 200 and first.text == "origin copy of en.wikipedia.org/wiki/A?x=1\n"
        assert c.get("/wiki/A?x=1").headers["age"] is not None
        assert c.request("PURGE", "/wiki/A?x=1").status_code == 200  # held it
        assert c.request("PURGE", "/wiki/A?x=1").status_code == 404  # no longer
    got = [(r.status, r.host, r.url) for r in node.purges()]
    assert got == [(200, "en.wikipedia.org", "/wiki/A?x=1"), (404, "en.wikipedia.org", "/wiki/A?x=1")]
    pid = node.pid
    node.stop()
    assert not node.running and _pgroup_members(pid, zombies=False) == []
    assert len(node.purges()) == 2  # the record outlives the process
