"""Async-mode approvals end to end: 202 with an approval id, then the agent
re-sends the same call with X-Regate-Approval. It runs only when approved,
unchanged and unused. The bundle here masks fields for the human and lets a
decision pick the mode, so per-route and per-decision modes are both covered."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from tests.conftest import AGENT_KEY
from tests.support.approvals import admin, agent_call, audit_records, decide, wait_audit
from tests.support.procs import RegateProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT_S = 1.5
WIRE = "/tools/wire/send"

POLICY = """
package regate

decision := {"allow": true, "reasons": [], "approval": approval}

approval := {
	"required": true,
	"reason": sprintf("a wire of %v needs a human", [input.request.body.amount]),
	"mask": ["account", "TOKEN"],
	"mode": object.get(input.request.body, "mode", null),
} if {
	input.tool.name == "wire"
	input.request.body.amount > 100
} else := {"required": false, "reason": ""}
"""


@pytest.fixture(scope="module")
def regate(upstream, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("approvals-async")
    (tmp / "rego").mkdir()
    (tmp / "data").mkdir()
    (tmp / "rego" / "policy.rego").write_text(POLICY)
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(tmp / "rego"), "data": str(tmp / "data")},
        "tools": [{"name": "wire", "upstream": upstream, "timeout_ms": 5000}],
        "limits": {"enabled": False},
        # hold by default, async for the wire route: the route's mode is what applies.
        "approvals": {"mode": "hold", "tools": {"wire": "async"}, "timeout_s": TIMEOUT_S, "use_within_s": 30},
        "http": {"shutdown_grace_s": 1},
    }
    proc = RegateProcess(cfg, tmp)
    proc.audit_dir = tmp / "audit"
    yield proc
    proc.stop()


def upstream_calls(url: str) -> int:
    with urllib.request.urlopen(url + "/_count") as r:
        return json.loads(r.read())["calls"]


async def propose(regate, payload) -> tuple[str, dict]:
    status, headers, body = await agent_call(regate.url, WIRE, payload)
    assert status == 202, body
    assert body["error"]["code"] == "approval_pending"
    approval_id = headers["X-Regate-Approval"]
    assert headers["Location"] == f"/_regate/approvals/{approval_id}"
    assert approval_id in body["error"]["message"]
    assert headers["Retry-After"] == "2"
    return approval_id, headers


def resend(regate, approval_id, payload, **kw):
    headers = {"X-Regate-Approval": approval_id, **kw.pop("headers", {})}
    return agent_call(regate.url, kw.pop("path", WIRE), payload, headers=headers, **kw)


async def test_approved_resend_runs_once_and_only_unchanged(regate, upstream):
    before = upstream_calls(upstream)
    payload = {"amount": 500, "memo": "rent", "account": "DE44 5001 0517 5407 3249 31",
               "auth": {"Token": "s3cr3t-t0ken", "scope": "wire"}, "list": [{"account": "x"}, 1]}
    approval_id, headers = await propose(regate, payload)
    proposed_decision = headers["X-Regate-Decision-Id"]

    # The human sees the call with the policy's fields masked, at any depth.
    status, body = await admin(regate, "GET", f"/admin/approvals/{approval_id}")
    rec = body["approval"]
    assert rec["state"] == "pending" and rec["mode"] == "async" and rec["decision_id"] == proposed_decision
    assert rec["args"] == {"amount": 500, "memo": "rent", "account": "[masked]",
                           "auth": {"Token": "[masked]", "scope": "wire"}, "list": [{"account": "[masked]"}, 1]}
    # The secrets as they were sent (a bare "5407" can turn up in an epoch float).
    shown = json.dumps(body)
    assert "s3cr3t-t0ken" not in shown and "DE44" not in shown and "5407 3249" not in shown

    # Re-sent before anyone decided: still pending, nothing ran.
    status, headers, body = await resend(regate, approval_id, payload)
    assert status == 202 and headers["X-Regate-Approval"] == approval_id

    status, _ = await decide(regate, approval_id, "approve", "alice", "rent is due")
    assert status == 200

    # Tampered body, other path or query, other agent: refused, and the approval survives.
    status, _, body = await resend(regate, approval_id, {**payload, "amount": 5000})
    assert status == 403 and body["error"]["code"] == "approval_mismatch" and "body" in body["error"]["message"]
    status, _, body = await resend(regate, approval_id, payload, path=WIRE + "?to=elsewhere")
    assert status == 403 and body["error"]["code"] == "approval_mismatch"
    status, _, body = await resend(regate, approval_id, payload, key=AGENT_KEY)
    assert status == 403 and body["error"]["code"] == "approval_invalid"
    status, _, body = await resend(regate, "apr_000000000000000000000000", payload)
    assert status == 403 and body["error"]["code"] == "approval_invalid"
    status, _, body = await resend(regate, "not-an-id", payload)
    assert status == 400 and body["error"]["code"] == "approval_invalid"
    assert upstream_calls(upstream) == before

    # The exact call runs, once.
    status, headers, echoed = await resend(regate, approval_id, payload)
    assert status == 200, echoed
    assert json.loads(echoed["body"]) == payload
    executed_decision = headers["X-Regate-Decision-Id"]
    assert upstream_calls(upstream) == before + 1

    status, _, body = await resend(regate, approval_id, payload)
    assert status == 409 and body["error"]["code"] == "approval_used"
    assert upstream_calls(upstream) == before + 1

    await wait_audit(regate.audit_dir, lambda r: r.get("approval_id") == approval_id and r.get("event") == "executed")
    records = audit_records(regate.audit_dir)
    steps = [r for r in records if r.get("approval_id") == approval_id]
    assert [r["event"] for r in steps] == ["proposed", "approved", "refused", "refused", "executed", "refused"]
    assert steps[0]["approval_mask"] == ["account", "TOKEN"]
    assert steps[2]["code"] == "approval_mismatch" and steps[2]["differs"] == "body"
    assert steps[3]["differs"] == "method and path"
    executed = steps[4]
    assert executed["decision_id"] == executed_decision and executed["proposed_decision_id"] == proposed_decision
    assert executed["upstream_status"] == 200 and executed["body_sha256"] == steps[0]["body_sha256"]
    assert steps[5]["code"] == "approval_used"
    first = [r for r in records if r.get("decision_id") == proposed_decision and r["kind"] == "decision"]
    assert first[0]["code"] == "approval_pending"
    ran = [r for r in records if r.get("decision_id") == executed_decision and r["kind"] in ("decision", "outcome")]
    assert [(r["kind"], r["decision"] if r["kind"] == "decision" else r["status"]) for r in ran] == [
        ("decision", "allow"), ("outcome", 200)]


async def test_denied_resend_gets_403_with_the_comment(regate, upstream):
    before = upstream_calls(upstream)
    payload = {"amount": 700, "memo": "gift"}
    approval_id, _ = await propose(regate, payload)
    await decide(regate, approval_id, "deny", "bob", "gifts need a ticket")
    status, _, body = await resend(regate, approval_id, payload)
    assert status == 403 and body["error"]["code"] == "approval_denied"
    assert "gifts need a ticket" in body["error"]["message"]
    assert upstream_calls(upstream) == before


async def test_unanswered_approval_times_out(regate, upstream):
    payload = {"amount": 800}
    approval_id, _ = await propose(regate, payload)
    await asyncio.sleep(TIMEOUT_S + 0.2)
    status, _, body = await resend(regate, approval_id, payload)
    assert status == 408 and body["error"]["code"] == "approval_timeout"
    status, body = await decide(regate, approval_id, "approve", "too-late")
    assert status == 409
    status, _, body = await resend(regate, approval_id, payload)
    assert status == 408
    expired = await wait_audit(regate.audit_dir, lambda r: r.get("approval_id") == approval_id
                               and r.get("event") == "expired")
    assert len(expired) == 1  # written once, by whoever noticed first


async def test_a_decision_can_ask_for_hold_on_an_async_route(regate, upstream):
    payload = {"amount": 150, "mode": "hold"}
    task = asyncio.create_task(agent_call(regate.url, WIRE, payload))
    deadline = time.monotonic() + 5
    while True:
        _, body = await admin(regate, "GET", "/admin/approvals?state=pending")
        found = [r for r in body["approvals"] if r["args"] == payload]
        if found or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert found and found[0]["mode"] == "hold"
    await decide(regate, found[0]["id"], "approve", "alice")
    status, _, _ = await asyncio.wait_for(task, 5)
    assert status == 200


async def test_small_wire_needs_no_approval_and_ignores_the_header(regate):
    status, headers, _ = await resend(regate, "apr_000000000000000000000000", {"amount": 5})
    assert status == 200 and "X-Regate-Approval" not in headers


async def test_status_url_follows_the_approval(regate):
    payload = {"amount": 990}
    approval_id, headers = await propose(regate, payload)
    status, _, body = await agent_call(regate.url, headers["Location"], method="GET")
    assert status == 200, f"the data plane must route the approval status URL {headers['Location']}: {body}"
    assert body["approval"]["state"] == "pending"
    await decide(regate, approval_id, "approve", "alice", "fine")
    status, _, body = await agent_call(regate.url, headers["Location"], method="GET")
    assert body["approval"]["state"] == "approved" and "X-Regate-Approval" in body["approval"]["next"]
    assert "approver" not in body["approval"] and "comment" not in body["approval"]
