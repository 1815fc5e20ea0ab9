"""A policy that cannot decide (issue 23): the agent gets a stable message and the
decision id, never the policy's internals (file:line, the engine's text); the
operator finds the detail in the log, the audit record and the admin API's
decision (what `regate explain` reads). A real Regate."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.support.approvals import audit_records
from tests.support.procs import ADMIN_HEADERS, RegateProcess

POLICY = """package regate
import rego.v1
decision := {"allow": "yes", "reasons": []}
"""
DETAIL = "allow must be a boolean"


def test_the_agent_gets_a_stable_message_and_the_operator_the_detail(upstream, tmp_path):
    (tmp_path / "rego").mkdir()
    (tmp_path / "rego" / "notes.rego").write_text(POLICY)
    (tmp_path / "data").mkdir()
    proc = RegateProcess({"auth": {"mode": "none"},
                          "policy": {"rego": str(tmp_path / "rego"), "data": str(tmp_path / "data")},
                          "tools": [{"name": "notes", "upstream": upstream}]}, tmp_path)
    try:
        req = urllib.request.Request(proc.url + "/tools/notes/x", headers={"X-Agent-Id": "a"})
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("allowed")
        except urllib.error.HTTPError as e:
            status, body = e.code, json.loads(e.read())
        err = body["error"]
        assert status == 403 and err["code"] == "policy_error"
        assert err["reasons"] == [] and DETAIL not in json.dumps(body) and "notes.rego" not in json.dumps(body)
        assert err["message"] == ("the policy could not decide on this call (bad_decision), so it is refused; "
                                  f"an operator can see why with: regate explain {err['decision_id']}")
        req = urllib.request.Request(proc.admin_url + f"/admin/decisions/{err['decision_id']}", headers=ADMIN_HEADERS)
        with urllib.request.urlopen(req, timeout=5) as r:
            assert DETAIL in r.read().decode()
    finally:
        proc.stop()
    log = proc.output()
    assert f"policy bad_decision for tool notes (decision {err['decision_id']})" in log and DETAIL in log
    (record,) = [r for r in audit_records(tmp_path / "audit") if r.get("decision_id") == err["decision_id"]]
    assert any(DETAIL in r for r in record["reasons"]), record
