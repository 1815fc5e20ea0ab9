"""What an operator reads (issue 23): the overview counts an async approval that waits
as pending (not only calls held open) and does not count `approval_pending` or
throttled calls as refused; `regate audit tail` shows an unauthenticated call as
such (not `None -> None`) and an approval's step and approver. A real Regate, the
real CLI."""

from __future__ import annotations

import subprocess
import sys
import time

import aiohttp
import pytest

from proxy.audit_verify import format_record
from tests.conftest import AGENT_KEY
from tests.support.approvals import admin, agent_call, decide, wait_audit
from tests.support.procs import RegateProcess

POLICY = """package regate
import rego.v1
default decision := {"allow": false, "reasons": ["only GET and POST"]}
decision := {"allow": true} if input.request.method == "GET"
decision := {"allow": true, "approval": {"required": true, "reason": "a human checks"}} if input.request.method == "POST"
"""


@pytest.fixture(scope="module")
def regate(upstream, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overview-counts")
    (tmp / "rego").mkdir()
    (tmp / "rego" / "p.rego").write_text(POLICY)
    (tmp / "data").mkdir()
    proc = RegateProcess({
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(tmp / "rego"), "data": str(tmp / "data")},
        "tools": [{"name": "notes", "upstream": upstream, "timeout_ms": 5000}],
        "http": {"max_concurrent_per_agent": 1, "shutdown_grace_s": 1},
    }, tmp)
    proc.audit_dir = tmp / "audit"
    yield proc
    proc.stop()


async def call(proc, method: str, key: str | None = AGENT_KEY) -> int:
    async with aiohttp.ClientSession() as s:
        headers = {"X-Api-Key": key} if key else {}
        async with s.request(method, proc.url + "/tools/notes/x", headers=headers, json={"a": 1}) as r:
            return r.status


@pytest.mark.asyncio(loop_scope="module")
async def test_overview_counts_pending_approvals_and_keeps_them_out_of_refused(regate):
    assert await call(regate, "GET") == 200
    assert await call(regate, "POST") == 202          # async (the default): waits for a human
    assert await call(regate, "DELETE") == 403        # refused by the policy
    assert await call(regate, "GET", key=None) == 401  # refused: unauthenticated
    status, doc = await admin(regate, "GET", "/admin/overview")
    assert status == 200, doc
    assert doc["approvals_pending"] == 1 and doc["approvals_held"] == 0
    calls = doc["calls"]
    assert calls["total"] == 4 and calls["waiting"] == 1 and calls["refused"] == 2, calls
    assert set(calls) >= {"throttled", "by_outcome"}


def test_the_overview_page_reads_the_server_side_counts():
    from proxy.observability import api

    page = (api.Path(api.__file__).parent / "overview.html").read_text()
    assert "s.calls.refused" in page and "s.approvals_pending" in page
    assert "by_outcome.forwarded || 0)" not in page  # "refused" is no longer total minus forwarded
    assert {"rate_limited", "budget_exhausted", "too_many_concurrent"} <= api.THROTTLED


@pytest.mark.asyncio(loop_scope="module")
async def test_audit_tail_names_the_unauthenticated_and_the_approval_steps(regate):
    status, headers, _ = await agent_call(regate.url, "/tools/notes/y", {"b": 2}, key=AGENT_KEY)
    assert status == 202
    approval = headers["X-Regate-Approval"]
    assert (await decide(regate, approval, "approve", approver="alice", comment="fine"))[0] == 200
    await wait_audit(regate.audit_dir, lambda r: r.get("event") == "approved")
    await wait_audit(regate.audit_dir, lambda r: r.get("code") == "unauthenticated")
    r = subprocess.run([sys.executable, "-m", "proxy", "audit", "tail", str(regate.audit_dir), "--no-follow"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert not [ln for ln in lines if "None" in ln], lines
    (unauth,) = [ln for ln in lines if "code=unauthenticated" in ln]
    assert "(unauthenticated) -> (no tool)" in unauth
    proposed = [ln for ln in lines if f"proposed {approval}" in ln]
    approved = [ln for ln in lines if f"approved {approval}" in ln]
    assert len(proposed) == 1 and "APPROVAL" in proposed[0] and "reason: a human checks" in proposed[0], lines
    assert len(approved) == 1 and "by alice" in approved[0] and "comment: fine" in approved[0], lines


def test_format_record_of_a_record_with_nothing_known():
    line = format_record({"kind": "decision", "ts": time.time(), "seq": 3, "decision": "deny",
                          "agent": None, "tool": None, "method": None, "path": None, "code": "bad_path"})
    assert "None" not in line and "(unauthenticated) -> (no tool)" in line
