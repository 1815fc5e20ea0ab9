"""regate.yaml validation: every kind of mistake is named by its field path,
one line per problem, and the CLI exits non-zero without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxy import config
from tests.support.procs import ROOT

TOOL = {"name": "search", "upstream": "http://127.0.0.1:9001"}


def problems(raw) -> list[str]:
    with pytest.raises(config.ConfigError) as exc:
        config.validate(raw)
    return exc.value.problems


def test_smallest_useful_file_is_a_tools_list():
    cfg = config.validate({"tools": [TOOL]})
    assert cfg.tools[0].prefix == "/tools/search"
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.policy.engine == "embedded" and cfg.policy.timeout_ms == 50
    assert cfg.audit.fsync == "interval"


@pytest.mark.parametrize("raw, expected", [
    ({"tools": [TOOL, TOOL | {"name": "x", "upstream": "ftp://host"}, TOOL | {"name": "y", "upstream": "nope"}]},
     ["tools[1].upstream: not a URL", "tools[2].upstream: not a URL"]),
    ({}, ["tools: required"]),
    ({"tools": []}, ["tools: "]),
    ({"tools": [TOOL | {"timout_ms": 5}]}, ["tools[0].timout_ms: unknown key"]),
    ({"tools": [TOOL | {"timeout_ms": 0}]}, ["tools[0].timeout_ms: "]),
    ({"tools": [TOOL | {"timeout_ms": "soon"}]}, ["tools[0].timeout_ms: "]),
    ({"tools": [TOOL | {"max_body_bytes": -1}]}, ["tools[0].max_body_bytes: "]),
    ({"tools": [TOOL | {"protocol": "grpc"}]}, ["tools[0].protocol: "]),
    ({"tools": [TOOL | {"prefix": "tools/x"}]}, ["tools[0].prefix: must be an absolute path"]),
    ({"tools": [TOOL | {"prefix": "/tools/../x"}]}, ["tools[0].prefix: must be an absolute path"]),
    ({"tools": [TOOL | {"name": "bad name"}]}, ["tools[0].name: "]),
    ({"tools": [TOOL, dict(TOOL)]}, ["tools[1].name: duplicate tool name 'search'"]),
    ({"tools": [TOOL, TOOL | {"name": "b", "prefix": "/tools/search"}]}, ["tools[1].prefix: '/tools/search' already routes tools[0]"]),
    ({"tools": [TOOL | {"gpu": {"memory_mb": -5}}]}, ["tools[0].gpu.memory_mb: "]),
    ({"listen": "8080", "tools": [TOOL]}, ["listen: listen must be HOST:PORT"]),
    ({"admin": {"listen": "localhost"}, "tools": [TOOL]}, ["admin.listen must be HOST:PORT"]),
    ({"auth": {"mode": "magic"}, "tools": [TOOL]}, ["auth.mode: "]),
    ({"policy": {"engine": "wasm"}, "tools": [TOOL]}, ["policy.engine: "]),
    ({"policy": {"decision": "regate/not valid"}, "tools": [TOOL]}, ["policy.decision: must be a rule path"]),
    ({"policy": {"timeout_ms": -1}, "tools": [TOOL]}, ["policy.timeout_ms: "]),
    ({"audit": {"fsync": "sometimes"}, "tools": [TOOL]}, ["audit.fsync: "]),
    ({"admin": {"token": "${REGATE_TEST_UNSET_VAR}"}, "tools": [TOOL]},
     ["admin.token: environment variable REGATE_TEST_UNSET_VAR is not set"]),
    (["not", "a", "mapping"], ["<root>: must be a mapping"]),
])
def test_each_error_names_its_field(raw, expected):
    got = problems(raw)
    assert len(got) == len(expected), got
    for line, want in zip(got, expected):
        assert want in line, (line, want)


def test_env_vars_and_defaults_are_expanded(monkeypatch):
    monkeypatch.setenv("REGATE_TEST_TOKEN", "s3cret")
    cfg = config.validate({"admin": {"token": "${REGATE_TEST_TOKEN}", "listen": "127.0.0.1:${REGATE_TEST_NOPE:-9100}"},
                           "tools": [TOOL]})
    assert cfg.admin.token == "s3cret"
    assert cfg.admin_addr == ("127.0.0.1", 9100)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "regate.yaml"
    p.write_text("tools:\n  - name: a\n    upstream: [unclosed\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(p)
    assert f"{p}:" in exc.value.problems[0] and "not valid YAML" in exc.value.problems[0]


def test_cli_config_check_prints_one_line_per_problem_and_no_traceback(tmp_path):
    p = tmp_path / "regate.yaml"
    p.write_text("tools:\n  - name: a\n    upstream: nope\n  - name: b\n    upstream: http://x:1\n    cost: -3\n")
    r = subprocess.run([sys.executable, "-m", "proxy", "config", "check", "-c", str(p)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("config error: tools[0].upstream: not a URL")
    assert lines[1].startswith("config error: tools[1].cost:")
    assert "Traceback" not in r.stderr


def test_cli_config_check_accepts_the_demo_config():
    r = subprocess.run([sys.executable, "-m", "proxy", "config", "check", "-c", "examples/regate.yaml"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "config OK" in r.stdout
