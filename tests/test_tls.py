"""listen.https (issue 12): the API over TLS with a certificate made here by the openssl command, a round trip
to a real Varnish node (httpx and purgectl with --cacert and a token), the certificate re-read on SIGHUP, and a
bad certificate refused at start and kept on reload."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import sys

import httpx
import pytest
import trio
import yaml
from daemon_helpers import config_for, running_daemon

from purged.config import ConfigError, parse_config
from purged.daemon import Service

pytestmark = pytest.mark.integration
SENDER = {"retry_initial": 0.05, "retry_max": 0.2, "connect_timeout": 1.0}
TOKEN = "tls-test-token"


def make_cert(directory, name: str, cn: str) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is missing: bash .ci/test installs it (Debian package openssl)"
    cert, key = str(directory / f"{name}.crt"), str(directory / f"{name}.key")
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={cn}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def tls_config(node, cert, key, tokens_file) -> dict:
    cfg = config_for({"dc": [[node.address]]}, sender=SENDER, auth={"tokens_file": str(tokens_file)})
    cfg["listen"]["https"] = {"address": "127.0.0.1:0", "cert": cert, "key": key}
    return cfg


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"tokens": [{"name": "ops", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                                                "scopes": ["purge", "purge:high", "read"]}]}))
    return path


def peer_cn(port: int, cafile: str) -> str:
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            subject = dict(x[0] for x in tls.getpeercert()["subject"])
            return subject["commonName"]


async def test_https_round_trip_with_token_reaches_varnish(varnish_node, tmp_path, tokens_file):
    cert, key = make_cert(tmp_path, "a", "purged-a")
    async with running_daemon(tls_config(varnish_node, cert, key, tokens_file)) as (service, _):
        base = f"https://127.0.0.1:{service.https_port}"
        ctx = ssl.create_default_context(cafile=cert)
        async with httpx.AsyncClient(base_url=base, verify=ctx, timeout=30) as client:
            r = await client.post("/v1/purge", json={"urls": ["http://h.org/tls"]})
            assert r.status_code == 401
            auth = {"Authorization": f"Bearer {TOKEN}"}
            r = await client.post("/v1/purge", json={"urls": ["http://h.org/tls"]}, headers=auth)
            assert r.status_code == 202, r.text
            r = await client.get(f"/v1/purge/{r.json()['id']}?wait=10", headers=auth)
            assert r.json()["done"]
            assert (await client.get("/healthz")).json()["status"] == "ok"
        purges = await trio.to_thread.run_sync(varnish_node.wait_for_purges, 1)
        assert [p.url for p in purges] == ["/tls"]
        # Plain HTTP to the TLS port gets no answer (the handshake fails and the connection closes).
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.https_port}", timeout=5) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get("/healthz")
        # purgectl over TLS with --cacert and a token, as an operator would.
        env = {k: v for k, v in os.environ.items() if k not in ("PURGED_API", "PURGED_TOKEN")}
        env |= {"PURGED_API": base, "PURGED_TOKEN": TOKEN}
        with trio.fail_after(60):
            proc = await trio.run_process(
                [sys.executable, "-m", "purged.ctl", "--cacert", cert, "purge", "--wait", "20",
                 "http://h.org/ctl1", "http://h.org/ctl2"],
                capture_stdout=True, capture_stderr=True, check=False, env=env)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        purges = await trio.to_thread.run_sync(varnish_node.wait_for_purges, 3)
        assert {p.url for p in purges} == {"/tls", "/ctl1", "/ctl2"}


async def test_certificate_reread_on_reload_and_a_bad_one_is_kept(varnish_node, tmp_path, tokens_file, caplog):
    cert, key = make_cert(tmp_path, "live", "first")
    cfg = tls_config(varnish_node, cert, key, tokens_file)
    async with running_daemon(cfg) as (service, _):
        port = service.https_port
        assert await trio.to_thread.run_sync(peer_cn, port, cert) == "first"
        # Rotate: new files in place, SIGHUP (reload_credentials is what SIGHUP calls after the config).
        new_cert, new_key = make_cert(tmp_path, "next", "second")
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        service.reload_credentials(parse_config(cfg))
        assert await trio.to_thread.run_sync(peer_cn, port, cert) == "second"
        with open(key, "w") as f:
            f.write("not a key\n")
        service.reload_credentials(parse_config(cfg))
        assert "keep the old ones" in caplog.text
        assert await trio.to_thread.run_sync(peer_cn, port, cert) == "second"


async def test_bad_certificate_refuses_start(varnish_node, tmp_path, tokens_file):
    cfg = tls_config(varnish_node, str(tmp_path / "missing.crt"), str(tmp_path / "missing.key"), tokens_file)
    with pytest.raises(ConfigError, match="listen.https: cannot load the certificate"):
        Service(parse_config(cfg))  # what serve() builds first: nothing is listening yet


def test_check_config_reports_a_bad_certificate(tmp_path, tokens_file):
    cfg = tmp_path / "purged.yaml"
    cfg.write_text(yaml.safe_dump({
        "datacenters": {"dc": {"tiers": [{"nodes": ["127.0.0.1:9"]}]}}, "state_dir": None,
        "listen": {"https": {"address": "0.0.0.0:8443", "cert": str(tmp_path / "no.crt"), "key": "/no.key"}},
        "auth": {"tokens_file": str(tokens_file)},
    }))
    r = subprocess.run([sys.executable, "-m", "purged", "--check-config", str(cfg)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "listen.https: cannot load the certificate" in r.stderr, r.stderr
