"""The HTTP API's long-polls, routes and request accounting under hostile use (issue 11 #2, #7, #8)."""

import httpx
import trio
from daemon_helpers import config_for, running_daemon

DEAD = {"a": [["127.0.0.1:9"]]}  # nothing listens: batches stay unfinished


async def test_long_polls_past_max_waiters_answer_at_once_and_do_not_slow_intake():
    async with running_daemon(config_for(DEAD, limits={"max_waiters": 50})) as (service, client):
        r = await client.post("/v1/purge", json={"urls": ["http://h.org/a"]})
        batch = r.json()["id"]
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30, limits=limits) as polls:
            answered = []

            async def poll():
                r = await polls.get(f"/v1/purge/{batch}?wait=30")
                answered.append((trio.current_time(), r.json()["done"]))

            async with trio.open_nursery() as nursery:
                t0 = trio.current_time()
                for _ in range(120):
                    nursery.start_soon(poll)
                with trio.fail_after(20):
                    while service.driver.waiting < 50 or len(answered) < 70:
                        await trio.sleep(0.05)
                assert service.driver.waiting == 50  # the cap
                assert all(not done and at - t0 < 15 for at, done in answered)  # answered at once, not done
                # Intake is not slowed by the parked long-polls: 20 batches while they wait.
                for i in range(20):
                    r = await client.post("/v1/purge", json={"urls": [f"http://h.org/{i}/{j}" for j in range(500)]})
                    assert r.status_code == 202
                assert (await client.get("/healthz")).status_code == 200
                nursery.cancel_scope.cancel()


async def test_a_waiter_is_released_when_its_batch_is_done_and_not_before(varnish_node):
    async with running_daemon(config_for({"a": [[varnish_node.address]]})) as (service, client):
        r = await client.post("/v1/purge", json={"urls": [f"http://h.org/{i}" for i in range(100)]})
        st = (await client.get(f"/v1/purge/{r.json()['id']}?wait=20")).json()
        assert st["done"] and st["datacenters"]["a"]["t0"] == {"nodes": 1, "done": 1}
        assert service.driver.waiting == 0


async def test_purge_method_purges_api_paths_too():
    async with running_daemon(config_for(DEAD)) as (service, client):
        for path in ("/v1/purge", "/sys/purge", "/metrics"):
            r = await client.request("PURGE", path, headers={"Host": "en.wikipedia.org"})
            assert r.status_code == 202, (path, r.text)
        targets = {e.target for _, e in service.engine.held(0)}
        assert targets == {"en.wikipedia.org/v1/purge", "en.wikipedia.org/sys/purge", "en.wikipedia.org/metrics"}


async def test_requests_in_progress_are_counted_exactly_with_overlapping_connections():
    """A connection that starts waiting while another request is in progress must not skew the count."""
    async with running_daemon(config_for(DEAD)) as (service, client):
        batch = (await client.post("/v1/purge", json={"urls": ["http://h.org/a"]})).json()["id"]
        base = str(client.base_url)
        async with httpx.AsyncClient(base_url=base, timeout=30) as a, httpx.AsyncClient(base_url=base, timeout=30) as b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.get, f"/v1/purge/{batch}?wait=1")  # in progress for 1 s
                with trio.fail_after(5):
                    while service.api.active == 0:
                        await trio.sleep(0.01)
                await b.get("/healthz")  # b's connection goes idle while a's request is in progress
                await trio.sleep(1.5)  # a's request is answered meanwhile
                assert (await b.get("/healthz")).status_code == 200  # b's next request starts after
        with trio.fail_after(5):
            while service.api.active:
                await trio.sleep(0.01)
        assert service.api.active == 0
