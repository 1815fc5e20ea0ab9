"""Approvals against ordinary HTTP clients (issue 23): the default mode is `async`
(202 at once, the agent comes back with the approval id), and an agent that can
wait says so with `Prefer: wait=N` (RFC 7240): Regate holds the call up to N
seconds, runs it if a human approves in time, else answers 202 with the approval
still pending. A real Regate process, a real upstream, the approver on the admin API."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.approvals.stage import prefer_wait
from proxy.config import validate
from tests.conftest import AGENT_KEY
from tests.support.approvals import admin, agent_call, decide, wait_pending
from tests.support.procs import RegateProcess

ASYNC = pytest.mark.asyncio(loop_scope="module")

POLICY = """package regate
import rego.v1
decision := {"allow": true, "approval": {"required": input.request.method == "POST", "reason": "a human checks"}}
"""


@pytest.fixture(scope="module")
def regate(upstream, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefer-wait")
    (tmp / "rego").mkdir()
    (tmp / "rego" / "policy.rego").write_text(POLICY)
    (tmp / "data").mkdir()
    proc = RegateProcess({
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(tmp / "rego"), "data": str(tmp / "data")},
        "tools": [{"name": "payments", "upstream": upstream, "timeout_ms": 5000}],
        "http": {"shutdown_grace_s": 1},
        # no approvals section: the defaults are under test
    }, tmp)
    yield proc
    proc.stop()


def test_the_default_mode_is_async():
    cfg = validate({"tools": [{"name": "t", "upstream": "http://127.0.0.1:1"}]})
    assert cfg.approvals.mode == "async"


@pytest.mark.parametrize("header, seconds", [
    (None, None), ("", None), ("wait=5", 5.0), ("respond-async, wait=10", 10.0), ("WAIT = 3", 3.0),
    ('wait="7"', 7.0), ("wait=0", None), ("wait=-1", None), ("wait=soon", None), ("return=minimal", None),
    ("wait=nan", None),
])
def test_prefer_wait_is_read_as_rfc_7240_says(header, seconds):
    assert prefer_wait(header) == seconds


@ASYNC
async def test_without_prefer_the_agent_gets_202_at_once(regate):
    t0 = time.monotonic()
    status, headers, body = await agent_call(regate.url, "/tools/payments/pay", {"amount": 1}, key=AGENT_KEY,
                                             timeout=5)
    assert status == 202 and body["error"]["code"] == "approval_pending", body
    assert time.monotonic() - t0 < 2  # a stock client's 5 s timeout is never reached
    assert headers["X-Regate-Approval"].startswith("apr_") and "Preference-Applied" not in headers


@ASYNC
async def test_prefer_wait_holds_up_to_n_seconds_then_202_with_the_approval_still_pending(regate):
    t0 = time.monotonic()
    status, headers, body = await agent_call(regate.url, "/tools/payments/pay", {"amount": 2}, key=AGENT_KEY,
                                             headers={"Prefer": "wait=1"}, timeout=5)
    took = time.monotonic() - t0
    assert status == 202 and body["error"]["code"] == "approval_pending", body
    assert 0.9 <= took < 3, took
    assert headers["Preference-Applied"] == "wait=1"
    approval = headers["X-Regate-Approval"]
    assert (await decide(regate, approval, "approve"))[0] == 200  # still pending: a human can approve it
    status, _, body = await agent_call(regate.url, "/tools/payments/pay", {"amount": 2}, key=AGENT_KEY,
                                       headers={"X-Regate-Approval": approval})
    assert status == 200, body


@ASYNC
async def test_prefer_wait_runs_the_call_when_approved_in_time(regate):
    earlier = {r["id"] for r in (await admin(regate, "GET", "/admin/approvals?state=pending"))[1]["approvals"]}
    call = asyncio.ensure_future(agent_call(regate.url, "/tools/payments/pay", {"amount": 3}, key=AGENT_KEY,
                                            headers={"Prefer": "wait=20"}, timeout=25))
    rec = await wait_pending(regate, exclude=earlier)
    assert (await decide(regate, rec["id"], "approve"))[0] == 200
    status, headers, body = await call
    assert status == 200, body
    assert headers["Preference-Applied"] == "wait=20"
