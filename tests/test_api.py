"""The HTTP API against the real daemon on an ephemeral port: every endpoint and every error status."""

import json

import msgpack
import pytest
import trio
from daemon_helpers import config_for, running_daemon

# Nodes on a port nothing listens on: the API must accept regardless of the edges' health.
DEAD = {"eqiad": [["127.0.0.1:9"], ["127.0.0.1:10"]], "codfw": [["127.0.0.1:11"]]}


@pytest.fixture
async def api():
    async with running_daemon(config_for(DEAD)) as (service, client):
        yield service, client


async def test_post_json_batch_accepts_good_and_rejects_bad_by_index(api):
    service, client = api
    r = await client.post("/v1/purge", json={"urls": ["https://en.wikipedia.org/wiki/Foo", "ftp://x/", "http://a\r\nb/"]})
    assert r.status_code == 202
    body = r.json()
    assert body["accepted"] == 1 and body["id"]
    assert [(x["index"], x["reason"]) for x in body["rejected"]] == [(1, "bad_scheme"), (2, "control_char")]
    assert service.engine.lanes[1].log.get(0).target == "en.wikipedia.org/wiki/Foo"


async def test_post_msgpack_and_text_bodies(api):
    service, client = api
    r = await client.post(
        "/v1/purge",
        content=msgpack.packb({"urls": ["http://h.org/a"]}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert r.status_code == 202 and r.json()["accepted"] == 1
    r = await client.post("/v1/purge", content=b"http://h.org/b\n\nhttp://h.org/c\n", headers={"Content-Type": "text/plain"})
    assert r.status_code == 202 and r.json()["accepted"] == 2


async def test_curl_style_form_body_is_sniffed_as_json(api):
    _, client = api
    r = await client.post(
        "/v1/purge",
        content=b'{"urls": ["http://h.org/a"]}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 202


@pytest.mark.parametrize(
    ("body", "ctype", "status", "reason"),
    [
        (b"{not json", "application/json", 400, "bad_json"),
        (b"[1,2]", "application/json", 400, "bad_body"),
        (b'{"urls": "x"}', "application/json", 400, "bad_body"),
        (b'{"urls": [], "extra": 1}', "application/json", 400, "bad_body"),
        (b'{"urls": []}', "application/json", 400, "no_valid_urls"),
        (b'{"urls": ["nope"]}', "application/json", 400, "no_valid_urls"),
        (b'{"urls": ["http://h/"], "priority": "urgent"}', "application/json", 400, "bad_priority"),
        (b"\xc1\x00", "application/msgpack", 400, "bad_msgpack"),
        (b"\xff\xfe", "text/plain", 400, "not_utf8"),
        (b"x", "image/png", 415, "unsupported_media_type"),
    ],
)
async def test_bad_bodies(api, body, ctype, status, reason):
    _, client = api
    r = await client.post("/v1/purge", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status
    assert r.json()["error"] == reason and r.json()["detail"]


async def test_limits_413_and_too_many_urls():
    cfg = config_for(DEAD, limits={"max_body_bytes": 2048, "max_urls_per_batch": 2, "max_url_length": 30})
    async with running_daemon(cfg) as (_, client):
        r = await client.post("/v1/purge", content=b"x" * 4096, headers={"Content-Type": "text/plain"})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        r = await client.post("/v1/purge", json={"urls": ["http://h/a"] * 3})
        assert r.status_code == 413 and r.json()["error"] == "too_many_urls"
        r = await client.post("/v1/purge", json={"urls": ["http://h/" + "a" * 40, "http://h/b"]})
        assert r.status_code == 202 and r.json()["rejected"][0]["reason"] == "too_long"


async def test_411_without_length(api):
    service, _ = api
    async with await trio.open_tcp_stream("127.0.0.1", service.http_port) as s:
        await s.send_all(b"POST /v1/purge HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            data = await s.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 411 ")
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"] == "length_required"


async def test_404_405(api):
    _, client = api
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = await client.get("/v1/purge")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = await client.post("/healthz", content=b"")
    assert r.status_code == 405


async def test_sys_purge_change_propagation_shape(api):
    service, client = api
    events = [{"meta": {"uri": f"//en.wikipedia.org/wiki/P{i}", "dt": "2026-01-01T00:00:00Z"}, "tags": []}
              for i in range(3)]
    events.append({"meta": {}})
    r = await client.post("/sys/purge/", json=events)
    assert r.status_code == 201
    assert r.json()["accepted"] == 3 and r.json()["rejected"][0] == {
        "index": 3, "reason": "missing_url", "detail": "no URL given"}
    r = await client.post("/sys/purge/", json={"meta": {"uri": "//h/x"}})
    assert r.status_code == 400 and r.json()["error"] == "bad_body"


async def test_purge_method_with_host_header(api):
    service, client = api
    r = await client.request("PURGE", "/wiki/Foo?x=1", headers={"Host": "en.wikipedia.org"})
    assert r.status_code == 202 and r.json()["accepted"] == 1
    assert service.engine.lanes[0].log.get(0).target == "en.wikipedia.org/wiki/Foo?x=1"  # high priority
    r = await client.request("PURGE", "/x", headers={"Host": "bad host"})
    assert r.status_code == 400 and r.json()["error"] == "control_char"


async def test_status_unknown_pending_and_wait(api):
    service, client = api
    r = await client.get("/v1/purge/nope")
    assert r.status_code == 404 and r.json()["error"] == "unknown_batch"
    r = await client.post("/v1/purge", json={"urls": ["http://h.org/a"]})
    bid = r.json()["id"]
    r = await client.get(f"/v1/purge/{bid}?wait=0.2")
    st = r.json()
    assert r.status_code == 200 and st["done"] is False
    assert st["datacenters"]["eqiad"] == {"backend": {"nodes": 1, "done": 0}, "frontend": {"nodes": 1, "done": 0}}
    r = await client.get(f"/v1/purge/{bid}?wait=abc")
    assert r.status_code == 400 and r.json()["error"] == "bad_wait"


async def test_metrics_and_healthz(api):
    service, client = api
    await client.post("/v1/purge", json={"urls": ["http://h.org/a", "bad"]})
    r = await client.get("/metrics")
    assert r.status_code == 200
    text = r.text
    assert 'purged_purges_accepted_total{source="http"} 1.0' in text
    assert 'purged_purges_rejected_total{reason="bad_scheme",source="http"} 1.0' in text
    assert 'purged_backlog{dc="eqiad",layer="backend",node="127.0.0.1:9"} 1.0' in text
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json()["nodes"]["127.0.0.1:9"]["backlog"] == 1


async def test_stopping_answers_requests_in_progress_and_refuses_new_ones(api):
    service, client = api
    bid = (await client.post("/v1/purge", json={"urls": ["http://h.org/a"]})).json()["id"]
    answers = []

    async def waiting_request():
        answers.append(await client.get(f"/v1/purge/{bid}?wait=1"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiting_request)
        with trio.fail_after(10):
            while not service.driver.waiting:  # the request is being handled (held by ?wait)
                await trio.sleep(0.01)
        service.api.stopping.set()
    assert answers[0].status_code == 200 and answers[0].headers["connection"] == "close"
    with trio.fail_after(10):  # the listener closes soon after; a generous deadline, not a fixed sleep
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", service.http_port)
            except OSError:
                break
            await stream.aclose()
            await trio.sleep(0.05)
