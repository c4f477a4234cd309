"""The config parser: the documented default, every error path with its dotted key path, and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from purged.config import Address, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"datacenters": {"eqiad": {"tiers": [{"nodes": ["127.0.0.1:3128"]}]}}}


def errors_of(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def test_default_config_file_is_valid_and_as_documented():
    cfg = load_config(str(ROOT / "conf" / "purged.yaml"))
    assert [dc.name for dc in cfg.datacenters] == ["eqiad", "codfw"]
    eqiad = cfg.datacenters[0]
    assert [t.name for t in eqiad.tiers] == ["backend", "frontend"]
    assert eqiad.tiers[1].delay == 1.0 and eqiad.tiers[0].nodes == (Address("127.0.0.1", 6081),)
    assert cfg.listen.http == Address("127.0.0.1", 8090)


def test_minimal_config_gets_defaults():
    cfg = parse_config(MINIMAL)
    assert cfg.listen.http == Address("127.0.0.1", 8090)
    assert cfg.limits.max_url_length == 8192 and cfg.sender.window == 256 and cfg.sender.connections == 4
    assert cfg.datacenters[0].tiers[0].name == "tier0" and cfg.datacenters[0].hosts == ()
    with pytest.raises(AttributeError):
        cfg.shutdown_timeout = 1  # frozen


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, "expected a mapping, got null"),
        ({}, "datacenters: required"),
        ({**MINIMAL, "bogus": 1}, "bogus: unknown key"),
        ({"datacenters": {}}, "datacenters: expected a non-empty mapping"),
        ({"datacenters": {"a b": {"tiers": []}}}, "datacenters.a b: data centre names"),
        ({"datacenters": {"e": {}}}, "datacenters.e.tiers: required"),
        ({"datacenters": {"e": {"tiers": []}}}, "datacenters.e.tiers: must list at least one tier"),
        ({"datacenters": {"e": {"tiers": [{"nodes": []}]}}}, "datacenters.e.tiers[0].nodes: must list at least one"),
        ({"datacenters": {"e": {"tiers": [{"nodes": ["x"]}]}}}, "datacenters.e.tiers[0].nodes[0]: expected host:port"),
        (
            {"datacenters": {"e": {"tiers": [{"nodes": ["h:1"]}, {"nodes": ["h:2"], "delay": "1s"}]}}},
            "datacenters.e.tiers[1].delay: expected a number, got str",
        ),
        (
            {"datacenters": {"e": {"tiers": [{"nodes": ["h:1"], "extra": 1}]}}},
            "datacenters.e.tiers[0].extra: unknown key",
        ),
        (
            {"datacenters": {"e": {"tiers": [{"name": "a", "nodes": ["h:1"]}, {"name": "a", "nodes": ["h:2"]}]}}},
            "datacenters.e.tiers: tier name 'a' is used twice",
        ),
        (
            {"datacenters": {"e": {"tiers": [{"nodes": ["h:1"]}]}, "f": {"tiers": [{"nodes": ["h:1"]}]}}},
            "datacenters.f.tiers[0].nodes[0]: node h:1 is already listed at datacenters.e.tiers[0].nodes[0]",
        ),
        ({**MINIMAL, "datacenters": {"e": {"hosts": ["a b"], "tiers": [{"nodes": ["h:1"]}]}}},
         "datacenters.e.hosts[0]: host pattern contains whitespace"),
        ({**MINIMAL, "sender": {"window": 0}}, "sender.window: must be >= 1, got 0"),
        ({**MINIMAL, "sender": {"window": True}}, "sender.window: expected an integer, got bool"),
        ({**MINIMAL, "limits": {"max_url_length": 8}}, "limits.max_url_length: must be >= 16"),
        ({**MINIMAL, "dedup": {"window": -1}}, "dedup.window: must be >= 0"),
        ({**MINIMAL, "listen": {"http": "h:99999"}}, "listen.http: expected host:port"),
        ({**MINIMAL, "listen": {"multicast": [{"group": "10.0.0.1", "port": 4827}]}},
         "listen.multicast[0].group: 10.0.0.1 is not a multicast address"),
        ({**MINIMAL, "listen": {"multicast": [{"port": 4827}]}}, "listen.multicast[0].group: required"),
        ({**MINIMAL, "listen": {"multicast": [{"group": "239.1.1.1", "port": 1, "format": "json"}]}},
         "listen.multicast[0].format: expected htcp or msgpack"),
        ({**MINIMAL, "listen": {"multicast": [{"group": "239.1.1.1", "port": 1, "sources": ["nope"]}]}},
         "listen.multicast[0].sources[0]: expected a network"),
        ({**MINIMAL, "durability": "sometimes"}, "durability:"),
    ],
)
def test_errors_name_the_dotted_key_path(data, expected):
    errs = errors_of(data)
    assert any(e.startswith(expected) for e in errs), errs


def test_every_problem_is_reported_at_once():
    errs = errors_of({"datacenters": {"e": {"tiers": [{"nodes": ["x", "h:0"]}]}}, "sender": {"window": -1}, "x": 1})
    assert len(errs) == 4, errs


def test_yaml_syntax_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datacenters: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))


def test_check_config_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "purged", "--check-config", str(ROOT / "conf" / "purged.yaml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "OK (2 data centres, 4 nodes)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text('datacenters:\n  eqiad:\n    tiers:\n      - nodes: ["127.0.0.1:3128"]\n      - nodes: [5]\n')
    out = subprocess.run([sys.executable, "-m", "purged", "--check-config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{bad}: datacenters.eqiad.tiers[1].nodes[0]: expected a non-empty string, got int" in out.stderr
