"""The config parser: the documented default, every error path with its dotted key path, and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# -- hostile files and values (issue 11): only ConfigError, naming the problem and the key -------------------------

NODES = 'datacenters:\n  eqiad:\n    tiers:\n      - nodes: ["127.0.0.1:3128"]\n'


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ((NODES + "# café\n").encode("latin-1"), "line 5, column 6: not UTF-8 (byte 0xe9)"),
        ("datacenters: {}".encode("utf-16"), "line 1, column 1: not UTF-8 (byte 0xff)"),
        ((NODES + "dedup:\n  window: 1e400\n").encode(), "dedup.window: expected a number, got str '1e400'"),
        ((NODES + "dedup:\n  window: 1.0e+400\n").encode(), "dedup.window: expected a finite number, got inf"),
        ((NODES + "dedup:\n  window: .nan\n").encode(), "dedup.window: expected a finite number, got nan"),
        ((NODES + "limits:\n  max_age: -.inf\n").encode(), "limits.max_age: expected a finite number, got -inf"),
        ((NODES + "dedup:\n  window: " + "9" * 400 + "\n").encode(), "dedup.window: must be <= 1e+15"),
        ((NODES + "limits:\n  max_pending: " + "9" * 400 + "\n").encode(), "limits.max_pending: must be <= 1e+15"),
        ((NODES + "        delay: " + "9" * 400 + "\n").encode(), "datacenters.eqiad.tiers[0].delay: must be <= 1e+15"),
        ((NODES + "        rate: -1\n").encode(), "datacenters.eqiad.tiers[0].rate: must be >= 0, got -1"),
        ((NODES + "limits:\n  max_wait: " + "9" * 5000 + "\n").encode(), "not valid YAML: cannot read this value"),
        ((NODES + "listen:\n  multicast: [{group: 239.1.1.1, port: 4827, rcvbuf: 4294967296}]\n").encode(),
         "listen.multicast[0].rcvbuf: must be <= 2.14748e+09"),
        (b'datacenters: {eqiad: {tiers: [{nodes: ["h:\xd9\xa1"]}]}}\n',
         "datacenters.eqiad.tiers[0].nodes[0]: expected host:port"),
        (b'datacenters: {eqiad: {tiers: [{nodes: ["h:' + b"1" * 5000 + b'"]}]}}\n', "expected host:port"),
        (b'datacenters: {eqiad: {tiers: [{nodes: ["\\ud800:1"]}]}}\n', "nodes[0]: contains a lone surrogate"),
        ((NODES + 'state_dir: "\\udcff"\n').encode(), "state_dir: contains a lone surrogate"),
        (b'datacenters: {"a\\nb": {tiers: [{nodes: ["h:1"]}]}}\n', "datacenters.'a\\nb': data centre names"),
        ((NODES + NODES).encode(), "found duplicate key 'datacenters'"),
        ((NODES + "sender: {window: 1, window: 2}\n").encode(), "found duplicate key 'window'"),
        (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "not valid YAML: nested too deeply"),
        (b"datacenters: [unclosed\n", "not valid YAML"),
        (b"datacenters: {eqiad: {tiers: [{nodes: ['h:1'], name: 2001-02-30}]}}\n", "cannot read this value"),
        (b"- a\n- b\n", "expected a mapping, got list"),
        (b"\x00\x01", "not valid YAML: unacceptable character"),
    ],    ids=[
        'latin1-comment', 'utf16', '1e400-string', 'float-overflow', 'nan', 'minus-inf', 'huge-int-float-key',
        'huge-int-int-key', 'huge-int-delay', 'negative-rate', 'int-past-4300-digits', 'rcvbuf-past-c-int',
        'non-ascii-port-digit', '5000-digit-port', 'surrogate-node', 'surrogate-state-dir', 'newline-dc-name',
        'duplicate-top-key', 'duplicate-nested-key', 'deep-nesting', 'yaml-syntax', 'bad-date',
        'list-top-level', 'nul-byte',
    ],
)
def test_hostile_file_is_a_config_error(tmp_path, content, expected):
    path = tmp_path / "purged.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert any(expected in e for e in info.value.errors), info.value.errors


def test_ipv6_nodes_must_be_ipv6_addresses():
    errs = errors_of({"datacenters": {"e": {"tiers": [{"nodes": ["[:::::]:80", "[::1]:80", "[fe80::1%25lo]:80"]}]}}})
    assert errs == [
        "datacenters.e.tiers[0].nodes[0]: invalid host ':::::': bad IPv6 literal '[:::::]': not an IPv6 address",
        "datacenters.e.tiers[0].nodes[2]: invalid host 'fe80::1%25lo': IPv6 zone ids are not allowed: '[fe80::1%25lo]'",
    ]


def test_merge_keys_may_override_without_being_duplicates(tmp_path):
    path = tmp_path / "purged.yaml"
    path.write_text(NODES + "sender: {<<: {window: 2, connections: 2}, window: 8}\n")
    cfg = load_config(str(path))
    assert cfg.sender.window == 8 and cfg.sender.connections == 2


def test_unreadable_files_are_config_errors(tmp_path):
    for path, expected in [
        (str(tmp_path), "cannot read"),  # a directory
        (str(tmp_path / "missing.yaml"), "cannot read"),
        (str(tmp_path / "a\0b"), "cannot read"),
        ("/dev/zero", "larger than"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert expected in info.value.errors[0], info.value.errors


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (float("nan"), "expected a finite number, got nan"),
        (float("inf"), "expected a finite number, got inf"),
        (10**400, "must be <= 1e+15, got an integer of 333 hex digits"),
        (-(10**5000), "must be >= 0, got -an integer of"),
        (10**15 + 1, "must be <= 1e+15"),
        (-0.5, "must be >= 0, got -0.5"),
    ],
    ids=["nan", "inf", "1e400", "-1e5000", "1e15+1", "negative"],
)
def test_hostile_numbers_name_the_key(value, expected):
    for section, key in [("dedup", "window"), ("limits", "client_rate"), ("limits", "max_lag")]:
        if isinstance(value, float) and key == "max_lag":
            continue  # an integer field: "expected an integer"
        errs = errors_of({**MINIMAL, section: {key: value}})
        assert any(e.startswith(f"{section}.{key}: {expected}") for e in errs), errs


def test_hostile_keys_do_not_break_messages():
    errs = errors_of({**MINIMAL, 10**5000: 1, "x\ny": 2})
    assert errs[0] == "keys must be strings, got an integer of 4153 hex digits"
    assert errs[1].startswith("'x\\ny': unknown key (allowed: ")


def test_check_config_cli_hostile_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes((NODES + "# café\nsender:\n  timeout: " + "9" * 400 + "\n").encode("latin-1"))
    out = subprocess.run([sys.executable, "-m", "purged", "--check-config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{bad}: line 5, column 6: not UTF-8 (byte 0xe9); save the file as UTF-8" in out.stderr
    bad.write_bytes((NODES + "sender:\n  timeout: " + "9" * 400 + "\n").encode())
    out = subprocess.run([sys.executable, "-m", "purged", "--check-config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{bad}: sender.timeout: must be <= 1e+15" in out.stderr


FULL = {
    "listen": {"http": "127.0.0.1:0", "multicast": [{"group": "239.1.1.1", "port": 4827, "sources": ["10.0.0.0/8"],
                                                      "rcvbuf": 65536, "rate": 1, "burst": 1, "format": "htcp"}],
               "https": {"address": "[::1]:0", "cert": "/c.pem", "key": "/k.pem"}, "http_allow": ["::1/128"]},
    "auth": {"tokens_file": "/t.yaml", "allow_anonymous": False, "protect_metrics": True},
    "datacenters": {"eqiad": {"hosts": ["*.org"], "rate": 1, "burst": 2,
                              "tiers": [{"name": "b", "nodes": ["[::1]:80"], "delay": 1, "rate": 1, "burst": 1}]}},
    "limits": {"max_body_bytes": 2048, "max_pending": 10, "max_age": 1.5, "header_timeout": 1},
    "sender": {"window": 2, "timeout": 1, "poison_after": 2},
    "dedup": {"window": 1},
    "shutdown_timeout": 1,
    "state_dir": "/tmp/x",
    "durability": "batch",
    "journal": {"segment_bytes": 65536},
}


def _leaves(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))


HOSTILE = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.sampled_from([400, -400, 20, 10, 5000]).map(lambda d: 10 ** abs(d) * (1 if d > 0 else -1))
    | st.floats() | st.text() | st.sampled_from(["\ud800", "h:1", "[::1]:0", "a\nb", "1e400", "239.1.1.1"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(list(_leaves(FULL))), HOSTILE)
def test_any_value_anywhere_is_a_config_error_or_parses(path, value):
    import copy

    data = copy.deepcopy(FULL)
    parse_config(data)  # the base is valid
    if not path:
        data = value
    else:
        target = data
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    try:
        parse_config(data)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) for e in exc.errors)
        "\n".join(exc.errors).encode("utf-8", "backslashreplace")
