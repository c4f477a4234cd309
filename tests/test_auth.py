"""API tokens and scopes (issue 12): the core table, tokens.yaml errors, every outcome against a real daemon
and a real Varnish node (nothing reaches it on 401/403), per-token rates, SIGHUP, the audit line, http_allow,
and the secure default (purged refuses to listen beyond loopback without tokens)."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys

import pytest
import trio
import yaml
from daemon_helpers import config_for, running_daemon

from purged.config import ConfigError, parse_config
from purged.core.admission import Admission, Refused
from purged.core.auth import AuthError, Token, TokenTable, authorize, bearer, token_digest
from purged.core.engine import Engine
from purged.core.topology import DatacenterSpec, TierSpec, Topology
from purged.tokens import load_tokens, parse_tokens

SECRETS = {"purger": "s-purger", "operator": "s-operator", "reader": "s-reader", "limited": "s-limited",
           "admin": "s-admin"}
SENDER = {"retry_initial": 0.05, "retry_max": 0.2, "connect_timeout": 1.0}


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def tokens_yaml(**overrides) -> dict:
    entries = [
        {"name": "purger", "sha256": sha(SECRETS["purger"]), "scopes": ["purge"]},
        {"name": "operator", "sha256": sha(SECRETS["operator"]), "scopes": ["purge", "purge:high"],
         "rate_high": 5},
        {"name": "reader", "sha256": sha(SECRETS["reader"]), "scopes": ["read"]},
        {"name": "limited", "sha256": sha(SECRETS["limited"]), "scopes": ["purge"], "rate": 10},
        {"name": "admin", "sha256": sha(SECRETS["admin"]), "scopes": ["admin"]},
    ]
    return {"tokens": entries, **overrides}


def bearer_of(name: str) -> dict:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


# -- the core ------------------------------------------------------------------------------------------------------


def test_table_authenticates_by_digest_and_scopes_are_checked():
    table = TokenTable([Token("a", token_digest("x"), frozenset({"purge"})),
                        Token("b", token_digest("y"), frozenset({"read"}))])
    assert table.authenticate("x").name == "a" and table.authenticate("y").name == "b"
    assert table.authenticate("z") is None and table.authenticate("") is None
    assert bearer("Bearer x") == "x" and bearer("bearer  x ") == "x"
    assert bearer("Basic eDp5") is None and bearer("Bearer") is None and bearer(None) is None
    assert authorize(None, None, "purge") is None  # no table: anonymous API
    assert authorize(table, "Bearer x", "purge").name == "a"
    assert authorize(table, "Bearer y", "read", "purge").name == "b"
    for header, status in [(None, 401), ("Bearer nope", 401), ("Basic x", 401), ("Bearer y", 403)]:
        with pytest.raises(AuthError) as exc:
            authorize(table, header, "purge")
        assert exc.value.status == status
        assert (("WWW-Authenticate", 'Bearer realm="purged"') in exc.value.headers) == (status == 401)


def test_core_auth_imports_no_io():
    import purged.core.auth as mod

    source = open(mod.__file__).read()
    for name in ("trio", "yaml", "httpx", "prometheus", "socket"):
        assert f"import {name}" not in source


def _admission(**kw) -> Admission:
    topo = Topology([DatacenterSpec("dc", (), (TierSpec("t", 0.0, ("n1",)),))])
    return Admission(Engine(topo, now=0.0), **kw)


def test_admission_token_rates_and_high_lane_rate():
    adm = _admission()
    tok = Token("t", token_digest("t"), frozenset({"purge", "purge:high"}), rate=100, rate_high=2)
    adm.admit([f"http://h.org/{i}" for i in range(100)], source="http", now=0.0, token=tok)
    with pytest.raises(Refused) as exc:
        adm.admit(["http://h.org/x"], source="http", now=0.0, token=tok)
    assert exc.value.reason == "rate_limited" and exc.value.retry_after >= 1 and "'t'" in exc.value.detail
    adm.admit(["http://h.org/a", "http://h.org/b"], source="http", now=10.0, token=tok, priority="high")
    with pytest.raises(Refused) as exc:
        adm.admit(["http://h.org/c"], source="http", now=10.0, token=tok, priority="high")
    assert "high lane" in exc.value.detail
    adm.admit(["http://h.org/d"], source="http", now=10.0, token=tok)  # the bulk lane is still open to it


def test_admission_max_pending_bytes():
    adm = _admission(max_pending_bytes=100)
    adm.admit(["http://h.org/" + "a" * 120], source="http", now=0.0)  # one batch may cross the line
    assert adm.pending_bytes() == len("h.org/" + "a" * 120)
    with pytest.raises(Refused) as exc:
        adm.admit(["http://h.org/b"], source="http", now=0.0)
    assert exc.value.reason == "overload" and exc.value.status == 429 and exc.value.retry_after


# -- tokens.yaml ---------------------------------------------------------------------------------------------------


def test_tokens_file_errors_name_their_path():
    good = {"name": "a", "sha256": sha("a"), "scopes": ["purge"]}
    table = parse_tokens({"tokens": [good]})
    assert len(table) == 1 and table.tokens[0].rate_high == 100.0
    with pytest.raises(ConfigError) as exc:
        parse_tokens({"tokens": [good, {"name": "b", "scopes": ["purge"]},
                                 {"name": "c", "sha256": "abc", "scopes": ["purge", "root"], "rate": -1},
                                 {"name": "a", "sha256": sha("d"), "scopes": [], "extra": 1}]})
    errors = exc.value.errors
    assert "tokens[1].sha256: required" in errors
    assert any(e.startswith("tokens[2].sha256: expected the 64 hex digits") for e in errors)
    assert any(e.startswith("tokens[2].scopes[1]: expected one of purge, purge:high, read, admin") for e in errors)
    assert any(e.startswith("tokens[2].rate: must be >= 0") for e in errors)
    assert any(e.startswith("tokens[3].extra: unknown key") for e in errors)
    assert any(e.startswith("tokens[3].scopes: must list at least one") for e in errors)
    with pytest.raises(ConfigError) as exc:
        parse_tokens({"tokens": [good, dict(good, sha256=sha("z"))]})
    assert exc.value.errors == ["tokens[1].name: 'a' is used twice (the audit log must tell them apart)"]
    with pytest.raises(ConfigError, match="tokens: required"):
        parse_tokens({})


def test_load_tokens_prefixes_the_file(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text("tokens:\n  - name: a\n    sha256: nope\n    scopes: [purge]\n")
    with pytest.raises(ConfigError) as exc:
        load_tokens(str(path))
    assert exc.value.errors[0].startswith(f"{path}: tokens[0].sha256: expected the 64 hex digits")
    with pytest.raises(ConfigError, match="cannot read"):
        load_tokens(str(tmp_path / "missing.yaml"))


# -- against a real daemon and a real Varnish node ------------------------------------------------------------------


def _auth_config(node, tokens_file, **auth) -> dict:
    return config_for({"dc": [[node.address]]}, sender=SENDER, auth={"tokens_file": str(tokens_file), **auth})


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(tokens_yaml()))
    return path


async def n_purges(node) -> int:
    return await trio.to_thread.run_sync(node.n_purges)


async def test_every_auth_outcome_and_nothing_reaches_varnish_on_401_403(varnish_node, tokens_file):
    node = varnish_node
    async with running_daemon(_auth_config(node, tokens_file)) as (service, client):
        body = {"urls": ["http://h.org/denied"]}
        outcomes = []
        for name, kw in [
            ("no token /v1/purge", dict(method="POST", url="/v1/purge", json=body)),
            ("unknown token", dict(method="POST", url="/v1/purge", json=body, headers={"Authorization": "Bearer x"})),
            ("basic auth", dict(method="POST", url="/v1/purge", json=body, headers={"Authorization": "Basic eDp5"})),
            ("no token /sys/purge", dict(method="POST", url="/sys/purge/", json=[{"meta": {"uri": "//h.org/d"}}])),
            ("no token PURGE", dict(method="PURGE", url="/denied", headers={"Host": "h.org"})),
            ("reader POST", dict(method="POST", url="/v1/purge", json=body, headers=bearer_of("reader"))),
            ("admin POST", dict(method="POST", url="/v1/purge", json=body, headers=bearer_of("admin"))),
            ("purger high", dict(method="POST", url="/v1/purge", json=dict(body, priority="high"),
                                 headers=bearer_of("purger"))),
            ("purger PURGE", dict(method="PURGE", url="/denied", headers={"Host": "h.org", **bearer_of("purger")})),
            ("reader /sys/purge", dict(method="POST", url="/sys/purge/", json=[{"meta": {"uri": "//h.org/d"}}],
                                       headers=bearer_of("reader"))),
        ]:
            r = await client.request(**kw)
            outcomes.append((name, r.status_code, r.json()["error"]))
            if r.status_code == 401:
                assert r.headers["WWW-Authenticate"].startswith("Bearer"), name
        assert outcomes == [
            ("no token /v1/purge", 401, "unauthorized"),
            ("unknown token", 401, "unauthorized"),
            ("basic auth", 401, "unauthorized"),
            ("no token /sys/purge", 401, "unauthorized"),
            ("no token PURGE", 401, "unauthorized"),
            ("reader POST", 403, "forbidden"),
            ("admin POST", 403, "forbidden"),
            ("purger high", 403, "forbidden"),
            ("purger PURGE", 403, "forbidden"),
            ("reader /sys/purge", 403, "forbidden"),
        ]
        assert service.engine.unique_pending() == 0 and len(service.engine.lanes[0].log) == 0
        # Metrics and health stay open without a token (protect_metrics is off).
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        # Every refusal is counted by status and reason.
        assert 'purged_api_refused_total{reason="unauthorized",status="401"} 5.0' in metrics.text
        assert 'purged_api_refused_total{reason="forbidden",status="403"} 5.0' in metrics.text
        assert (await client.get("/healthz")).status_code == 200
        # The allowed paths work, and only they reach Varnish.
        r = await client.post("/v1/purge", json={"urls": ["http://h.org/ok"]}, headers=bearer_of("purger"))
        assert r.status_code == 202, r.text
        batch = r.json()["id"]
        r = await client.post("/sys/purge/", json=[{"meta": {"uri": "//h.org/cp"}}], headers=bearer_of("purger"))
        assert r.status_code == 201
        r = await client.request("PURGE", "/op", headers={"Host": "h.org", **bearer_of("operator")})
        assert r.status_code == 202
        r = await client.post("/v1/purge", json={"urls": ["http://h.org/hi"], "priority": "high"},
                              headers=bearer_of("operator"))
        assert r.status_code == 202
        assert (await client.get(f"/v1/purge/{batch}")).status_code == 401
        for name in ("reader", "purger", "operator"):
            r = await client.get(f"/v1/purge/{batch}?wait=10", headers=bearer_of(name))
            assert r.status_code == 200 and r.json()["done"], (name, r.text)
        assert (await client.get(f"/v1/purge/{batch}", headers=bearer_of("admin"))).status_code == 403
        with trio.fail_after(10):
            while await n_purges(node) < 4:
                await trio.sleep(0.05)
        purged = {p.url for p in await trio.to_thread.run_sync(node.wait_for_purges, 4)}
        assert purged == {"/ok", "/cp", "/op", "/hi"}, purged  # nothing of the refused requests


async def test_per_token_rate_and_high_lane_rate_answer_429(varnish_node, tokens_file):
    async with running_daemon(_auth_config(varnish_node, tokens_file)) as (_, client):
        urls = [f"http://h.org/{i}" for i in range(10)]
        r = await client.post("/v1/purge", json={"urls": urls}, headers=bearer_of("limited"))
        assert r.status_code == 202
        r = await client.post("/v1/purge", json={"urls": ["http://h.org/more"]}, headers=bearer_of("limited"))
        assert r.status_code == 429 and r.json()["error"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
        # Another token is not affected.
        r = await client.post("/v1/purge", json={"urls": ["http://h.org/more"]}, headers=bearer_of("purger"))
        assert r.status_code == 202
        # operator: rate_high 5 on the high lane; bulk stays open.
        high = {"urls": [f"http://h.org/h{i}" for i in range(5)], "priority": "high"}
        assert (await client.post("/v1/purge", json=high, headers=bearer_of("operator"))).status_code == 202
        r = await client.request("PURGE", "/again", headers={"Host": "h.org", **bearer_of("operator")})
        assert r.status_code == 429 and "high lane" in r.json()["detail"]
        r = await client.post("/v1/purge", json={"urls": ["http://h.org/bulk"]}, headers=bearer_of("operator"))
        assert r.status_code == 202


async def test_protect_metrics_needs_read(varnish_node, tokens_file):
    async with running_daemon(_auth_config(varnish_node, tokens_file, protect_metrics=True)) as (_, client):
        for path in ("/metrics", "/healthz"):
            assert (await client.get(path)).status_code == 401
            assert (await client.get(path, headers=bearer_of("purger"))).status_code == 403
            assert (await client.get(path, headers=bearer_of("reader"))).status_code == 200


async def test_tokens_reread_on_reload_and_a_bad_file_keeps_the_old(varnish_node, tokens_file, caplog):
    cfg = _auth_config(varnish_node, tokens_file)
    async with running_daemon(cfg) as (service, client):
        data = tokens_yaml()
        data["tokens"][0]["sha256"] = sha("rotated")
        tokens_file.write_text(yaml.safe_dump(data))
        service.reload_credentials(parse_config(cfg))
        r = await client.post("/v1/purge", json={"urls": ["http://h.org/a"]}, headers=bearer_of("purger"))
        assert r.status_code == 401
        r = await client.post("/v1/purge", json={"urls": ["http://h.org/a"]},
                              headers={"Authorization": "Bearer rotated"})
        assert r.status_code == 202
        tokens_file.write_text("tokens:\n  - name: x\n    sha256: 12\n    scopes: [purge]\n")
        with caplog.at_level(logging.ERROR, logger="purged"):
            service.reload_credentials(parse_config(cfg))
        assert "tokens[0].sha256" in caplog.text and "keeping the 5 tokens" in caplog.text
        r = await client.post("/v1/purge", json={"urls": ["http://h.org/b"]},
                              headers={"Authorization": "Bearer rotated"})
        assert r.status_code == 202


async def test_audit_line_per_accepted_batch_rate_limited_and_without_the_token(varnish_node, tokens_file, caplog):
    async with running_daemon(_auth_config(varnish_node, tokens_file)) as (_, client):
        with caplog.at_level(logging.INFO, logger="purged.audit"):
            for i in range(30):
                r = await client.post("/v1/purge", json={"urls": [f"http://h.org/{i}", f"http://h.org/x{i}"]},
                                      headers=bearer_of("purger"))
                assert r.status_code == 202
            await trio.sleep(1.1)
            r = await client.post("/v1/purge", json={"urls": ["http://h.org/last"]}, headers=bearer_of("purger"))
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "purged.audit"]
    assert 10 <= len(lines) <= 13, lines  # a burst of 10, then about one a second
    records = [json.loads(line.removeprefix("audit ")) for line in lines]
    first = records[0]
    assert first["event"] == "batch_accepted" and first["token"] == "purger" and first["client"] == "127.0.0.1"
    assert first["urls"] == 2 and first["priority"] == "bulk" and first["id"]
    assert records[-1]["suppressed_batches"] >= 17 and records[-1]["suppressed_urls"] >= 34
    assert not any(s in caplog.text for s in SECRETS.values())


async def test_http_allow_refuses_other_addresses_on_every_path(varnish_node):
    cfg = config_for({"dc": [[varnish_node.address]]}, sender=SENDER)
    cfg["listen"]["http_allow"] = ["10.0.0.0/8"]
    async with running_daemon(cfg) as (service, client):
        for method, path in [("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/v1/purge")]:
            r = await client.request(method, path, json={"urls": ["http://h.org/a"]})
            assert r.status_code == 403 and r.json()["error"] == "forbidden_address"
        assert service.engine.unique_pending() == 0
    cfg["listen"]["http_allow"] = ["10.0.0.0/8", "127.0.0.0/8"]
    async with running_daemon(cfg) as (_, client):
        assert (await client.get("/healthz")).status_code == 200


# -- the secure default ---------------------------------------------------------------------------------------------


NODES = {"datacenters": {"dc": {"tiers": [{"nodes": ["127.0.0.1:9"]}]}}, "state_dir": None}


@pytest.mark.parametrize("listen", [{"http": "0.0.0.0:8090"}, {"http": "[::]:8090"}, {"http": "10.1.2.3:80"},
                                    {"http": "purged.example.org:80"},
                                    {"https": {"address": "0.0.0.0:8443", "cert": "c", "key": "k"}}])
def test_secure_default_refuses_beyond_loopback_without_tokens(listen):
    with pytest.raises(ConfigError) as exc:
        parse_config({**NODES, "listen": listen})
    assert len(exc.value.errors) == 1
    assert "auth.tokens_file" in exc.value.errors[0] and "allow_anonymous" in exc.value.errors[0]
    parse_config({**NODES, "listen": listen, "auth": {"allow_anonymous": True}})
    parse_config({**NODES, "listen": listen, "auth": {"tokens_file": "/etc/purged/tokens.yaml"}})


@pytest.mark.parametrize("http", ["127.0.0.1:0", "127.9.9.9:80", "[::1]:80", "localhost:80"])
def test_loopback_needs_no_token(http):
    parse_config({**NODES, "listen": {"http": http}})


def test_auth_config_errors():
    with pytest.raises(ConfigError) as exc:
        parse_config({**NODES, "auth": {"allow_anonymous": "yes", "tokens_file": 3, "x": 1},
                      "listen": {"http_allow": ["10.0.0.0/8", "nope"]}})
    errors = exc.value.errors
    assert any(e.startswith("auth.allow_anonymous: expected true or false") for e in errors)
    assert any(e.startswith("auth.tokens_file: expected a non-empty string") for e in errors)
    assert any(e.startswith("auth.x: unknown key") for e in errors)
    assert any(e.startswith("listen.http_allow[1]: expected a network") for e in errors)


def test_purged_refuses_to_start_and_check_config_says_why(tmp_path):
    cfg = tmp_path / "purged.yaml"
    cfg.write_text(yaml.safe_dump({**NODES, "listen": {"http": "0.0.0.0:0"}}))
    for flag in ("--config", "--check-config"):
        r = subprocess.run([sys.executable, "-m", "purged", flag, str(cfg)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 2, (flag, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert "listen.http: 0.0.0.0:0 is not loopback" in lines[0] and "set auth.tokens_file" in lines[0]
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump(tokens_yaml()))
    cfg.write_text(yaml.safe_dump({**NODES, "listen": {"http": "0.0.0.0:0"}, "auth": {"tokens_file": str(tokens)}}))
    r = subprocess.run([sys.executable, "-m", "purged", "--check-config", str(cfg)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "5 tokens" in r.stdout, r.stderr
    tokens.write_text("tokens: [{name: a, sha256: xyz, scopes: [purge]}]\n")
    r = subprocess.run([sys.executable, "-m", "purged", "--check-config", str(cfg)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and f"auth.tokens_file: {tokens}: tokens[0].sha256" in r.stderr
