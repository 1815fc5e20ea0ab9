"""`regate policy test` / `regate policy eval` (proxy/policytool.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from proxy.policytool import eval_policy, run_policy_tests

ROOT = Path(__file__).resolve().parents[1]


def run_tests(rego, data):
    out, err = io.StringIO(), io.StringIO()
    code = run_policy_tests(rego, data, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_shipped_bundle_tests_pass():
    code, out, err = run_tests(ROOT / "rego", ROOT / "policies")
    assert code == 0, out + err
    assert "data.regate_test.test_shell_refuses_recursive_delete: PASS" in out
    lines = out.splitlines()
    total = sum(1 for line in lines if line.startswith("data."))
    assert total >= 20
    assert lines[-1] == f"PASS: {total}/{total}"


def test_a_failing_test_is_reported_by_name(tmp_path):
    (tmp_path / "p.rego").write_text("package p\n\nallow if input.user == \"admin\"\n")
    (tmp_path / "p_test.rego").write_text(
        "package p_test\n\nimport data.p\n\n"
        "test_admin_allowed if p.allow with input as {\"user\": \"admin\"}\n\n"
        "test_guest_allowed if p.allow with input as {\"user\": \"guest\"}\n\n"
        "test_broken if 1 + \"x\" == 2\n"
    )
    code, out, _ = run_tests(tmp_path, None)
    assert code == 1
    assert "data.p_test.test_admin_allowed: PASS" in out
    assert "data.p_test.test_guest_allowed: FAIL" in out
    assert "data.p_test.test_broken: ERROR" in out
    assert "PASS: 1/3" in out and "FAIL: 1/3" in out and "ERROR: 1/3" in out


def test_a_bundle_that_does_not_compile_exits_2(tmp_path):
    (tmp_path / "p.rego").write_text("package p\n\nallow if {\n")
    code, _, err = run_tests(tmp_path, None)
    assert code == 2
    assert f"{tmp_path / 'p.rego'}:4:1:" in err


def test_no_tests_is_not_a_pass(tmp_path):
    (tmp_path / "p.rego").write_text("package p\nallow := true\n")
    code, _, err = run_tests(tmp_path, None)
    assert code == 1 and "no test_* rules" in err


def eval_input(tmp_path, doc, **kw):
    path = tmp_path / "input.json"
    path.write_text(json.dumps(doc))
    out, err = io.StringIO(), io.StringIO()
    code = eval_policy(kw.get("rego", ROOT / "rego"), kw.get("data", ROOT / "policies"), kw.get("decision"), path,
                       out=out, err=err)
    return code, out.getvalue(), err.getvalue()


SHELL_RM = {
    "version": 1, "agent": {"id": "coder-7", "claims": {}}, "tool": {"name": "shell", "route": "/tools/shell"},
    "request": {"method": "POST", "path": "/tools/shell/run", "body": {"command": "rm -rf /"}}, "mcp": None,
}


def test_eval_prints_the_normalised_decision(tmp_path):
    code, out, err = eval_input(tmp_path, SHELL_RM)
    assert code == 0, err
    decision = json.loads(out)
    assert decision["allow"] is False
    assert "recursive deletion" in decision["reasons"][0]
    # Every optional field is there, with its default.
    assert decision["approval"] == {"required": False, "reason": "", "mode": None, "mask": []}
    assert decision["headers"] == {"set": {"X-Regate-Agent": "coder-7"}, "remove": ["X-Agent-Id"]}
    assert "revision: sha256:" in err


def test_eval_reports_what_cannot_be_decided(tmp_path):
    code, out, err = eval_input(tmp_path, SHELL_RM, decision="data.regate.allow")
    # data.regate.allow does not exist in the shipped bundle: the bundle is refused.
    assert code == 2 and "data.regate.allow is not defined" in err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "p.rego").write_text("package regate\ndecision := {\"allow\": 1}\n")
    code, out, err = eval_input(tmp_path, {}, rego=tmp_path / "r", data=None)
    assert code == 1 and out == ""
    assert "allow must be a boolean" in err and 'the rule gave: {"allow":1}' in err


def test_eval_input_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    out, err = io.StringIO(), io.StringIO()
    assert eval_policy(ROOT / "rego", ROOT / "policies", None, bad, out=out, err=err) == 2
    assert "bad.json:1:2: not valid JSON" in err.getvalue()
