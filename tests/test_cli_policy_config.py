"""`regate policy test` / `policy eval` read the config's policy section with -c, and
`policy eval --query` prints any rule's value (issue 23). Through the real CLI, from a
directory that has no rego/ or policies/ of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.procs import ROOT

POLICY = """package regate
import rego.v1
default decision := {"allow": false, "reasons": ["not on the list"]}
decision := {"allow": true} if input.agent.id in data.team.members
members_count := count(data.team.members)
"""
TESTS = """package regate_test
import rego.v1
test_alice if data.regate.decision.allow with input as {"agent": {"id": "alice"}}
test_mallory_denied if not data.regate.decision.allow with input as {"agent": {"id": "mallory"}}
"""
CUSTOM = """package custom
import rego.v1
answer := {"allow": input.n > 1}
"""


def setup(tmp: Path) -> Path:
    bundle = tmp / "bundle"
    (bundle / "policy" / "team").mkdir(parents=True)
    (bundle / "policy" / "team" / "data.yaml").write_text("members: [alice, bob]\n")
    (bundle / "rules").mkdir()
    (bundle / "rules" / "p.rego").write_text(POLICY)
    (bundle / "rules" / "p_test.rego").write_text(TESTS)
    (bundle / "rules" / "custom.rego").write_text(CUSTOM)
    (bundle / "regate.yaml").write_text("auth: {mode: none}\ntools: [{name: t, upstream: 'http://127.0.0.1:9'}]\n"
                                        "policy: {rego: rules/, data: policy/}\n")
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "in.json").write_text(json.dumps({"agent": {"id": "bob"}, "n": 2}))
    return tmp / "elsewhere"


def regate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_policy_test_reads_the_config(tmp_path):
    cwd = setup(tmp_path)
    r = regate("policy", "test", "-c", "../bundle/regate.yaml", cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "data.regate_test.test_alice: PASS" in r.stdout and "PASS: 2/2" in r.stdout


def test_policy_eval_reads_the_config(tmp_path):
    cwd = setup(tmp_path)
    r = regate("policy", "eval", "-c", "../bundle/regate.yaml", "-i", "in.json", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["allow"] is True


def test_decision_picks_another_decision_rule(tmp_path):
    cwd = setup(tmp_path)
    r = regate("policy", "eval", "-c", "../bundle/regate.yaml", "-i", "in.json", "--decision", "custom/answer",
               cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["allow"] is True


def test_query_prints_any_rule(tmp_path):
    cwd = setup(tmp_path)
    r = regate("policy", "eval", "-c", "../bundle/regate.yaml", "--query", "data.regate.members_count", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == 2
    r = regate("policy", "eval", "-c", "../bundle/regate.yaml", "-i", "in.json", "-q", "data.regate.decision",
               cwd=cwd)
    assert r.returncode == 0 and json.loads(r.stdout) == {"allow": True}
    r = regate("policy", "eval", "-c", "../bundle/regate.yaml", "--query", "data.regate.nothing", cwd=cwd)
    assert r.returncode == 1 and r.stderr.strip() == "data.regate.nothing: undefined"


def test_help_documents_the_flags(tmp_path):
    r = regate("policy", "eval", "--help", cwd=tmp_path)
    assert "--decision" in r.stdout and "--query" in r.stdout and "-c CONFIG" in r.stdout
