"""Hold-mode approvals end to end: Regate as a real process with the shipped
policy (analyst-2 paying more than 100 USD needs a human), a real upstream,
the agent and the approver on real sockets. Also the admin API's security
and the `regate approvals` command."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest

from tests.conftest import AGENT_KEY, OTHER_KEY
from tests.support.approvals import admin, agent_call, audit_records, decide, wait_audit, wait_pending
from tests.support.procs import ADMIN_TOKEN, ROOT, RegateProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT_S = 60
QUICK_TIMEOUT_S = 1.5
PAY = "/tools/payments/pay"


@pytest.fixture(scope="module")
def replicas(upstream, keys_file, tmp_path_factory):
    """Two Regates: one whose approvals wait long enough for a person (or a
    loaded CI machine), one whose approvals time out quickly."""

    def start(timeout_s: float) -> RegateProcess:
        tmp = tmp_path_factory.mktemp("approvals-hold")
        cfg = {
            "auth": {"mode": "api_key", "keys": str(keys_file)},
            "policy": {"rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
            "tools": [{"name": "payments", "upstream": upstream, "timeout_ms": 5000}],
            "limits": {"enabled": False},  # the shipped payments limit (3 a burst) is not under test here
            "approvals": {"mode": "hold", "timeout_s": timeout_s},
            "http": {"shutdown_grace_s": 1},
        }
        proc = RegateProcess(cfg, tmp)
        proc.audit_dir = tmp / "audit"
        return proc

    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(start, (TIMEOUT_S, QUICK_TIMEOUT_S)))
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def regate(replicas):
    return replicas[0]


@pytest.fixture(scope="module")
def quick(replicas):
    return replicas[1]


def upstream_calls(url: str) -> int:
    with urllib.request.urlopen(url + "/_count") as r:
        import json

        return json.loads(r.read())["calls"]


async def test_small_payment_needs_no_human(regate, upstream):
    status, headers, body = await agent_call(regate.url, PAY, {"amount": 50, "to": "acme"})
    assert status == 200, body
    assert "X-Regate-Approval" not in headers


async def test_approved_call_is_forwarded_exactly_once_and_audited(regate, upstream):
    before = upstream_calls(upstream)
    payload = {"amount": 250, "to": "acme", "invoice": "INV-7"}
    task = asyncio.create_task(agent_call(regate.url, PAY, payload))
    rec = await wait_pending(regate, agent="analyst-2")
    assert rec["tool"] == "payments" and rec["method"] == "POST" and rec["path"] == PAY
    assert rec["mode"] == "hold"
    assert "250 USD is above the 100 USD" in rec["reason"]
    assert rec["args"] == payload
    assert 0 < rec["time_left_s"] <= TIMEOUT_S
    assert upstream_calls(upstream) == before  # held: nothing reached the tool yet
    assert not task.done()

    status, body = await decide(regate, rec["id"], "approve", "alice", "invoice checked")
    assert status == 200, body
    assert body["approval"]["state"] == "approved" and body["approval"]["approver"] == "alice"
    status, headers, echoed = await asyncio.wait_for(task, 5)
    assert status == 200, echoed
    assert headers["X-Regate-Approval"] == rec["id"]
    decision_id = headers["X-Regate-Decision-Id"]
    assert decision_id == rec["decision_id"]
    import json

    assert json.loads(echoed["body"]) == payload
    assert upstream_calls(upstream) == before + 1

    # A second decision on the same approval is refused: it is spent.
    status, body = await decide(regate, rec["id"], "deny", "bob")
    assert status == 409 and body["error"]["code"] == "approval_decided"
    status, body = await admin(regate, "GET", f"/admin/approvals/{rec['id']}")
    assert body["approval"]["state"] == "used" and body["approval"]["used_by"] == decision_id

    # The audit trail: every step linked by approval id and decision id, and
    # the normal write-ahead decision + outcome records of the forwarded call.
    steps = await wait_audit(regate.audit_dir, lambda r: r.get("approval_id") == rec["id"]
                             and r.get("event") == "executed")
    assert steps, "no executed record"
    records = audit_records(regate.audit_dir)
    mine = [r for r in records if r.get("approval_id") == rec["id"]]
    assert [r["event"] for r in mine] == ["proposed", "approved", "executed"]
    proposed, approved, executed = mine
    assert proposed["body_sha256"] == rec["body_sha256"] and proposed["revision"].startswith("sha256:")
    assert proposed["decision_id"] == decision_id
    assert approved["approver"] == "alice" and approved["comment"] == "invoice checked"
    assert executed["upstream_status"] == 200 and executed["decision_id"] == decision_id
    by_decision = [r for r in records if r.get("decision_id") == decision_id and r["kind"] in ("decision", "outcome")]
    assert [(r["kind"], r["decision"] if r["kind"] == "decision" else r["status"]) for r in by_decision] == [
        ("decision", "allow"), ("outcome", 200)]
    assert by_decision[0]["body_sha256"] == proposed["body_sha256"]
    with urllib.request.urlopen(regate.admin_url + "/metrics") as r:
        metrics = r.read().decode()
    assert 'regate_approvals_total{event="executed"}' in metrics and "regate_approvals_held 0.0" in metrics


async def test_denied_call_gets_403_with_the_comment(regate, upstream):
    before = upstream_calls(upstream)
    task = asyncio.create_task(agent_call(regate.url, PAY, {"amount": 900, "to": "unknown-vendor"}))
    rec = await wait_pending(regate, agent="analyst-2")
    status, _ = await decide(regate, rec["id"], "deny", "bob", "vendor is not on the approved list")
    assert status == 200
    status, headers, body = await asyncio.wait_for(task, 5)
    assert status == 403
    assert body["error"]["code"] == "approval_denied"
    assert "vendor is not on the approved list" in body["error"]["message"]
    assert body["error"]["reasons"] == ["vendor is not on the approved list"]
    assert "bob" not in str(body)  # the approver's name is for the audit, not the agent
    assert upstream_calls(upstream) == before
    denied = await wait_audit(regate.audit_dir, lambda r: r.get("approval_id") == rec["id"]
                              and r.get("event") == "denied")
    assert denied[0]["approver"] == "bob"


async def test_undecided_call_times_out_with_408(quick, upstream):
    before = upstream_calls(upstream)
    started = time.monotonic()
    task = asyncio.create_task(agent_call(quick.url, PAY, {"amount": 300, "to": "acme"}))
    rec = await wait_pending(quick, agent="analyst-2")
    status, _, body = await asyncio.wait_for(task, QUICK_TIMEOUT_S + 5)
    assert status == 408 and body["error"]["code"] == "approval_timeout"
    assert QUICK_TIMEOUT_S - 0.3 <= time.monotonic() - started < QUICK_TIMEOUT_S + 2
    status, body = await decide(quick, rec["id"], "approve", "late-alice")
    assert status == 409
    status, body = await admin(quick, "GET", f"/admin/approvals/{rec['id']}")
    assert body["approval"]["state"] == "expired"
    assert upstream_calls(upstream) == before
    expired = await wait_audit(quick.audit_dir, lambda r: r.get("approval_id") == rec["id"]
                               and r.get("event") == "expired")
    assert len(expired) == 1


async def test_client_disconnect_withdraws_the_approval(regate, upstream):
    before = upstream_calls(upstream)
    task = asyncio.create_task(agent_call(regate.url, PAY, {"amount": 400, "to": "acme"}))
    rec = await wait_pending(regate, agent="analyst-2")
    task.cancel()  # closes the client's connection mid-wait
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 3
    state = None
    while time.monotonic() < deadline:
        _, body = await admin(regate, "GET", f"/admin/approvals/{rec['id']}")
        state = body["approval"]["state"]
        if state == "withdrawn":
            break
        await asyncio.sleep(0.05)
    assert state == "withdrawn"
    status, body = await decide(regate, rec["id"], "approve", "alice")
    assert status == 409 and "withdrawn" in body["error"]["message"]
    assert upstream_calls(upstream) == before
    withdrawn = await wait_audit(regate.audit_dir, lambda r: r.get("approval_id") == rec["id"]
                                 and r.get("event") == "withdrawn")
    assert withdrawn and withdrawn[0]["note"] == "the client disconnected"


async def test_decide_needs_an_approver_name(regate):
    task = asyncio.create_task(agent_call(regate.url, PAY, {"amount": 150, "to": "acme"}))
    rec = await wait_pending(regate, agent="analyst-2")
    status, body = await admin(regate, "POST", f"/admin/approvals/{rec['id']}/approve", {"comment": "x"})
    assert status == 400 and body["error"]["code"] == "approver_required"
    status, body = await admin(regate, "GET", "/admin/approvals?state=bogus")
    assert status == 400
    await decide(regate, rec["id"], "deny", "carol")
    assert (await asyncio.wait_for(task, 5))[0] == 403


def _cli(regate, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "REGATE_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run([sys.executable, "-m", "proxy", "approvals", "--admin-url", regate.admin_url, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=20)


async def test_cli_lists_approves_and_denies(regate, upstream, capsys):
    task = asyncio.create_task(agent_call(regate.url, PAY, {"amount": 120, "to": "cli-vendor"}))
    rec = await wait_pending(regate, agent="analyst-2")
    out = await asyncio.to_thread(_cli, regate, "list")
    assert out.returncode == 0, out.stderr
    assert rec["id"] in out.stdout and "analyst-2 -> payments" in out.stdout and "cli-vendor" in out.stdout
    out = await asyncio.to_thread(_cli, regate, "approve", rec["id"], "-m", "ok from the terminal",
                                  "--approver", "dave")
    assert out.returncode == 0, out.stderr
    assert "approved by dave" in out.stdout
    assert (await asyncio.wait_for(task, 5))[0] == 200

    task = asyncio.create_task(agent_call(regate.url, PAY, {"amount": 130, "to": "cli-vendor"}))
    rec = await wait_pending(regate, agent="analyst-2")
    out = await asyncio.to_thread(_cli, regate, "deny", rec["id"], "-m", "not today")
    assert out.returncode == 0, out.stderr
    status, _, body = await asyncio.wait_for(task, 5)
    assert status == 403 and "not today" in body["error"]["message"]

    # In-process from here on (each `python -m proxy` costs a second of imports).
    from proxy.cli import main

    assert await asyncio.to_thread(main, ["approvals", "--admin-url", regate.admin_url, "--token", ADMIN_TOKEN,
                                          "approve", rec["id"]]) == 1
    assert "409 approval_decided" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["approvals", "--admin-url", regate.admin_url, "--token", "wrong",
                                          "list"]) == 1
    assert "401 unauthenticated" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["approvals", "--admin-url", regate.admin_url, "--token", ADMIN_TOKEN,
                                          "deny", "../reload"]) == 2


# -- security ------------------------------------------------------------------

ENDPOINTS = [
    ("GET", "/admin/approvals"),
    ("GET", "/admin/approvals?state=pending"),
    ("GET", "/admin/approvals/events"),
    ("GET", "/admin/approvals/apr_000000000000000000000000"),
    ("POST", "/admin/approvals/apr_000000000000000000000000/approve"),
    ("POST", "/admin/approvals/apr_000000000000000000000000/deny"),
]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Bearer {ADMIN_TOKEN}x", "Basic abc", ADMIN_TOKEN])
async def test_admin_approvals_refuse_without_the_right_token(regate, auth):
    headers = {} if auth is None else {"Authorization": auth}
    for method, path in ENDPOINTS:
        status, body = await admin(regate, method, path, {"approver": "mallory"} if method == "POST" else None,
                                   headers=headers)
        assert status == 401, (method, path, status, body)
        assert body["error"]["code"] == "unauthenticated"


async def test_data_plane_serves_no_admin_path(regate):
    paths = [p for _, p in ENDPOINTS] + ["/admin/ui/approvals", "/ui/approvals", "/admin/reload", "/metrics"]
    async with aiohttp.ClientSession() as s:
        for path in paths:
            for headers in ({}, regate.admin_headers, {**regate.admin_headers, "X-Api-Key": OTHER_KEY}):
                async with s.get(regate.url + path, headers=headers) as r:
                    assert r.status in (401, 404), (path, r.status)
                    body = await r.json()
                    assert body["error"]["code"] in ("unauthenticated", "unknown_tool"), (path, body)
                    assert "approvals" not in body or not body["approvals"]


async def test_inbox_page_is_a_static_shell_with_a_strict_csp(regate):
    task = asyncio.create_task(agent_call(regate.url, PAY, {"amount": 111, "to": "secret-vendor"}))
    rec = await wait_pending(regate, agent="analyst-2")
    async with aiohttp.ClientSession() as s:
        async with s.get(regate.admin_url + "/ui/approvals") as r:
            assert r.status == 200 and r.content_type == "text/html"
            html = await r.text()
            csp = r.headers["Content-Security-Policy"]
    assert rec["id"] not in html and "secret-vendor" not in html  # data only comes with the token
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert "sessionStorage" in html and "http://" not in html and "https://" not in html  # no external assets
    await decide(regate, rec["id"], "deny", "erin")
    assert (await asyncio.wait_for(task, 5))[0] == 403


async def test_status_url_shows_the_agent_its_own_approval_only(regate):
    task = asyncio.create_task(agent_call(regate.url, PAY, {"amount": 222, "to": "acme"}))
    rec = await wait_pending(regate, agent="analyst-2")
    try:
        status, _, body = await agent_call(regate.url, f"/_regate/approvals/{rec['id']}", method="GET")
        assert status == 200, f"the data plane must route /_regate/approvals/<id> to the agent: {body}"
        view = body["approval"]
        assert view["state"] == "pending" and view["id"] == rec["id"]
        assert "args" not in view and "approver" not in view and "query" not in view
        status, _, body = await agent_call(regate.url, f"/_regate/approvals/{rec['id']}", method="GET", key=AGENT_KEY)
        assert status == 404 and body["error"]["code"] == "approval_invalid"
        status, _, body = await agent_call(regate.url, f"/_regate/approvals/{rec['id']}", method="GET", key="nope")
        assert status == 401
    finally:
        await decide(regate, rec["id"], "deny", "frank")
        await asyncio.wait_for(task, 5)


async def test_shutdown_ends_held_calls_at_once(regate):
    """Last in this module: it stops the Regate process."""
    task = asyncio.create_task(agent_call(regate.url, PAY, {"amount": 333, "to": "acme"}))
    await wait_pending(regate, agent="analyst-2")
    started = time.monotonic()
    await asyncio.to_thread(regate.stop)
    try:
        status, _, body = await asyncio.wait_for(task, 5)
    except aiohttp.ClientError:
        status, body = None, {}
    assert status == 503, f"a held call must end with 503 at shutdown, not wait out the grace (got {status})"
    assert body["error"]["code"] == "approval_unavailable"
    assert "shutting down" in body["error"]["message"]
    assert time.monotonic() - started < 3
