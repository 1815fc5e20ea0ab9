"""A call that needs a human approval has its body read by the approval stage (the
approval covers the body's hash) when no earlier stage read it: a body that is not
JSON. That read has the same deadline as a body the policy reads
(`http.body_timeout_s`): a client that sends the head and then trickles the body
cannot hold the call (nor its place in `max_concurrent_per_agent`) for ever.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.security.conftest import _parse_one, assert_error, audit_for, exchange, request
from tests.security.test_slow_clients import trickle
from tests.support.procs import RegateProcess

pytestmark = pytest.mark.timeout(30)

BODY_TIMEOUT_S = 1.0

# Every call to the vault needs a human, whatever its body (the policy never reads it).
POLICY = """
package regate

decision := {"allow": true, "reasons": [], "approval": approval}

approval := {"required": true, "reason": "the vault needs a human"} if {
	input.tool.name == "vault"
} else := {"required": false, "reason": ""}
"""


@pytest.fixture(scope="module")
def regate(upstream, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("approval-body")
    (tmp / "rego").mkdir()
    (tmp / "data").mkdir()
    (tmp / "rego" / "policy.rego").write_text(POLICY)
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(tmp / "rego"), "data": str(tmp / "data")},
        "tools": [{"name": "vault", "upstream": upstream, "timeout_ms": 5000, "unread_body": "forward"}],
        "limits": {"enabled": False},
        "approvals": {"mode": "async"},
        "http": {"body_timeout_s": BODY_TIMEOUT_S, "shutdown_grace_s": 1},
    }
    proc = RegateProcess(cfg, tmp)
    proc.audit_dir = tmp / "audit"
    yield proc
    proc.stop()


def _get(url: str, headers: dict | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
        return json.loads(r.read())


def test_a_trickled_body_of_a_call_needing_approval_is_cut_with_408(regate, upstream):
    calls_before = _get(upstream + "/_count")["calls"]
    head = request("POST", "/tools/vault/put", content_type="application/octet-stream",
                   headers=[("Content-Length", "100000")])
    # One byte every 0.2 s, for 3 s: never idle for long, never done. The answer must
    # come meanwhile (at body_timeout_s), not when the client stops.
    got, _, _ = trickle(regate.port, head + b"x" * 10, b"x", every=0.2, for_s=BODY_TIMEOUT_S + 2)
    resp, _ = _parse_one(got, True)
    assert resp is not None, f"no answer within {BODY_TIMEOUT_S + 2:g} s while the body trickled"
    err = assert_error(resp, 408, "body_timeout")
    assert "http.body_timeout_s" in err["message"], err

    # No human was asked about a call whose body never came, nothing reached the tool,
    # and the refusal is recorded.
    pending = _get(regate.admin_url + "/admin/approvals?state=pending", regate.admin_headers)["approvals"]
    assert pending == [], pending
    assert _get(upstream + "/_count")["calls"] == calls_before
    recs = audit_for(regate.audit_dir, err["decision_id"], "decision")
    assert [r["code"] for r in recs] == ["body_timeout"], recs

    # The same call sent whole still goes to a human.
    ex = exchange(regate.port, request("POST", "/tools/vault/put", body=b"x" * 100000,
                                       content_type="application/octet-stream"))
    assert_error(ex.first, 202, "approval_pending")
